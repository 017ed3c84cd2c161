"""Command line of the bundled models: ``fewstep sample``, ``fewstep demo``, ``fewstep zoo ...``.

    fewstep sample --model digits16 --nfe 6 --label 3 --guidance 2 --seed 0 --num 16 --out grid.png
    fewstep demo                                  # what `make demo` runs
    fewstep zoo list
    fewstep zoo train digits16-m --seed 0 --out my-weights/
    fewstep zoo card digits16-m                   # measure the model, write its card
"""
from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["register", "parse_labels", "run_demo"]


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="sample a bundled (or saved) model to a PNG grid or a .pt tensor")
    p.add_argument("--model", default="digits16", help="bundled name or path to a zoo .safetensors file (default: digits16)")
    p.add_argument("--solver", default=None, help="solver name (default: fewstep.sample's recommended solver for --nfe)")
    p.add_argument("--nfe", type=int, default=10, help="network evaluations (default: 10)")
    p.add_argument("--grid", default=None, help="named grid (default: the solver's default, logsnr)")
    p.add_argument("--order", type=int, default=None, help="solver order, for solvers that take one")
    p.add_argument("--path", default=None,
                   help="a searched solver: a file from `fewstep search` or a bundled name such as digits16-nfe6 "
                        "(implies --solver searched; --nfe must be the searched one)")
    p.add_argument("--label", default=None,
                   help="digit label(s): one integer, a comma list cycled over the batch, or 'all' for 0..9 cycled")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default: 1, none)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    # -n as well: under torchrun, `--num` collides with torchrun's own --numa-binding (an ambiguous prefix)
    p.add_argument("-n", "--num", type=int, default=16, help="number of samples (default: 16)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="samples per batch (default: 256); with --seed and --num it fixes the output, whatever "
                        "the number of torchrun processes sharing the batches")
    p.add_argument("--shards", default=None, metavar="DIR",
                   help="keep each finished batch in DIR (with index.json): a killed job, rerun with the same "
                        "arguments, resumes without redoing them")
    p.add_argument("--out", required=True, help="output: NAME.png (image grid) or NAME.pt (raw tensor, torch.save)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sample)

    p = subparsers.add_parser("demo", help="few-step sampling of the bundled digits model against a 200-step reference")
    p.add_argument("--nfe", type=int, default=6, help="budget of the few-step solvers (default: 6)")
    p.add_argument("--num", type=int, default=100, help="samples, labels 0..9 cycled (default: 100)")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--out", default="fewstep-demo.png", help="comparison image (default: ./fewstep-demo.png)")
    p.set_defaults(func=_cmd_demo)

    zoo = subparsers.add_parser("zoo", help="bundled models: list, train, card")
    zsub = zoo.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    zoo.set_defaults(func=lambda args: (zoo.print_help(), 0)[1])

    p = zsub.add_parser("list", help="the bundled models with parameters and FLOPs per call")
    p.set_defaults(func=_cmd_list)

    p = zsub.add_parser("train", help="train a bundled model from its recipe (<= 30 min on 2 CPU cores)")
    p.add_argument("name", help="model name (see `fewstep zoo list`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=None, help="wall-clock cap (default: the recipe's, 30)")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's number of steps")
    p.add_argument("--out", default="zoo-weights", help="output folder (default: ./zoo-weights)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.set_defaults(func=_cmd_train)

    p = zsub.add_parser("card", help="measure a model with the reference solver and write its model card")
    p.add_argument("name")
    p.add_argument("--num", type=int, default=1000, help="samples (default: 1000)")
    p.add_argument("--nfe", type=int, default=200, help="reference solver evaluations (default: 200)")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--unguided", type=int, default=200, help="extra samples without guidance (default: 200; 0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cards", default=None, help="folder for NAME.md/NAME.png (default: the package's cards/)")
    p.add_argument("--weights", default=None, help="folder whose NAME.json gets the numbers (default: the package's)")
    p.set_defaults(func=_cmd_card)


def parse_labels(text: str | None, num: int, num_classes: int | None):
    """``--label`` text to a ``(num,)`` tensor, or ``None`` for unconditional sampling."""
    import torch

    if text is None:
        return None
    if num_classes is None:
        raise ValueError("--label: this model is unconditional; leave --label out")
    if text.strip().lower() == "all":
        values = list(range(num_classes))
    else:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--label: expected an integer, a comma list, or 'all'; got {text!r}") from None
    if not values or any(not 0 <= v < num_classes for v in values):
        raise ValueError(f"--label: each label must be in [0, {num_classes - 1}], got {text!r}")
    return torch.tensor(values, dtype=torch.long).repeat((num + len(values) - 1) // len(values))[:num]


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name}: must be >= 1, got {value}")


def _cmd_sample(args) -> int:
    """``fewstep sample``, also under ``torchrun`` (docs/guides/distributed.md).

    Sample ``i`` takes its noise from a generator seeded by ``(--seed, i)`` and its label from
    ``--label`` at position ``i``; batches of ``--batch-size`` are shared out over the ranks and rank 0
    gathers and writes the output, so any number of processes writes the same file.
    """
    from .. import distributed, zoo
    from .images import save_grid

    _check_positive("--num", args.num)
    _check_positive("--nfe", args.nfe)
    _check_positive("--batch-size", args.batch_size)
    out = Path(args.out)
    if out.suffix not in (".png", ".pt"):
        raise ValueError(f"--out: the name must end in .png (image grid) or .pt (raw tensor), got {args.out!r}")
    model = zoo.load(args.model)
    labels = parse_labels(args.label, args.num, model.null_label)
    zoo.conditioned(model, labels, args.guidance)  # bad --label/--guidance fail here, before any process waits

    def model_for(rows: range):
        # the labels of the batch's own samples: sample i gets label i whatever the batch and rank
        return zoo.conditioned(model, None if labels is None else labels[rows.start:rows.stop], args.guidance)

    options = {} if args.order is None else {"order": args.order}
    solver = args.solver
    if args.path is not None:
        if solver not in (None, "searched"):
            raise ValueError(f"--path: only for the searched solver, got --solver {solver}")
        solver, options["path"] = "searched", args.path
    describe = {"model": args.model, "label": args.label, "guidance": args.guidance}
    with distributed.launched("gloo") as ctx:  # the CLI samples on the CPU: gloo moves CPU tensors
        start = time.perf_counter()
        x, info = distributed.sample_job(
            model, num=args.num, batch_size=args.batch_size, seed=args.seed, ctx=ctx,
            out=out if out.suffix == ".pt" else None, shards=args.shards, model_for=model_for, describe=describe,
            progress=not args.no_progress, return_info=True,
            solver=solver, nfe=args.nfe, grid=args.grid, **options)
        seconds = time.perf_counter() - start
    if not ctx.is_main:
        return 0
    if out.suffix == ".png":
        nrow = 10 if (labels is not None and args.num >= 10) else None
        save_grid(x, out, nrow=nrow, scale=4 if model.sample_shape[-1] <= 16 else 2)
    work = f"{info.calls} network calls in {info.computed} batch{'es' if info.computed != 1 else ''}"
    if ctx.world > 1:
        work += f" on {ctx.world} processes"
    if info.resumed:
        work += f", {info.resumed} of {info.batches} batches resumed from {args.shards}"
    print(f"{model.name}: {args.num} samples, solver {info.solver}, {info.nfe} NFE ({work}), {seconds:.2f} s -> {out}")
    return 0


def run_demo(nfe: int = 6, num: int = 100, guidance: float = 2.0, seed: int = 0, out: str | Path = "fewstep-demo.png",
             print_fn=print) -> list[dict]:
    """The demo behind ``make demo``; returns its table rows (see :func:`_cmd_demo`)."""
    import torch

    from .. import solvers, zoo
    from ..sample import recommended, sample
    from . import data
    from .cards import REFERENCE_NFE, REFERENCE_SOLVER, reference_samples
    from .classifier import fd_digits
    from .images import make_grid, encode_png, upscale
    from ..bench.report import atomic_path, markdown_table

    _check_positive("nfe", nfe)
    _check_positive("num", num)
    model = zoo.load("digits16")
    clf = zoo.load("digits-classifier")
    labels = torch.arange(num) % 10
    noise = torch.randn(num, *model.sample_shape, generator=torch.Generator().manual_seed(seed))
    m = zoo.conditioned(model, labels, guidance)

    start = time.perf_counter()
    ref = reference_samples(model, noise, labels, guidance, progress=True)
    ref_seconds = time.perf_counter() - start
    rows = [{"solver": f"{REFERENCE_SOLVER} (reference)", "nfe": REFERENCE_NFE, "rmse": 0.0,
             "fd": fd_digits(ref, classifier=clf), "seconds": ref_seconds, "x": ref}]

    default_name, default_opts = recommended(nfe)
    candidates = [(None, f"{default_name} (default)"), ("ddim", "ddim")]
    for solver, label in candidates:
        name = default_name if solver is None else solver
        if name not in solvers.available():
            rows.append({"solver": label, "nfe": nfe, "rmse": float("nan"), "fd": float("nan"), "seconds": float("nan"),
                         "x": None, "note": f"solver {name!r} is not registered in this build"})
            continue
        start = time.perf_counter()
        x = sample(m, noise, solver=solver, nfe=nfe)
        seconds = time.perf_counter() - start
        rmse = float((x - ref).pow(2).mean().sqrt())
        rows.append({"solver": label, "nfe": nfe, "rmse": rmse, "fd": fd_digits(x, classifier=clf), "seconds": seconds, "x": x})

    print_fn(f"digits16 ({model.info['parameters']:,} parameters, {model.info['flops_per_call'] / 1e6:.1f} MFLOP per call), "
             f"{num} samples, labels 0-9, guidance {guidance:g}, noise seed {seed}")
    print_fn(markdown_table(["solver", "NFE", "RMSE to reference", "FD-digits", "seconds"],
                            [[r["solver"], r["nfe"], r["rmse"], r["fd"], r["seconds"]] for r in rows]))
    for r in rows:
        if r.get("note"):
            print_fn(f"note: {r['note']}")
    baseline = fd_digits(data.digits16("train").images, classifier=clf)
    print_fn(f"FD-digits between the training and held-out halves of the data: {baseline:.2f} "
             f"(with {num} samples FD-digits carries a small-sample bias; compare the rows with each other)")

    # one image: a block of 2 rows x 10 digits per method, methods stacked top to bottom in table order
    shown = [r for r in rows if r["x"] is not None]
    k = min(20, num)
    blocks = [make_grid(r["x"][:k], nrow=10, padding=1) for r in shown]
    gap = torch.ones(blocks[0].shape[0], 3, blocks[0].shape[2])
    image = torch.cat([t for b in blocks for t in (b, gap)][:-1], dim=1)
    out = Path(out)
    with atomic_path(out) as tmp:
        Path(tmp).write_bytes(encode_png(upscale(image, 4)))
        os.chmod(tmp, 0o644)
    total = sum(r["seconds"] for r in rows if r["seconds"] == r["seconds"])
    print_fn(f"sampling time, all rows together: {total:.1f} s")
    print_fn(f"comparison image: {out.resolve()}  (blocks top to bottom: "
             + ", ".join(r["solver"] for r in shown) + "; columns are digits 0-9)")
    return [{k: v for k, v in r.items() if k != "x"} for r in rows]


def _cmd_demo(args) -> int:
    run_demo(nfe=args.nfe, num=args.num, guidance=args.guidance, seed=args.seed, out=args.out)
    return 0


def _cmd_list(args) -> int:
    from .. import zoo
    from ..bench.report import markdown_table

    rows = zoo.list_models()
    print(markdown_table(
        ["name", "alias of", "kind", "conditional", "parameters", "MFLOP per call", "sample shape", "final loss"],
        [[r["name"], r["alias_of"] or "-", r["kind"], r["conditional"], r["parameters"],
          (r["flops_per_call"] or 0) / 1e6, "x".join(map(str, r["sample_shape"])), r["final_loss"]] for r in rows],
    ))
    return 0


def _cmd_train(args) -> int:
    from .train import train

    r = train(args.name, seed=args.seed, minutes=args.minutes, steps=args.steps, out_dir=args.out,
              progress=True, threads=args.threads)
    print(f"{r.name}: {r.steps_done} steps in {r.seconds / 60:.1f} min, final loss {r.final_loss:.4f} -> {r.path}")
    return 0


def _cmd_card(args) -> int:
    from . import CARDS_DIR, WEIGHTS_DIR
    from .cards import evaluate, write_card

    from . import ALIASES

    name = ALIASES.get(args.name, args.name)
    ev = evaluate(name, num=args.num, guidance=args.guidance, seed=args.seed, nfe=args.nfe, unguided=args.unguided)
    path = write_card(name, ev, cards_dir=args.cards or CARDS_DIR, weights_dir=args.weights or WEIGHTS_DIR)
    for k, v in ev["result"].items():
        print(f"{k}: {v}")
    print(f"card: {path}")
    return 0
