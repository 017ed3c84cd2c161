"""A diffusers scheduler that runs any fewstep solver inside any diffusers pipeline.

:class:`FewstepScheduler` follows diffusers' ``SchedulerMixin``/``ConfigMixin`` contract, so it swaps
in with the usual idiom and saves/loads with the pipeline::

    from fewstep.integrations.diffusers import FewstepScheduler

    pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler.config, solver="unipc", order=3)
    image = pipe(prompt, num_inference_steps=8).images[0]      # 8 network evaluations

It reads the noise schedule from the pipeline's config: DDPM/Stable-Diffusion style VP tables
(``beta_schedule`` linear, scaled_linear, squaredcos_cap_v2, sigmoid or ``trained_betas``;
``prediction_type`` epsilon, v_prediction or sample) and flow-matching configs (SD3/Flux style
``FlowMatchEulerDiscreteScheduler``, with ``shift`` or dynamic shifting through ``mu``).

How it works: ``set_timesteps`` builds the grid and the solver's plan (float64 coefficients, once)
and traces which evaluations the solver will request; ``timesteps`` lists every one of them, so a
pipeline calls the network — and ``step()`` — once per evaluation, and solvers with several
evaluations per step (Heun, batched Jacobi sweeps) need no pipeline change. Each ``step()`` turns the
network output into the solver's view with the exact linear map of
:func:`fewstep.model.view_coefficients`, sends it to the SAME generator :func:`fewstep.sample`
drives, and returns the state of the next requested evaluation; the last call returns the clean
sample. The result equals ``fewstep.sample`` on the same network and noise (tested).

Budget semantics are fewstep's: ``num_inference_steps=N`` with a named grid means N network
evaluations. Explicit ``timesteps=`` (VP, in timestep units) or ``sigmas=`` (VP: diffusers' VE sigmas
``sqrt((1 - alphas_cumprod) / alphas_cumprod)``; flow: sigma in (0, 1], shifted like
``FlowMatchEulerDiscreteScheduler`` does) are the grid points themselves, so solvers with several
evaluations per step then spend more than one call per point, as diffusers' Heun does.

Where a pipeline reads them, ``timesteps`` are what its network expects: the float timestep in
``[0, num_train_timesteps - 1]`` for VP models, ``sigma * num_train_timesteps`` for flow models.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput

from .. import grids as _grids
from .. import solvers as _solvers
from ..model import _check_prediction, combine_view, view_coefficients
from ..noise import NoiseSource
from ..sample import default_grid, recommended
from ..schedules import DiscreteVP, Node, RectifiedFlow, Schedule
from ..solvers.base import Evaluate, Solver
from . import prepare_plan

__all__ = ["FewstepScheduler", "KINDS", "BETA_SCHEDULES", "flow_shift"]

KINDS = ("vp", "flow")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
_TIME_SHIFTS = ("exponential", "linear")
F64 = torch.float64


# ----------------------------------------------------------------------------------- schedules
def _vp_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
              trained_betas) -> torch.Tensor:
    """diffusers' beta tables, float64.

    Named schedules are computed in float32 exactly as diffusers' schedulers compute them (the table
    the network was trained with, and ``DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000))``),
    then accumulated in float64; ``trained_betas`` keep the precision they are given in.
    """
    n = num_train_timesteps
    f32 = torch.float32
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=F64).reshape(-1)
        if betas.numel() != n:
            raise ValueError(f"trained_betas: expected {n} values (num_train_timesteps), got {betas.numel()}")
        return betas
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=f32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=f32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal (2021), eq. (17), with betas capped at 0.999 as in diffusers
        def alpha_bar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=f32)
    elif beta_schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6.0, 6.0, n)) * (beta_end - beta_start) + beta_start
    else:
        raise ValueError(f"beta_schedule: unknown {beta_schedule!r}; valid: {list(BETA_SCHEDULES)} (or trained_betas=)")
    return betas.to(F64)


def _zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2024), Algorithm 1: shift and scale sqrt(alphas_cumprod) so the last is 0.

    The last value is then set to 2**-24 (as diffusers' multistep schedulers do) so that the first
    grid point keeps a finite log-SNR."""
    root = alphas_cumprod.sqrt()
    first, last = float(root[0]), float(root[-1])
    root = (root - last) * (first / (first - last))
    ac = root**2
    ac[-1] = 2.0**-24
    return ac


