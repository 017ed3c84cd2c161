"""``fewstep.sample``: drive any solver's generator with a model.

Example::

    >>> import torch, fewstep
    >>> from fewstep import schedules, testbeds
    >>> sch = schedules.EDM()
    >>> gm = testbeds.Gaussian(mean=0.3, std=0.5, dim=2)
    >>> model = gm.model(sch, prediction="x0")
    >>> noise = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> x0 = fewstep.sample(model, noise, solver="dpm++", nfe=10)
    >>> bool((x0 - gm.reference(noise, sch)).abs().max() < 1e-2)
    True
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from . import grids as _grids
from .model import Model, NetworkOutputError, combine_view, view_coefficients
from .noise import NoiseSource
from .solvers import get as get_solver, Solver
from .solvers.base import QUIET, Evaluate, StepDone

__all__ = ["sample", "SamplingError", "SampleInfo", "plan_for", "recommended"]


class SamplingError(RuntimeError):
    """The network produced NaN/Inf or an unusable output during sampling (names step and time)."""


@dataclass
class SampleInfo:
    """What one call of :func:`sample` did: network evaluations, calls (sequential depth), grid."""

    nfe: int
    calls: int
    solver: str
    grid: list[float]


# The training-free configuration with the lowest error relative to the best diffusers configuration
# at each budget, measured with `fewstep bench accuracy --target gmm,digits16` (geometric mean over
# gmm2d, gmm16, gmm64 and digits16; docs/benchmarks.md "Choosing the default"):
# (largest NFE, solver, options, grid, start log-SNR).
#
# The last field truncates the top of the schedule at few steps: sampling starts at the time whose
# log-SNR is that value (signal fraction alpha/sigma = e^lambda: 0.039 at -3.24, 0.017 at -4.1), from
# sigma(t_start) * noise, as diffusers' "leading" spacing does. The neglected part of the flow only
# moves the state by about alpha(t_start) * E[x0]; the evaluation it frees buys more than that at a
# budget of 5-12, and less above (measured), so larger budgets start at t_max. With the truncation
# bridge (``bridged_plan``, on by default) the skipped part is integrated with the first data
# prediction. NFE 9-12 start higher, at -4.1: on the mixtures and digits16 alone -3.24 is 3-15 %
# better there, but on the natural-image model patches32 -4.1 has 0.34-0.47x its error at NFE 9-12
# (noise seeds 0 and 1; docs/bench/patches32.md), and the more evaluations, the less the saved one
# is worth against the truncation.
_RECOMMENDED = [
    (6, "fv", {"order": 1}, "quadratic-open", -3.24),
    (7, "heroism", {"order": 2}, "quadratic-open", -3.24),
    (8, "heroism", {"order": 3}, "quadratic-open", -3.24),
    (12, "heroism", {"order": 3}, "quadratic-open", -4.1),
    (15, "heroism", {"order": 3}, "quadratic-open", None),
    (math.inf, "unipc", {"order": 3}, "quadratic-open", None),
]


def _recommended_entry(nfe: int) -> tuple:
    for entry in _RECOMMENDED:
        if nfe <= entry[0]:
            return entry
    raise AssertionError("unreachable")


def recommended(nfe: int) -> tuple[str, dict]:
    """The default ``(solver, options)`` for a budget of ``nfe`` network evaluations.

    Example::

        >>> import fewstep
        >>> fewstep.recommended(6)
        ('fv', {'order': 1})
    """
    _, name, options, _, _ = _recommended_entry(nfe)
    return name, dict(options)


def recommended_grid(nfe: int) -> str:
    """The named grid used with :func:`recommended` when no grid is given."""
    return _recommended_entry(nfe)[3]


def recommended_start(nfe: int) -> float | None:
    """The log-SNR where the default sampler starts at this budget (``None``: at ``t_max``).

    See ``_RECOMMENDED``: at few evaluations the default skips the top of the schedule.
    """
    return _recommended_entry(nfe)[4]


def truncated_start(schedule, start_logsnr: float | None) -> float | None:
    """The time where the log-SNR is ``start_logsnr``, or ``None`` when the schedule starts above it."""
    if start_logsnr is None:
        return None
    lam = float(start_logsnr)
    if lam != lam:
        raise ValueError("start_logsnr: expected a number, got NaN")
    lam_max = float(schedule.lambda_(torch.tensor(float(schedule.t_max), dtype=torch.float64)))
    if not lam_max < lam:  # the schedule already starts with more signal than that
        return None
    t = float(schedule.t_of_lambda(torch.tensor(lam, dtype=torch.float64)))
    return t if float(schedule.t_min) < t < float(schedule.t_max) else None


def _check_nfe(nfe) -> int:
    if isinstance(nfe, bool) or not isinstance(nfe, int):
        raise TypeError(f"nfe: expected an integer >= 1, got {nfe!r}")
    if nfe < 1:
        raise ValueError(f"nfe: must be >= 1, got {nfe}")
    return nfe


def plan_for(model: Model, solver: Solver, nfe: int | None, grid, start: float | None = None,
             bridge: bool = False) -> tuple[Any, torch.Tensor]:
    """Resolve the grid for a budget and precompute the solver's plan (float64, once).

    ``bridge``: the named grid starts at ``start`` below ``t_max`` from pure noise; the plan gets
    the truncation bridge where it has one (:func:`bridged_plan`).
    """
    sch = model.schedule
    if isinstance(grid, str) or grid is None:
        if nfe is None:
            raise ValueError("nfe: required with a named grid (or pass grid= as a tensor of times)")
        nfe = _check_nfe(nfe)
        # a named grid is a pure function of (name, schedule, nfe, start): a repeated call finds both
        # the grid and the plan here, without building either (this is most of a call's fixed cost)
        named_key = _plan_key(solver, sch, ("named", grid, nfe, start, bridge))
        hit = _cache_get(named_key, sch)
        if hit is not None:
            return hit
        if nfe < solver.min_nfe():
            raise ValueError(f"nfe: {solver.name} with these options needs nfe >= {solver.min_nfe()}, got {nfe}")
        times = _grids.make(grid or default_grid(sch), sch, solver.num_points(nfe), t_start=start)
        plan = _cached_prepare(solver, sch, times)
        if bridge:
            plan = bridged_plan(plan, sch)
        _cache_put(named_key, sch, (plan, times))
        return plan, times
    else:
        times = _grids.validate(grid, sch)
        if start is not None and abs(float(times[0]) - float(start)) > 1e-9 * max(1.0, abs(float(start))):
            raise ValueError(f"grid: with start={start:g} the grid must begin at that time, got {float(times[0]):g}")
        if nfe is not None:
            _check_nfe(nfe)
            want = solver.nfe_for_points(times.numel())
            if want > nfe:
                raise ValueError(
                    f"nfe: the grid's {times.numel()} points cost {want} evaluations with {solver.name}, "
                    f"more than nfe={nfe}"
                )
    return _cached_prepare(solver, sch, times), times


def bridged_plan(plan, schedule):
    """``plan`` (which starts below ``t_max`` from pure noise) with the truncation bridge, or ``plan``
    itself where the solver has none (stochastic solvers, forward value, searched solvers, ...).

    The bridge replaces the first state ``sigma_0 * z`` by ``sigma_0 * z + w * x0(sigma_0 * z, t_0)``,
    ``w = alpha_0 - sigma_0 alpha_top / sigma_top``: the skipped segment ``[t_0, t_max]`` of the
    probability-flow ODE integrated with the data prediction the sampler makes at ``t_0`` anyway
    (:func:`fewstep.solvers.base.start_bridge_weight`). No extra network evaluation.
    """
    make = getattr(plan, "bridged", None)
    if make is None:
        return plan
    top = schedule.nodes(torch.tensor([float(schedule.t_max)], dtype=torch.float64))[0]
    bridged = make(top)
    return plan if bridged is None else bridged


# Plans are pure functions of (solver options, schedule, grid): cache the last few so repeated calls
# with the same settings skip the float64 precomputation (about 1 ms, i.e. 20 us/step at 50 steps).
_PLAN_CACHE: "OrderedDict[tuple, Any]" = OrderedDict()
_PLAN_CACHE_LOCK = threading.Lock()
_PLAN_CACHE_SIZE = 32


def _plan_key(solver: Solver, schedule, grid_key) -> tuple | None:
    """The cache key of a plan, or ``None`` when the options make the plan uncacheable."""
    if solver.needs_inputs or any(callable(v) or isinstance(v, (list, dict)) for v in solver.opts.values()):
        return None
    key = (type(solver), repr(sorted(solver.opts.items())), id(schedule), grid_key)
    try:
        hash(key)
    except TypeError:  # unhashable options (a tensor, a model family): no caching
        return None
    return key


def _cache_get(key, schedule):
    if key is None:
        return None
    with _PLAN_CACHE_LOCK:
        hit = _PLAN_CACHE.get(key)
        # the id() in the key may be reused by a new schedule once the old one is freed: check identity
        if hit is not None and hit[0] is schedule:
            _PLAN_CACHE.move_to_end(key)
            return hit[1]
    return None


def _cache_put(key, schedule, value) -> None:
    if key is None:
        return
    with _PLAN_CACHE_LOCK:
        _PLAN_CACHE[key] = (schedule, value)
        while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
            _PLAN_CACHE.popitem(last=False)


def _cached_prepare(solver: Solver, schedule, times: torch.Tensor):
    key = _plan_key(solver, schedule, ("times", tuple(times.tolist())))
    plan = _cache_get(key, schedule)
    if plan is None:
        plan = solver.prepare(schedule, times)
        _cache_put(key, schedule, plan)
    return plan


def default_grid(schedule) -> str:
    """The named grid used when none is given: uniform in log-SNR (measured best on average)."""
    return "logsnr"


def _check_noise(noise, model: Model) -> torch.Tensor:
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise: expected a torch.Tensor, got {type(noise).__name__}")
    if not noise.is_floating_point():
        raise TypeError(f"noise: expected a floating tensor, got dtype {noise.dtype}")
    if noise.dim() < 1 or noise.shape[0] < 1:
        raise ValueError(f"noise: expected a batch of at least one sample, got shape {tuple(noise.shape)}")
    if model.sample_shape is not None and tuple(noise.shape[1:]) != tuple(model.sample_shape):
        raise ValueError(
            f"noise: each sample must have shape {tuple(model.sample_shape)} for this model, got {tuple(noise.shape[1:])}"
        )
    return noise


def _state_dtype(noise: torch.Tensor, state_dtype) -> torch.dtype:
    if state_dtype is not None:
        if not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
            raise TypeError(f"state_dtype: expected a floating torch.dtype, got {state_dtype!r}")
        return state_dtype
    # Low-precision noise keeps a float32 state by default (accumulation in fp16 loses steps).
    return torch.float32 if noise.dtype in (torch.float16, torch.bfloat16) else noise.dtype


_WIDE = (torch.float32, torch.float64)


class FiniteGuard:
    """Stops on NaN/Inf without a host-device sync per step on GPUs.

    Each network output is reduced to one float32 sum (NaN or Inf if any element is). On accelerators
    the sums are checked once at the end of sampling, which still names the first bad step and its
    time. On CPU the check is made during sampling, and mostly without a reduction per output: an
    answer to a request marked ``carried`` enters the solver's next state with a nonzero weight, next
    to its current state (also with a nonzero weight), so a NaN or Inf in it leaves every later state
    non-finite (IEEE: ``w * NaN``, ``w * Inf`` and ``NaN + y`` are never finite). Those answers are
    held, and the state the solver next evaluates at is summed every ``CARRIED_CHECK_EVERY`` steps;
    only when that sum is not finite are the held answers summed, oldest first, to name the step.
    Sampling then stops at most ``CARRIED_CHECK_EVERY - 1`` evaluations after the bad one (at once for
    other answers), and a ``callback`` may have seen a non-finite state first. A state that overflows
    from finite answers is not an error here, as before.

    Drivers call :meth:`check` with each request and its answers and :meth:`finish` with the result.
    """

    #: a full reduction over the latent costs about 1.5 us of a 20 us CPU step (1x4x64x64 float32)
    CARRIED_CHECK_EVERY = 4

    def __init__(self, device: torch.device, solver_name: str):
        self.immediate = device.type == "cpu"
        self.solver_name = solver_name
        self.pending: list[tuple[torch.Tensor, int, float]] = []  # sums to check at the end (accelerators)
        self.held: list[tuple[Any, int, float]] = []  # carried answers not yet checked (CPU)

    def check(self, answers, request: Evaluate):
        """Check (or hold, see the class docstring) the answers to ``request``."""
        if self.immediate:
            held = self.held
            # the state this request evaluates at carries every held answer
            if held and (len(held) >= self.CARRIED_CHECK_EVERY or not request.carried):
                self._settle(request.xs[0])
            if request.carried:  # the answers only: holding the request would keep its state alive
                held.append((answers, request.step, request.nodes[0].t))
                return
        self._check_each(answers, request.step, request.nodes[0].t)

    def _check_each(self, answers, step: int, t: float):
        for v in answers:
            if type(v) is tuple:  # a scaled answer (u, s): u carries any NaN/Inf, s is a finite float
                v = v[0]
            s = _finite_sum(v)
            if self.immediate:
                if not math.isfinite(float(s)):
                    self._raise(step, t)
            else:
                self.pending.append((s, step, t))

    def _settle(self, state: torch.Tensor | None):
        """Check the held answers through ``state``; sum them one by one only if it is not finite."""
        held, self.held = self.held, []
        if state is not None and math.isfinite(float(_finite_sum(state))):
            return
        for answers, step, t in held:
            self._check_each(answers, step, t)

    def finish(self, result: torch.Tensor | None = None):
        """After the last request; ``result`` is the solver's result (it carries any held answer)."""
        if self.held:
            self._settle(result)
        if not self.pending:
            return
        sums = torch.stack([p[0] for p in self.pending])
        bad = ~torch.isfinite(sums)
        if bool(bad.any()):
            k = int(bad.nonzero()[0, 0])
            self._raise(self.pending[k][1], self.pending[k][2])

    def _raise(self, step: int, t: float):
        raise SamplingError(
            f"{self.solver_name}: the network returned NaN or Inf at step {step} (t={t:.6g}); sampling stopped"
        )


