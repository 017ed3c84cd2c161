"""Drop-in adapters for the tools people already run.

* :mod:`fewstep.integrations.diffusers` – :class:`~fewstep.integrations.diffusers.FewstepScheduler`,
  a diffusers scheduler (``SchedulerMixin``/``ConfigMixin``) that drives any fewstep solver inside
  any diffusers pipeline, VP (DDPM, Stable Diffusion) or flow matching (SD3, Flux).
* :mod:`fewstep.integrations.kdiffusion` – ``sample_<solver>(model, x, sigmas, extra_args,
  callback, disable, **options)`` functions with k-diffusion's denoiser convention, for ComfyUI,
  A1111 and anything else that calls k-diffusion samplers.

Both adapters run the same solver generators as :func:`fewstep.sample`, so they give the same
numbers. The submodules are imported on first access: ``import fewstep`` (and even
``import fewstep.integrations``) never imports diffusers.

Example::

    from fewstep.integrations.diffusers import FewstepScheduler
    pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler.config, solver="unipc", order=3)
"""
from __future__ import annotations

import importlib

__all__ = ["diffusers", "kdiffusion", "FLOW_START", "prepare_plan"]

#: Where a flow grid starts for solvers that cannot start at pure noise (``alpha = 0`` at ``t = 1``;
#: those integrating in ``x / alpha``, e.g. heun, deis, ipndm). Pipelines hand over pure noise, which
#: is then taken as the state at this time: an error of ``1e-3 * (x0 - noise)``, the start the
#: solvers themselves suggest (``RectifiedFlow(t_max=0.999)``).
FLOW_START = 0.999


def prepare_plan(solver, schedule, times):
    """``(solver.prepare(schedule, times), times)``, moving a pure-noise start to :data:`FLOW_START`
    when the solver refuses it (both adapters use this, so their grids agree)."""
    try:
        return solver.prepare(schedule, times), times
    except ValueError:
        pure_noise = float(schedule.alpha(times[:1])[0]) <= 0.0
        if not pure_noise or (times.numel() > 1 and float(times[1]) >= FLOW_START):
            raise
    nudged = times.clone()
    nudged[0] = FLOW_START
    return solver.prepare(schedule, nudged), nudged


def __getattr__(name):
    # Lazy: diffusers is an optional dependency and heavy to import.
    if name in ("diffusers", "kdiffusion"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