def flow_shift(sigmas: torch.Tensor, *, shift: float = 1.0, mu: float | None = None,
               time_shift_type: str = "exponential") -> torch.Tensor:
    """Shift flow-matching sigmas as ``FlowMatchEulerDiscreteScheduler`` does.

    Static (SD3): ``s * sigma / (1 + (s - 1) * sigma)``. Dynamic (Flux, ``mu`` given): exponential
    ``e^mu / (e^mu + 1/sigma - 1)`` or linear ``mu / (mu + 1/sigma - 1)``. Float64.

    Example::

        >>> flow_shift(torch.tensor([1.0, 0.5], dtype=torch.float64), shift=3.0)
        tensor([1.0000, 0.7500], dtype=torch.float64)
    """
    s = torch.as_tensor(sigmas, dtype=F64)
    if mu is None:
        return shift * s / (1.0 + (shift - 1.0) * s)
    odds = 1.0 / s - 1.0
    if time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + odds)
    return mu / (mu + odds)


def _trace(solver: Solver, plan) -> tuple[list[tuple[Node, int]], bool]:
    """Run the solver once on a dummy state to list the evaluations it requests, in order.

    Returns ``([(node, step), ...], warm_up)``. ``warm_up`` is True when the first request is not at
    the initial state (solvers whose first prediction is free): a pipeline always evaluates its
    initial latents first, so that call is spent and its output discarded. The evaluation sequence
    of every fewstep solver is fixed by its plan (no data-dependent steps), which is what makes a
    diffusers ``timesteps`` list possible at all.
    """
    x = torch.full((1, 1), 0.731, dtype=F64)
    run = solver.run(plan, x, lambda i: torch.zeros_like(x))
    evals: list[tuple[Node, int]] = []
    warm_up = None
    try:
        msg = next(run)
        while True:
            if type(msg) is Evaluate:
                replies = [torch.zeros_like(xi) for xi in msg.xs]
                if msg.model is None:  # requests for other models are served inside step()
                    if warm_up is None:
                        warm_up = not torch.equal(msg.xs[0], x)
                    evals.extend((node, msg.step) for node in msg.nodes)
                msg = run.send(replies)
            else:
                msg = run.send(None)
    except StopIteration:
        pass
    return evals, bool(warm_up)


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    """Any fewstep solver as a diffusers scheduler (VP and flow-matching pipelines).

    Args:
        solver: a name from :func:`fewstep.solvers.available` (default: :func:`fewstep.recommended`
            for the budget).
        order: the solver's order, for solvers that take one.
        solver_options: other solver options as a dict (JSON-serialisable, saved with the pipeline).
        grid: a name from :data:`fewstep.grids.NAMES`. ``None`` (default) follows the pipeline: explicit
            ``timesteps``/``sigmas`` are the grid; otherwise ``"logsnr"`` for VP models and the
            (shifted) flow-matching spacing of ``FlowMatchEulerDiscreteScheduler`` for flow models.
            A name always wins: pipeline ``sigmas`` (Flux passes some) then only set the budget.
        seed: seeds stochastic solvers when the pipeline passes no ``generator`` to ``step`` (flow
            pipelines never do); a generator on the state's device.
        kind: ``"vp"`` or ``"flow"``; ``from_config`` detects it from the config it is given.
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr,
        prediction_type: as in diffusers' VP schedulers (``prediction_type`` also takes
            ``flow_prediction``, the default for flow configs).
        variance_type: ``"learned"``/``"learned_range"`` networks also output a variance in extra
            channels; only the prediction (the first channels) is used, as diffusers' ODE schedulers do.

    diffusers' other per-scheduler options (``timestep_spacing``, ``solver_order``, ``clip_sample``,
    ``thresholding``, ``final_sigmas_type``...) are not used: the grid, the solver and its options
    replace them.
        shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len, max_image_seq_len,
        time_shift_type, shift_terminal: as in ``FlowMatchEulerDiscreteScheduler``.
        use_flow_sigmas, flow_shift: diffusers' flow mode of its VP multistep schedulers.
        use_karras_sigmas, use_exponential_sigmas: select the ``"karras"`` / ``"logsnr"`` grid.

    Example::

        >>> from fewstep.integrations.diffusers import FewstepScheduler
        >>> sch = FewstepScheduler(solver="ddim", beta_schedule="scaled_linear",
        ...                        beta_start=0.00085, beta_end=0.012)
        >>> sch.set_timesteps(4)
        >>> [round(float(t), 2) for t in sch.timesteps]
        [999.0, 538.07, 52.38, 0.0]
    """

    # Every diffusers scheduler: their config keys are then dropped silently by from_config.
    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + [
        "FlowMatchEulerDiscreteScheduler",
        "FlowMatchHeunDiscreteScheduler",
    ]
    # Pipelines call step() once per element of `timesteps`, which already lists every evaluation.
    order = 1

    @register_to_config
    def __init__(
        self,
        solver: str | None = None,
        order: int | None = None,
        solver_options: dict | None = None,
        grid: str | None = None,
        seed: int | None = None,
        kind: str | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        rescale_betas_zero_snr: bool = False,
        prediction_type: str | None = None,
        variance_type: str | None = None,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        invert_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
    ):
        if kind is None:
            kind = "flow" if (use_flow_sigmas or prediction_type in ("flow_prediction", "flow")) else "vp"
        if kind not in KINDS:
            raise ValueError(f"kind: unknown {kind!r}; valid: {list(KINDS)}")
        if prediction_type is None:
            prediction_type = "flow_prediction" if kind == "flow" else "epsilon"
        self._prediction = _check_prediction(prediction_type)
        self._split_variance = variance_type in ("learned", "learned_range")
        # Record what was resolved, so save_config/from_pretrained rebuild the same scheduler.
        self.register_to_config(kind=kind, prediction_type=prediction_type)

        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps: expected an integer >= 2, got {num_train_timesteps!r}")
        if grid is not None and grid not in _grids.NAMES:
            raise ValueError(f"grid: unknown name {grid!r}; valid: {list(_grids.NAMES)} or None (follow the pipeline)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed: expected an integer or None, got {seed!r}")
        if solver_options is not None and not isinstance(solver_options, dict):
            raise TypeError(f"solver_options: expected a dict of solver options, got {type(solver_options).__name__}")
        if time_shift_type not in _TIME_SHIFTS:
            raise ValueError(f"time_shift_type: unknown {time_shift_type!r}; valid: {list(_TIME_SHIFTS)}")
        if invert_sigmas:
            raise ValueError("invert_sigmas: not supported by FewstepScheduler (fewstep always integrates to zero noise)")
        if use_beta_sigmas:
            raise ValueError("use_beta_sigmas: not supported; use grid= one of "
                             f"{list(_grids.NAMES)} (use_karras_sigmas / use_exponential_sigmas map to karras / logsnr)")
        if use_karras_sigmas and use_exponential_sigmas:
            raise ValueError("use_karras_sigmas, use_exponential_sigmas: choose at most one")

        self._fixed_solver = self._build_solver(solver) if solver is not None else None
        if kind == "vp":
            betas = _vp_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
            ac = torch.cumprod(1.0 - betas, dim=0)
            self.schedule: Schedule = DiscreteVP(_zero_terminal_snr(ac) if rescale_betas_zero_snr else ac)
        else:
            self.schedule = RectifiedFlow(t_min=1.0 / num_train_timesteps, t_max=1.0, time_scale=num_train_timesteps)

        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self.num_inference_steps = None
        self.grid_times = None
        self.fewstep_solver = self._fixed_solver
        self._begin_index = None
        self._reset_run()

    # ------------------------------------------------------------------------ config plumbing
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Build from any scheduler's config (VP or flow matching is detected from it).

        Example::

            pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler.config, solver="dpm++", order=2)
        """
        if isinstance(config, dict) and "kind" not in kwargs:
            kwargs["kind"] = _detect_kind(config)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _build_solver(self, name: str) -> Solver:
        opts = dict(self.config.solver_options or {})
        if self.config.order is not None:
            opts["order"] = self.config.order
        return _solvers.get(name, **opts)

    # ------------------------------------------------------------------------ diffusers surface
    @property
    def init_noise_sigma(self) -> float:
        """Pipelines multiply their standard normal latents by this (1 for VP and flow models; the
        searched start's ``sigma(t_0)`` for a searched solver that starts below ``t_max``)."""
        start_sigma = getattr(getattr(self, "_plan", None), "start_sigma", None)
        return float(self.schedule.initial_scale if start_sigma is None else start_sigma)

    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next ``step()`` call (None before the first)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    @property
    def nfe(self) -> int:
        """Network evaluations per run (``len(timesteps)``)."""
        return len(self._evals)

    @property
    def discards_first_call(self) -> bool:
        """True when the solver's first prediction is free (forward-value samplers): the pipeline still
        evaluates its initial latents first, and that output is discarded (one call over the budget)."""
        return self._warm_up

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next run at ``timesteps[begin_index]`` (img2img pipelines call this).

        A run that starts later than 0 re-plans the solver on the rest of the grid; ``begin_index``
        must be an evaluation at a grid point from which that plan makes the remaining listed
        evaluations (always true for one-evaluation solvers); otherwise ``ValueError``.
        """
        if isinstance(begin_index, bool) or not isinstance(begin_index, int) or begin_index < 0:
            raise ValueError(f"begin_index: expected an integer >= 0, got {begin_index!r}")
        self._begin_index = begin_index
        self._start_plan = None
        if begin_index > 0 and self._plan is not None:
            self._start_plan = self._plan_from(begin_index)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity: the state is already what the network expects (VP or flow coordinates)."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The forward process ``alpha(t) x0 + sigma(t) noise`` at network timesteps (img2img, training)."""
        alpha, sigma = self._alpha_sigma(timesteps, original_samples)
        return alpha * original_samples + sigma * noise

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching pipelines' name for :meth:`add_noise`: ``(1 - sigma) x0 + sigma noise``."""
        if noise is None:
            raise ValueError("noise: scale_noise needs the noise tensor")
        return self.add_noise(sample, noise, timestep)

    def _alpha_sigma(self, timesteps, like: torch.Tensor):
        t_net = torch.as_tensor(timesteps).detach().to(device="cpu", dtype=F64).reshape(-1)
        t = self.schedule.t_of_model_time(t_net)
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        shape = (-1,) + (1,) * (like.dim() - 1)
        cast = dict(device=like.device, dtype=like.dtype)
        return alpha.reshape(shape).to(**cast), sigma.reshape(shape).to(**cast)

    # ------------------------------------------------------------------------ set_timesteps
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Build the grid and the solver plan; list every network evaluation in ``timesteps``.

        Args:
            num_inference_steps: network evaluation budget (with a named grid, never exceeded).
            device: where ``timesteps`` (and, for flow models, ``sigmas``) live.
            timesteps: explicit grid in network timestep units (decreasing).
            sigmas: explicit grid as sigmas (VP: VE sigmas; flow: sigma in (0, 1], then shifted).
            mu: dynamic shift of flow models (Flux computes it from the image size).
        """
        cfg = self.config
        if timesteps is not None and sigmas is not None:
            raise ValueError("timesteps, sigmas: pass at most one of them")
        explicit = timesteps if timesteps is not None else sigmas
        if num_inference_steps is not None:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps: expected an integer >= 1, got {num_inference_steps!r}")
            budget = num_inference_steps
        elif explicit is not None:
            budget = len(explicit)
        else:
            raise ValueError("num_inference_steps: required unless timesteps= or sigmas= is given")
        if mu is not None and cfg.kind != "flow":
            raise ValueError("mu: only flow-matching configs take a dynamic shift")
        if cfg.kind == "flow" and cfg.use_dynamic_shifting and mu is None:
            raise ValueError("mu: required when use_dynamic_shifting=True (the pipeline computes it from the image size)")

        solver = self._fixed_solver
        if solver is None:
            name, defaults = recommended(budget)
            opts = {**defaults, **(cfg.solver_options or {})}
            if cfg.order is not None:
                opts["order"] = cfg.order
            solver = _solvers.get(name, **opts)

        grid_name = cfg.grid or ("karras" if cfg.use_karras_sigmas else "logsnr" if cfg.use_exponential_sigmas else None)
        if grid_name is None and explicit is not None:
            times = self._explicit_times(timesteps, sigmas, mu)
        elif budget < solver.min_nfe():
            raise ValueError(f"num_inference_steps: {solver.name} with these options needs >= {solver.min_nfe()} "
                             f"evaluations, got {budget}")
        elif grid_name is None and cfg.kind == "flow":
            times = self._flow_default_times(solver.num_points(budget), mu)
        else:
            times = _grids.make(grid_name or default_grid(self.schedule), self._grid_schedule(mu),
                                solver.num_points(budget))
        if cfg.kind == "flow" and float(times.min()) < self.schedule.t_min:
            # custom flow sigmas below 1/num_train_timesteps: widen the range rather than refuse them
            self.schedule = RectifiedFlow(t_min=float(times.min()), t_max=1.0, time_scale=cfg.num_train_timesteps)
        times = _grids.validate(times, self.schedule, "sigmas" if sigmas is not None else "timesteps")

        plan, times = prepare_plan(solver, self.schedule, times)
        view = solver.view(plan)
        evals, warm_up = _trace(solver, plan)
        if warm_up:
            evals.insert(0, (self.schedule.node(float(times[0])), -1))
        coeffs = [None if (warm_up and k == 0) else view_coefficients(self._prediction, view, node)
                  for k, (node, _) in enumerate(evals)]

        self.fewstep_solver = solver
        self.grid_times = times
        self.num_inference_steps = num_inference_steps if num_inference_steps is not None else budget
        self._plan, self._view, self._warm_up = plan, view, warm_up
        self._evals, self._coeffs = evals, coeffs
        net_times = [node.model_time for node, _ in evals]
        self._net_times = net_times
        self.timesteps = torch.tensor(net_times, dtype=torch.float32, device=device)
        if cfg.kind == "vp":
            # diffusers' VP sigmas are VE sigmas sigma/alpha, kept on the CPU like its multistep schedulers
            self.sigmas = torch.tensor([n.sigma / n.alpha for n, _ in evals] + [0.0], dtype=torch.float32)
        else:
            self.sigmas = torch.tensor([n.sigma for n, _ in evals] + [0.0], dtype=torch.float32, device=device)
        self._begin_index = None
        self._start_plan = None
        self._reset_run()

    def _explicit_times(self, timesteps, sigmas, mu) -> torch.Tensor:
        cfg = self.config
        if timesteps is not None:
            t = torch.as_tensor(timesteps, dtype=F64).detach().cpu().reshape(-1)
            return self.schedule.t_of_model_time(t)
        s = torch.as_tensor(sigmas, dtype=F64).detach().cpu().reshape(-1)
        while s.numel() > 1 and float(s[-1]) == 0.0:  # diffusers-style lists end in 0; fewstep adds that step
            s = s[:-1]
        if (s <= 0).any():
            raise ValueError(f"sigmas: expected positive values (a final 0 is allowed), got {s.tolist()[:8]}...")
        if cfg.kind == "flow":
            return self._shift(s, mu)
        t = self.schedule.t_of_lambda(-torch.log(s))
        # published lists (e.g. AYS) round sigma_max; accept them within half a timestep of the range
        lo, hi = self.schedule.t_min, self.schedule.t_max
        near = (t >= lo - 0.5) & (t <= hi + 0.5)
        return torch.where(near, t.clamp(lo, hi), t)

    def _shift(self, s: torch.Tensor, mu) -> torch.Tensor:
        cfg = self.config
        if cfg.use_flow_sigmas:
            s = flow_shift(s, shift=cfg.flow_shift)
        elif cfg.use_dynamic_shifting:
            s = flow_shift(s, mu=mu, time_shift_type=cfg.time_shift_type)
        else:
            s = flow_shift(s, shift=cfg.shift)
        if cfg.shift_terminal:
            # stretch so the last sigma is shift_terminal (LTX-Video's schedule, as diffusers)
            one_minus = 1.0 - s
            s = 1.0 - one_minus / (float(one_minus[-1]) / (1.0 - cfg.shift_terminal))
        return s

    def _flow_default_times(self, n: int, mu) -> torch.Tensor:
        """``FlowMatchEulerDiscreteScheduler.set_timesteps(n)``: uniform between its (statically
        shifted) end sigmas, then shifted — the same numbers, in float64."""
        cfg = self.config
        ends = torch.tensor([1.0, 1.0 / cfg.num_train_timesteps], dtype=F64)
        if not cfg.use_dynamic_shifting and not cfg.use_flow_sigmas:
            ends = flow_shift(ends, shift=cfg.shift)
        return self._shift(torch.linspace(float(ends[0]), float(ends[1]), n, dtype=F64), mu)

    def _grid_schedule(self, mu) -> Schedule:
        """The schedule named grids are spaced on (flow: ending at the shifted smallest sigma)."""
        if self.config.kind == "vp":
            return self.schedule
        n = self.config.num_train_timesteps
        t_min = float(self._shift(torch.tensor([1.0 / n], dtype=F64), mu)[0])
        return RectifiedFlow(t_min=t_min, t_max=1.0, time_scale=n)

    def _plan_from(self, begin: int):
        """Plan for a run starting at evaluation ``begin``: the solver re-planned on the rest of the grid.

        Accepted when that evaluation is at a grid point and the re-planned solver requests exactly
        the evaluations still listed in ``timesteps`` (e.g. Heun may start at the re-evaluation at a
        grid point, whose state is final, but not at the predictor's evaluation before it)."""
        name = self.fewstep_solver.name
        if begin >= len(self._evals):
            raise ValueError(f"begin_index: {begin} is past the last of {len(self._evals)} timesteps")
        node = self._evals[begin][0]
        grid = self.grid_times.tolist()
        if node.t in grid and not self._warm_up:
            rest = self.grid_times[grid.index(node.t):]
            plan = self.fewstep_solver.prepare(self.schedule, rest)
            evals, warm_up = _trace(self.fewstep_solver, plan)
            if not warm_up and [n.t for n, _ in evals] == [n.t for n, _ in self._evals[begin:]]:
                return plan, rest
        raise ValueError(
            f"begin_index: {name} cannot start at timesteps[{begin}] (t={node.model_time:g}): a run may only start "
            f"at a grid point from which the solver makes the evaluations still listed in timesteps"
        )

    # ------------------------------------------------------------------------ step
    def _reset_run(self) -> None:
        self._step_index = None
        self._run = None
        self._request = None
        self._received: list[torch.Tensor] = []
        self._returned = None
        if not hasattr(self, "_plan"):
            self._plan = None
            self._evals, self._coeffs, self._net_times = [], [], []
            self._warm_up = False
            self._start_plan = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """Feed the network output at ``timesteps[step_index]``; return the next state to evaluate.

        ``timestep`` is not looked up (the position is a step counter: no device search, no sync).
        ``generator`` seeds stochastic solvers (read on the first call; else the ``seed`` config).
        If the pipeline changed the latents since the last call (inpainting blends them), the new
        ``sample`` replaces the state the solver evaluates. The last call returns the clean sample.
        """
        if self._split_variance:
            model_output = model_output[:, : sample.shape[1]]
        k = self._step_index
        if k is None:
            nxt = self._start(model_output, timestep, sample, generator)
        else:
            if k >= len(self._evals):
                raise ValueError(f"step: called more than len(timesteps) = {len(self._evals)} times; call set_timesteps first")
            if self._run is None:
                raise RuntimeError("step: this scheduler was copied in the middle of a run (a running solver cannot be "
                                   "copied); call set_timesteps again")
            nxt = self._feed(model_output, sample, k)
        prev = nxt if nxt.dtype == model_output.dtype else nxt.to(model_output.dtype)
        self._returned = prev
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def _start(self, model_output, timestep, sample, generator):
        if self._plan is None:
            raise ValueError("step: call set_timesteps before the first step")
        begin = self._begin_index or 0
        self._check_first_timestep(timestep, begin)
        plan, times = self._start_plan if begin > 0 else (self._plan, self.grid_times)
        solver = self.fewstep_solver
        # Low-precision latents keep a float32 state (as fewstep.sample): accumulating in fp16 loses steps.
        dtype = torch.float32 if sample.dtype in (torch.float16, torch.bfloat16) else sample.dtype
        x = sample if sample.dtype == dtype else sample.to(dtype)
        noise = None
        if solver.stochastic:
            if generator is None and self.config.seed is not None:
                generator = torch.Generator(device=x.device).manual_seed(self.config.seed)
            noise = NoiseSource(x, generator, times=times, schedule=self.schedule)
        self._run = solver.run(plan, x, noise)
        self._received = []
        self._step_index = begin
        first = self._send_and_advance(None)
        if begin == 0 and self._warm_up:
            self._step_index = 1  # the pipeline's call at the initial latents is discarded
            return first
        self._returned = sample
        return self._feed(model_output, sample, begin)

    def _check_first_timestep(self, timestep, begin: int) -> None:
        # Only host values are checked: comparing a device tensor would force a sync.
        if isinstance(timestep, torch.Tensor):
            if timestep.device.type != "cpu" or timestep.numel() != 1:
                return
        elif not isinstance(timestep, (int, float)):
            return
        expected = self._net_times[begin]
        if abs(float(timestep) - expected) > 1e-3 * max(1.0, abs(expected)):
            raise ValueError(
                f"timestep: the first step got {float(timestep):g} but timesteps[{begin}] is {expected:g}; a pipeline "
                f"that starts later in the schedule must call scheduler.set_begin_index(start)"
            )

    def _feed(self, model_output, sample, k: int) -> torch.Tensor:
        req = self._request
        j = len(self._received)
        x_eval = req.xs[j]
        if sample is not self._returned and sample is not x_eval:
            x_eval.copy_(sample)
        out = model_output if model_output.dtype == x_eval.dtype else model_output.to(x_eval.dtype)
        cx, co = self._coeffs[k]
        # the same function as fewstep.Model's, so both drivers give the same bits
        self._received.append(combine_view(x_eval, out, cx, co, scaled=req.scaled))
        self._step_index = k + 1
        if j + 1 < len(req.xs):
            return req.xs[j + 1]  # batched nodes: the pipeline evaluates them one per call
        received, self._received = self._received, []
        return self._send_and_advance(received)

    def _send_and_advance(self, value) -> torch.Tensor:
        """Send ``value`` to the solver; run it to its next request for the pipeline's network."""
        run = self._run
        try:
            msg = run.send(value) if value is not None else next(run)
            while True:
                if type(msg) is Evaluate:
                    if msg.model is None:
                        break
                    # another network of a model family (multilevel solvers): served here directly
                    msg = run.send(msg.model.evaluate(msg.xs, msg.nodes, self._view, scaled=msg.scaled))
                else:
                    msg = run.send(None)
        except StopIteration as stop:
            self._run = None
            self._request = None
            return stop.value
        self._request = msg
        return msg.xs[0]

    # ------------------------------------------------------------------------ copying
    def __getstate__(self):
        # A running Python generator cannot be copied; a copy keeps the plan and needs set_timesteps
        # (pipelines call it at the start of every run) before it can step.
        state = dict(self.__dict__)
        state.update(_run=None, _request=None, _received=[], _returned=None)
        return state


def _detect_kind(config) -> str:
    cfg = dict(config)
    if cfg.get("kind") in KINDS:
        return cfg["kind"]
    cls = str(cfg.get("_class_name", ""))
    if cls.startswith("FlowMatch") or cfg.get("use_flow_sigmas") or cfg.get("prediction_type") == "flow_prediction":
        return "flow"
    # An in-memory config has no _class_name: flow-matching configs have a shift and no beta table.
    vp_keys = ("beta_schedule", "beta_start", "trained_betas")
    if any(k in cfg for k in ("shift", "use_dynamic_shifting")) and not any(k in cfg for k in vp_keys):
        return "flow"
    return "vp"
