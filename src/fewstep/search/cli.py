"""``fewstep search``: search a solver for one model and write it to a file.

    fewstep search --model digits16 --nfe 6 --samples 256 --out digits16-nfe6.safetensors
    fewstep search --model gmm16 --nfe 5,6,8 --out "gmm16-nfe{nfe}.safetensors"
    fewstep search --model mypackage.models:load_model --nfe 8 --out solver.safetensors

``--model`` is a bundled model (``fewstep.zoo.load``), an exact testbed (``gmm2d``, ``gmm16``,
``gmm64``, ``gaussian``: eps prediction on diffusers' linear betas, as ``fewstep bench`` uses them;
the teacher's end point is then the exact flow map), or ``module:callable`` returning a
:class:`fewstep.Model` whose network is differentiable.

Use the result with ``fewstep.sample(model, noise, solver="searched", path=..., nfe=N)``.

Under ``torchrun --nproc-per-node N -m fewstep search ...`` the training noise and its teacher
trajectories are sharded over the processes, losses and gradients are all-reduced (gloo), every
process takes the same optimiser steps, and rank 0 writes the file.
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time

__all__ = ["register", "resolve_model", "label_sampler", "TESTBED_NAMES", "LABEL_MODES"]

TESTBED_NAMES = ("gmm2d", "gmm16", "gmm64", "gaussian")
LABEL_MODES = ("cycle", "random", "none")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "search",
        help="search a solver for one model (DS-Solver): grid + multistep weights in minutes",
        description="Fit a solver's time grid and multistep weights to one model's high-accuracy "
        "trajectories (differentiable solver search) and write it as a safetensors file.",
    )
    p.add_argument("--model", required=True,
                   help=f"a bundled model name, a testbed ({', '.join(TESTBED_NAMES)}) or module:callable")
    p.add_argument("--nfe", required=True, help="network evaluations, e.g. 6 or 4,5,6,8,10")
    p.add_argument("--out", required=True,
                   help="output file (.safetensors); with several NFEs it must contain {nfe}")
    p.add_argument("--samples", type=int, default=256, help="training noise draws (default 256)")
    p.add_argument("--val-samples", type=int, default=64, help="held-out noise draws for early stopping (default 64)")
    p.add_argument("--seed", type=int, default=0, help="selects the search noise (default 0)")
    p.add_argument("--iterations", type=int, default=200, help="optimiser iterations (default 200)")
    p.add_argument("--optimizer", choices=("lbfgs", "adam"), default="lbfgs",
                   help="full-batch L-BFGS (default) or mini-batch Adam")
    p.add_argument("--batch", type=int, default=64, help="Adam's mini-batch (default 64)")
    p.add_argument("--lr", type=float, default=None, help="L-BFGS step scale (1) or Adam's peak rate (2e-2)")
    p.add_argument("--mid-weight", type=float, default=1.0, help="weight of the intermediate-state loss (default 1)")
    p.add_argument("--no-offsets", action="store_true",
                   help="do not search the network's time at each node (DS-Solver's own search space)")
    p.add_argument("--free-sums", action="store_true",
                   help="also search a gain per step: weights need not sum to one (DyWeight)")
    p.add_argument("--corrector", action="store_true",
                   help="also search a corrector (UniPC-style, no extra evaluation)")
    p.add_argument("--no-truncate", action="store_true",
                   help="keep the first node at t_max (by default the search may also start lower, from "
                        "pure noise there, and searches where)")
    p.add_argument("--bridge", action=argparse.BooleanOptionalAction, default=False,
                   help="with a searched start, fit the coefficients with the truncation bridge (the first "
                        "state reads x_0 + w(t_0) D_0, no extra evaluation; data view only; default: off)")
    p.add_argument("--teacher-steps", type=int, default=100,
                   help="evaluations per sample of the teacher, DPM-Solver++(3M) on a log-SNR grid (default 100)")
    p.add_argument("--labels", choices=LABEL_MODES, default=None,
                   help="class-conditional models: 'cycle' (labels 0, 1, ..., 9, 0, ... as `fewstep bench` "
                   "and `fewstep sample` call them; the default for class-conditional models), 'random' (a "
                   "random label per sample) or 'none' (the model as loaded; the default otherwise)")
    p.add_argument("--time-budget", type=float, default=None, help="stop optimising after this many seconds")
    p.add_argument("--cache-dir", default=None, help="teacher cache (default $FEWSTEP_CACHE or ~/.cache/fewstep)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the teacher cache")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_search)


def _parse_nfes(text: str) -> list[int]:
    try:
        nfes = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--nfe: expected integers separated by commas, got {text!r}") from None
    if not nfes or any(n < 1 for n in nfes):
        raise ValueError(f"--nfe: expected integers >= 1, got {text!r}")
    return nfes


def resolve_model(spec: str):
    """``(model, exact_end, exact_name)`` for a ``--model`` argument (see the module docstring)."""
    from ..model import Model

    if spec in TESTBED_NAMES:
        import torch

        from .. import testbeds
        from ..schedules import DiscreteVP
        from .rollout import differentiable_testbed

        gm = testbeds.Gaussian(mean=0.3, std=0.5, dim=16) if spec == "gaussian" else testbeds.mixtures()[spec]
        sch = DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
        model = differentiable_testbed(gm, sch)
        model.name = spec
        return model, (lambda noise: gm.reference(noise, sch)), f"{spec}-exact"
    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--model: cannot load {spec!r} ({e})") from e
        model = obj() if callable(obj) and not isinstance(obj, Model) else obj
        if not isinstance(model, Model):
            raise TypeError(f"--model: {spec!r} gave {type(model).__name__}, expected a fewstep.Model")
        return model, None, ""
    from .. import zoo

    model = zoo.load(spec)
    if not isinstance(model, Model):
        raise ValueError(f"--model: {spec!r} is not a diffusion model")
    return model, None, ""


def label_sampler(model, mode: str | None):
    """``cond_fn`` for :func:`fewstep.search.search` from a ``--labels`` mode (``None``: the default).

    A class-conditional model (one with ``null_label``) is searched on the labels it is sampled
    with: ``cycle`` gives sample ``k`` the label ``k mod classes``, exactly as ``fewstep bench``
    conditions it (no guidance). ``none`` searches the model as loaded.
    """
    import torch

    if mode is not None and mode not in LABEL_MODES:
        raise ValueError(f"--labels: expected one of {list(LABEL_MODES)}, got {mode!r}")
    null = getattr(model, "null_label", None)
    if mode is None:
        mode = "cycle" if null is not None else "none"
    if mode == "none":
        return None
    if null is None:
        raise ValueError(f"--labels {mode}: this model is not class-conditional (use --labels none)")
    classes = int(null)

    def cycle(n, generator):
        return {"label": torch.arange(n) % classes}

    def random(n, generator):
        return {"label": torch.randint(0, classes, (n,), generator=generator)}

    return cycle if mode == "cycle" else random


def _cmd_search(args) -> int:
    import torch

    from .. import distributed

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: expected a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    nfes = _parse_nfes(args.nfe)
    if len(nfes) > 1 and "{nfe}" not in args.out:
        raise ValueError("--out: with several NFEs the name must contain {nfe}, e.g. solver-nfe{nfe}.safetensors")
    # under torchrun the training noise and its teacher are sharded over the processes and the
    # gradients all-reduced (gloo: the search runs on the CPU); alone, ctx is a single process
    with distributed.launched("gloo") as ctx:
        return _search_all(args, nfes, ctx)


def _search_all(args, nfes, ctx) -> int:
    from . import save
    from .loop import search

    model, exact_end, exact_name = resolve_model(args.model)
    cond_fn = label_sampler(model, args.labels)
    command = "fewstep " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "fewstep search"
    if ctx.world > 1:
        command = f"torchrun --nproc-per-node {ctx.world} -m {command}"
    main = ctx.is_main

    def say(msg):
        if main:
            print(f"  {msg}", file=sys.stderr, flush=True)

    for nfe in nfes:
        out = args.out.replace("{nfe}", str(nfe))
        if main:
            where = f" on {ctx.world} processes" if ctx.world > 1 else ""
            print(f"searching nfe={nfe} for {args.model}{where} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        res = search(
            model, nfe, samples=args.samples, val_samples=args.val_samples, seed=args.seed,
            iterations=args.iterations, optimizer=args.optimizer, batch=args.batch, lr=args.lr,
            mid_weight=args.mid_weight, offsets=not args.no_offsets, free_sums=args.free_sums, corrector=args.corrector, truncate=not args.no_truncate,
            bridge=args.bridge, teacher_steps=args.teacher_steps,
            cond_fn=cond_fn, exact_end=exact_end, exact_name=exact_name, time_budget=args.time_budget,
            cache_dir=args.cache_dir, use_cache=not args.no_cache, progress=main and not args.quiet, log=say,
            ctx=ctx,
        )
        wall = time.perf_counter() - t0
        if not main:
            continue  # every rank holds the same result; rank 0 writes it
        path = save(out, res, model, model_name=args.model,
                    extra={"command": command, "wall_seconds": wall, "processes": ctx.world,
                           "labels": args.labels or ("cycle" if cond_fn else "none")})
        print(
            f"nfe={nfe}: RMSE to the teacher, train {res.train_rmse_init:.4g} -> {res.train_rmse:.4g}, "
            f"held-out {res.val_rmse_init:.4g} -> {res.val_rmse:.4g} "
            f"({res.val_rmse / res.val_rmse_init:.2f}x the best training-free solver in the search space, "
            f"{res.init}); {_start_text(res.params, model.schedule)}; "
            f"{res.iterations} iterations, {wall:.0f} s -> {path}"
        )
    ctx.barrier()
    return 0


def _start_text(params, schedule) -> str:
    """Where the searched solver starts, for the summary line."""
    if params.start_logit is None:
        return "starts at t_max"
    import torch

    from .parameterisation import step_table

    with torch.no_grad():
        t0 = step_table(params, schedule).times[0]
    bridged = ", with the truncation bridge" if params.bridged else ""
    return f"starts at t={float(t0):.4g} (log-SNR {float(schedule.lambda_(t0)):.3g}) from pure noise{bridged}"
