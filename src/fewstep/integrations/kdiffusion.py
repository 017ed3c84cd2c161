"""k-diffusion-style sampler functions for every fewstep solver (ComfyUI, A1111, k-diffusion users).

Each ``sample_<solver>`` has k-diffusion's signature and conventions::

    x0 = sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, order=3)

* ``model(x, sigma, **extra_args)`` returns the *denoised* x0 (k-diffusion's denoiser convention);
  ``sigma`` is a tensor with one entry per sample.
* ``x`` is already scaled to ``sigmas[0]`` (variance exploding: ``x = x0 + sigma * noise``).
* ``sigmas`` is a decreasing 1-D tensor. If it ends in 0 (the usual case), the sigmas before that 0
  are the solver's grid and the solver finishes with its step to zero noise, so one-evaluation
  solvers make exactly ``len(sigmas) - 1`` calls, as k-diffusion's do. If it ends above 0 (ComfyUI's
  split sigmas), the run stops at ``sigmas[-1]`` and returns the solver's state there.
* ``callback`` gets ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` once per step: the state and
  the denoised prediction at the step's first evaluation, at ``sigmas[i]``.
* ``disable`` is passed to the tqdm bar (``None``: shown on terminals only, as k-diffusion).
* Other keywords are the solver's options (``order=``, ``eta=``...); ``generator=`` or
  ``noise_sampler=`` (k-diffusion's ``(sigma, sigma_next) -> noise``), else ``extra_args["seed"]``
  (ComfyUI passes one), seed the stochastic solvers.

Internally the run is fewstep's EDM schedule (``alpha = 1``, ``sigma = t``) with an ``"x0"`` model, so
the numbers equal ``fewstep.sample`` on that schedule (tested). Flow-matching models in ComfyUI
(``model_sampling`` CONST: ``x = (1 - sigma) x0 + sigma noise``) are detected and run on fewstep's
rectified-flow schedule instead; ``flow=True``/``False`` overrides the detection.

Function names: the solver's name with ``++`` spelled ``pp`` and ``-`` as ``_`` (``sample_dpmpp``,
``sample_forward_value``); every registered solver has one, including solvers added later
(module ``__getattr__``). ``sample_euler`` (fewstep's DDIM) and ``sample_dpmpp_2m`` (DPM-Solver++
order 2) are k-diffusion's Euler and DPM++ 2M step for step (tested).

Example::

    >>> import torch
    >>> from fewstep.integrations import kdiffusion
    >>> denoiser = lambda x, sigma: torch.zeros_like(x)            # data concentrated at 0
    >>> sigmas = torch.tensor([10.0, 1.0, 0.1, 0.0])
    >>> kdiffusion.sample_dpmpp_2m(denoiser, torch.randn(2, 3) * 10.0, sigmas).abs().max().item()
    0.0
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import torch

from .. import grids as _grids
from .. import solvers as _solvers
from ..model import Model, combine_view, view_coefficients
from ..noise import NoiseSource
from ..sample import FiniteGuard
from ..schedules import EDM, RectifiedFlow
from ..solvers.base import Evaluate, Solver, StepDone
from . import prepare_plan

__all__ = ["sampler", "solve", "available", "function_name"]

# Explicit functions for the main solvers (documentation, IDE completion); the rest come from
# __getattr__. Solvers are looked up when a function is called, so these exist before their
# modules are written and stay current when options change.
_EXPLICIT = {
    "sample_ddim": ("ddim", {}),
    "sample_euler": ("euler", {}),
    "sample_heun": ("heun", {}),
    "sample_dpmpp": ("dpm++", {}),
    "sample_dpmpp_2m": ("dpm++", {"order": 2}),
    "sample_unipc": ("unipc", {}),
    "sample_deis": ("deis", {}),
    "sample_ipndm": ("ipndm", {}),
    "sample_heroism": ("heroism", {}),
    "sample_fv": ("fv", {}),
    "sample_sa": ("sa", {}),
    "sample_ddpm": ("ddpm", {}),
    "sample_em": ("em", {}),
}


def function_name(solver: str) -> str:
    """The ``sample_*`` name of a solver: ``dpm++`` -> ``sample_dpmpp``, ``sa-solver`` -> ``sample_sa_solver``."""
    return "sample_" + re.sub(r"[^0-9a-zA-Z_]", "_", solver.replace("+", "p"))


def available() -> list[str]:
    """Every ``sample_*`` function this module provides (registered solvers, aliases, explicit ones)."""
    names = {function_name(n) for n in _solvers.available()}
    names.update(k for k, (solver, _) in _EXPLICIT.items() if solver in _solvers.available())
    return sorted(names)


def sampler(solver: str | Solver, **defaults) -> Callable[..., torch.Tensor]:
    """A k-diffusion-style function running ``solver`` (with ``defaults`` as its options).

    Example (a ComfyUI custom sampler)::

        comfy.samplers.KSAMPLER(kdiffusion.sampler("unipc", order=3))
    """
    name = solver.name if isinstance(solver, Solver) else solver

    def sample_fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        return solve(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                     solver=solver, **{**defaults, **options})

    sample_fn.__name__ = sample_fn.__qualname__ = function_name(name)
    sample_fn.__doc__ = (f"k-diffusion-style sampler running fewstep's {name!r} solver"
                         + (f" with {defaults}" if defaults else "")
                         + ".\n\nSee :mod:`fewstep.integrations.kdiffusion` for the conventions.")
    return sample_fn


for _fn_name, (_solver, _defaults) in _EXPLICIT.items():
    globals()[_fn_name] = sampler(_solver, **_defaults)
__all__ += list(_EXPLICIT)


_GENERATED: dict[str, Callable] = {}


def _generated(fn_name: str):
    # looked up on each miss (not cached as missing): solvers may register after a first lookup
    if fn_name not in _GENERATED:
        for solver in _solvers.available():
            if function_name(solver) == fn_name:
                _GENERATED[fn_name] = sampler(solver)
                break
    return _GENERATED.get(fn_name)


def __getattr__(name: str):
    if name.startswith("sample_"):
        fn = _generated(name)
        if fn is not None:
            return fn
        raise AttributeError(f"{__name__}: no solver for {name!r}; available: {available()}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(available()))


# ------------------------------------------------------------------------------------- driver
def solve(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callable[[dict], Any] | None = None,
    disable: bool | None = None,
    *,
    solver: str | Solver,
    generator: torch.Generator | list | None = None,
    noise_sampler: Callable | None = None,
    flow: bool | None = None,
    **options,
) -> torch.Tensor:
    """Run fewstep ``solver`` with k-diffusion's conventions (see the module docstring).

    Example::

        x0 = solve(denoiser, noise * sigmas[0], sigmas, solver="dpm++", order=3)
    """
    if not callable(model):
        raise TypeError(f"model: expected a denoiser model(x, sigma, **extra_args) -> x0, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating torch.Tensor, got {type(x).__name__}")
    if isinstance(solver, Solver):
        if options:
            raise ValueError(f"options {sorted(options)}: pass them to the solver instance instead")
        solver_obj = solver
    else:
        solver_obj = _solvers.get(solver, **options)
    extra_args = dict(extra_args or {})

    levels = _host_sigmas(sigmas)  # the one host copy of the sigmas (a sync if they live on a GPU)
    to_zero = levels[-1] == 0.0
    grid = torch.tensor(levels[:-1] if to_zero else levels, dtype=torch.float64)
    if flow is None:
        flow = _is_flow_model(model)
    if flow:
        if float(grid[0]) > 1.0:
            raise ValueError(f"sigmas: a flow model's sigmas lie in (0, 1], got sigmas[0] = {float(grid[0]):g}")
        schedule = RectifiedFlow(t_min=min(1e-3, float(grid[-1])), t_max=1.0)
    else:
        # fewstep's default EDM range, widened to hold the grid (the range only bounds the grid)
        schedule = EDM(sigma_min=min(0.002, float(grid[-1])), sigma_max=max(80.0, float(grid[0])))
    times = _grids.validate(grid, schedule, "sigmas")
    plan, times = prepare_plan(solver_obj, schedule, times)
    view = solver_obj.view(plan)

    # A plain function: fewstep.Model would otherwise cast inputs to an nn.Module's parameter dtype,
    # which k-diffusion wrappers (and ComfyUI's) do themselves.
    fmodel = Model(lambda xt, sigma, **kw: model(xt, sigma, **kw), schedule, "x0", cond=extra_args,
                   name=getattr(model, "__name__", type(model).__name__))
    noise = _noise(solver_obj, x, generator, noise_sampler, extra_args, sigmas, times, schedule)
    guard = FiniteGuard(x.device, solver_obj.name)
    bar = _bar(len(levels) - 1, disable)
    stop_at = None if to_zero else float(times[-1])

    run = solver_obj.run(plan, x, noise)
    first_eval: dict[int, tuple] = {}  # step -> (x, node, prediction) of its first evaluation
    last_eval = None
    out = None
    try:
        msg = next(run)
        while True:
            if type(msg) is Evaluate:
                if stop_at is not None and msg.model is None and msg.nodes[0].t == stop_at:
                    out = msg.xs[0]  # the solver's state at the last sigma, before evaluating there
                    run.close()
                    break
                preds = (msg.model or fmodel).evaluate(msg.xs, msg.nodes, view, scaled=msg.scaled)
                guard.check(preds, msg)
                last_eval = (msg.xs[0], msg.nodes[0], preds[0])
                first_eval.setdefault(msg.step, last_eval)
                msg = run.send(preds)
            else:
                if type(msg) is StepDone:
                    if callback is not None:
                        callback(_callback_dict(msg.i, first_eval.get(msg.i, last_eval), view, sigmas))
                    if bar is not None:
                        bar.update(1)
                msg = run.send(None)
    except StopIteration as stop:
        out = stop.value
    finally:
        if bar is not None:
            bar.close()
    guard.finish(out)
    return out


def _host_sigmas(sigmas) -> list[float]:
    s = torch.as_tensor(sigmas).detach()
    if s.dim() != 1 or s.numel() < 2:
        raise ValueError(f"sigmas: expected a 1-D tensor of at least 2 noise levels, got shape {tuple(s.shape)}")
    levels = s.to(device="cpu", dtype=torch.float64).tolist()
    if not all(math.isfinite(v) for v in levels) or levels[-1] < 0.0:
        raise ValueError(f"sigmas: expected finite, non-negative noise levels, got {levels[:8]}...")
    if any(b >= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"sigmas: must be strictly decreasing (noisy to clean), got {levels[:8]}...")
    return levels


def _is_flow_model(model) -> bool:
    """ComfyUI flow models (SD3, Flux, ...) carry a ``model_sampling`` of class CONST."""
    inner = getattr(model, "inner_model", None)
    sampling = None
    patcher = getattr(inner, "model_patcher", None)
    if patcher is not None and hasattr(patcher, "get_model_object"):
        try:
            sampling = patcher.get_model_object("model_sampling")
        except Exception:  # a patcher without it: fall through to the attribute
            sampling = None
    if sampling is None:
        sampling = getattr(getattr(inner, "inner_model", None), "model_sampling", None)
    return sampling is not None and any(c.__name__ == "CONST" for c in type(sampling).__mro__)


def _noise(solver, x, generator, noise_sampler, extra_args, sigmas, times, schedule):
    if not solver.stochastic:
        return None
    if noise_sampler is not None:
        if not callable(noise_sampler):
            raise TypeError(f"noise_sampler: expected a callable (sigma, sigma_next) -> noise, got {type(noise_sampler).__name__}")
        levels = list(sigmas) if isinstance(sigmas, torch.Tensor) else [torch.as_tensor(s) for s in sigmas]
        return lambda i: noise_sampler(levels[i], levels[i + 1])
    if generator is None and extra_args.get("seed") is not None:
        generator = torch.Generator(device=x.device).manual_seed(int(extra_args["seed"]))
    return NoiseSource(x, generator, times=times, schedule=schedule)


def _callback_dict(i: int, evaluation, view: str, sigmas) -> dict:
    x_eval, node, pred = evaluation if evaluation is not None else (None, None, None)
    if type(pred) is tuple:  # a scaled answer (u, s) means s * u
        pred = pred[0] * pred[1]
    denoised = pred
    if pred is not None and view != "x0":
        cx, co = view_coefficients("flow" if view == "velocity" else view, "x0", node)
        denoised = combine_view(x_eval, pred, cx, co)
    sigma = sigmas[i] if i < len(sigmas) else sigmas[-1]
    return {"x": x_eval, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised}


def _bar(total: int, disable):
    if disable is True:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=disable)