def _finite_sum(v: torch.Tensor) -> torch.Tensor:
    """One sum over ``v``: NaN or Inf if any element is (half precision accumulates in float32, so
    that finite values cannot overflow it)."""
    return torch.sum(v) if v.dtype in _WIDE else v.sum(dtype=torch.float32)


def sample(
    model: Model,
    noise: torch.Tensor,
    *,
    solver: str | Solver | None = None,
    nfe: int | None = None,
    grid: str | torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool | Any = False,
    cond: Mapping[str, Any] | None = None,
    state_dtype: torch.dtype | None = None,
    start: float | None = None,
    start_logsnr: float | None = None,
    start_bridge: bool = True,
    return_info: bool = False,
    **options,
):
    """Sample clean data from standard normal ``noise`` in ``nfe`` network evaluations.

    Args:
        model: a :class:`fewstep.Model`.
        noise: standard normal tensor ``(batch, *sample_shape)``; scaled to ``t_max`` here.
        solver: a name from :func:`fewstep.solvers.available` (default: the measured best for ``nfe``)
            or a :class:`~fewstep.solvers.Solver` instance.
        nfe: network evaluation budget (required with a named grid; never exceeded).
        grid: a name from :data:`fewstep.grids.NAMES` or a decreasing 1-D tensor of schedule times.
        generator: ``torch.Generator`` or one per sample (stochastic solvers; batch-invariant noise).
        callback: called after each step with ``{"i", "t", "x", "x0"}``.
        progress: ``True`` for a tqdm bar, or a tqdm instance to update.
        cond: extra keyword arguments for the network (added to the model's own).
        state_dtype: dtype of the solver state (default: the noise's, float32 for fp16/bf16 noise).
        start: sample from a partly noised state: ``noise`` is then the state at schedule time
            ``start`` (used as is, not scaled) and named grids span ``[t_min, start]`` (SDEdit, img2img).
        start_logsnr: truncate the top of the schedule: a named grid starts where the log-SNR is this
            value (when the schedule starts above it) from pure noise, ``sigma * noise`` there. The
            default solver does this at NFE <= 12 (``recommended_start``); pass ``float("-inf")`` to
            start at ``t_max`` with the default solver.
        start_bridge: with a truncated start, integrate the skipped top of the schedule with the data
            prediction made at the start (:func:`bridged_plan`; deterministic solvers that evaluate
            there: not ``fv``, stochastic solvers or HEROISM's score form; docs/algorithms/truncation.md).
            No extra evaluation; ``False`` starts from ``sigma * noise`` as it is.
        return_info: also return a :class:`SampleInfo`.
        **options: solver options (``order=``, ...); unknown ones raise ``ValueError``.

    Returns:
        The clean sample in ``noise.dtype`` (and a :class:`SampleInfo` when ``return_info``).
    """
    if not isinstance(model, Model):
        raise TypeError(f"model: expected a fewstep.Model, got {type(model).__name__}")
    noise = _check_noise(noise, model)
    if start_logsnr is not None and (start is not None or not (grid is None or isinstance(grid, str))):
        raise ValueError("start_logsnr: only with a named grid and without start= (a grid tensor or start= "
                         "sets where sampling begins)")
    if isinstance(solver, Solver):
        if options:
            raise ValueError(f"options {sorted(options)}: pass them to the solver instance instead")
        solver_obj = solver
    else:
        if solver is None:
            if nfe is None:
                raise ValueError("nfe: required when no solver is named (the default solver depends on it)")
            solver, defaults = recommended(_check_nfe(nfe))
            options = {**defaults, **options}
            if grid is None:
                grid = recommended_grid(nfe)
                if start is None and start_logsnr is None:
                    start_logsnr = recommended_start(nfe)
        solver_obj = get_solver(solver, **options)
    if not isinstance(start_bridge, bool):
        raise TypeError(f"start_bridge: expected True or False, got {start_bridge!r}")
    truncate = truncated_start(model.schedule, start_logsnr)  # a start below t_max, from pure noise
    plan, times = plan_for(model, solver_obj, nfe, grid, start if truncate is None else truncate,
                           bridge=truncate is not None and start_bridge)
    if start is not None and getattr(plan, "free_first", False):
        raise ValueError(f"start: {solver_obj.name} treats its first state as pure noise; it cannot start at t={start:g}")

    dtype = _state_dtype(noise, state_dtype)
    if start is not None:
        x = noise.to(dtype)
    elif truncate is not None:
        # the default's truncated schedule: pure noise at the lower start, sigma(t0) * noise
        x = noise.to(dtype) * float(model.schedule.sigma(torch.tensor(truncate, dtype=torch.float64)))
    elif getattr(plan, "start_sigma", None) is not None:
        # a solver that carries its own truncated start (a searched solver with a searched start)
        x = noise.to(dtype) * plan.start_sigma
    else:
        x = noise.to(dtype) * model.schedule.initial_scale
    noise_source = None
    if solver_obj.stochastic:
        noise_source = NoiseSource(x, generator, times=times, schedule=model.schedule,
                                   brownian=bool(solver_obj.opts.get("brownian", False)))
    elif generator is not None and not isinstance(generator, (torch.Generator, list, tuple)):
        raise TypeError(f"generator: expected a torch.Generator or a list of them, got {type(generator).__name__}")

    view = solver_obj.view(plan)
    guard = FiniteGuard(x.device, solver_obj.name)
    bar = _make_bar(progress, solver_obj.nfe_for_points(times.numel()))
    nfe0, calls0 = model.nfe, model.calls
    run = solver_obj.run(plan, x, noise_source)
    last: tuple | None = None
    # the step loop runs once per network call: bound methods in locals keep its Python cost down
    send, check, evaluate = run.send, guard.check, model.evaluate
    try:
        msg = next(run)
        while True:
            if type(msg) is Evaluate:
                try:
                    preds = (msg.model.evaluate if msg.model is not None else evaluate)(
                        msg.xs, msg.nodes, view, cond, scaled=msg.scaled)
                except NetworkOutputError as e:
                    raise NetworkOutputError(f"{solver_obj.name}, step {msg.step} (t={msg.nodes[0].t:.6g}): {e}") from e
                check(preds, msg)
                if bar is not None:
                    bar.update(len(msg.nodes))
                last = (msg, preds)
                msg = send(preds)
            else:
                if callback is None:
                    msg = send(QUIET)  # no one reads the steps: solvers may stop announcing them
                    continue
                if type(msg) is StepDone:
                    callback(_callback_dict(msg, last, view))
                msg = send(None)
    except StopIteration as stop:
        out = stop.value
    finally:
        if bar is not None and progress is True:
            bar.close()
    guard.finish(out)
    out = out.to(noise.dtype)
    if return_info:
        info = SampleInfo(model.nfe - nfe0, model.calls - calls0, solver_obj.name, times.tolist())
        return out, info
    return out


def _callback_dict(msg: StepDone, last, view: str) -> dict:
    x0 = None
    if last is not None:
        req, preds = last
        node, x_eval, pred = req.nodes[-1], req.xs[-1], preds[-1]
        if type(pred) is tuple:  # a scaled answer (u, s) means s * u
            pred = pred[0] * pred[1]
        if view == "x0":
            x0 = pred
        else:
            # a view is itself a prediction type ("velocity" is "flow"), so the x0 view follows exactly
            cx, co = view_coefficients("flow" if view == "velocity" else view, "x0", node)
            x0 = combine_view(x_eval, pred, cx, co)
    return {"i": msg.i, "t": msg.t, "x": msg.x, "x0": x0}


def _make_bar(progress, total):
    if progress is False or progress is None:
        return None
    if progress is True:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="sampling", unit="nfe", leave=False)
    if hasattr(progress, "update"):
        return progress
    raise TypeError(f"progress: expected True/False or a tqdm bar, got {type(progress).__name__}")
