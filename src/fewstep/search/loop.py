"""The search: fit a solver's grid and multistep weights to one model's teacher trajectories.

1. Noise: ``samples`` training and ``val_samples`` held-out draws from a seed that no benchmark
   uses (so benchmark noise stays unseen).
2. Teacher: :func:`fewstep.search.teacher.cached` -- DPM-Solver++(3M) at ``teacher_steps``
   evaluations, dense (Hermite interpolation), cached.
3. Start: every training-free solver the search space contains (DDIM, DPM-Solver++ 2M/3M or
   Adams–Bashforth 2/3, on the ``logsnr``, ``karras``, ``uniform`` and ``quadratic`` grids, from
   ``t_max`` and -- with ``truncate`` -- from the truncated starts :data:`INIT_STARTS`, whose start is
   then searched too) is run on part of the training set; the best one is the starting point, so the
   search starts no worse than any of them.
4. Optimise (Adam, cosine learning rate, mini-batches): the loss is the end point's mean squared
   error to the teacher plus ``mid_weight`` times the mean squared error of the intermediate states
   to the teacher's states at the solver's own (moving) times -- DS-Solver's trajectory loss
   (Wang et al. 2025, Sec. 5 / their ``TrajsReWeightTrainer``), with the teacher interpolated rather
   than rounded to its nearest step.
5. Early stop: the held-out end-point RMSE is measured every ``eval_every`` iterations; the best
   parameters by that number are returned, and the search stops after ``patience`` measurements
   without improvement.

Data parallel (``ctx=``, a :class:`fewstep.distributed.Context`; ``torchrun ... -m fewstep search``):
every rank draws the same noise, keeps the samples ``k`` with ``k mod world == rank`` (training and
held-out alike) and computes the teacher for those only. Losses, gradients and error sums are
all-reduced, each rank's share weighted by its sample count, so every rank sees the numbers one
process would see for the whole set and takes the identical optimiser step.

Example::

    >>> import torch
    >>> from fewstep import schedules, testbeds
    >>> from fewstep.search import search, rollout
    >>> sch = schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000))
    >>> gm = testbeds.mixtures()["gmm16"]
    >>> result = search(rollout.differentiable_testbed(gm, sch), nfe=4, samples=32, val_samples=16,
    ...                 iterations=10, teacher_steps=32, use_cache=False)
    >>> result.val_rmse <= result.val_rmse_init
    True
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import torch

from .. import grids as _grids
from ..distributed import Context
from ..model import Model
from . import teacher as _teacher
from .parameterisation import (NonFiniteTimes, SolverParameters, _to_coord, _to_time, coordinate_range, default_view,
                               step_table)
from .rollout import differentiable_view, rollout

__all__ = ["search", "SearchResult", "evaluate_rmse", "training_loss", "search_noise", "shard", "NOISE_SEED_OFFSET",
           "candidates"]

F64 = torch.float64
#: Search noise comes from ``torch.Generator().manual_seed(NOISE_SEED_OFFSET + seed)``; benchmarks
#: use small seeds (``fewstep bench``: 0), so searched solvers are always measured on unseen noise.
NOISE_SEED_OFFSET = 0x5EA4C4
INIT_GRIDS = ("logsnr", "karras", "uniform", "quadratic")
#: Starting grids also come squeezed towards t_max by these shares of the searched coordinate (the
#: last node off t_min): a softmax share near zero barely moves under gradient steps, so the search
#: also starts from grids whose last node can still move.
INIT_SHARES = (0.0, 0.03, 0.1)
#: Truncated starts (log-SNR where sampling begins from pure noise) of the starting grids with a
#: searched start: where fewstep's default sampler started below NFE 13 when the bundled solvers
#: were searched (-3.24, or -4.1 at NFE 10-12; ``sample.py`` now starts NFE 9-12 at -4.1, 8 and below at -3.24).
INIT_STARTS = (-3.24, -4.1)
#: the loss an L-BFGS line-search trial outside the schedule gets (see ``_advance_lbfgs``)
REJECTED_LOSS = 1e30


@dataclass
class SearchResult:
    """What :func:`search` found and how well: RMSE of the end point to the teacher's."""

    params: SolverParameters
    nfe: int
    init: str  # the best training-free start (its errors are the *_init numbers)
    continued_from: str  # the start whose optimisation gave the result
    train_rmse_init: float
    val_rmse_init: float
    train_rmse: float
    val_rmse: float
    iterations: int
    seconds: float
    teacher_seconds: float
    teacher_cached: bool
    cpu_seconds: float  # process CPU time of teacher + search, all threads (the load-independent cost)
    model_fingerprint: str  # fewstep.search.teacher.model_fingerprint of the searched model
    samples: int
    val_samples: int
    teacher_steps: int
    history: list = field(default_factory=list)  # (iteration, train batch rmse, val rmse)

    def summary(self) -> dict:
        """JSON-able numbers for the file's metadata."""
        d = asdict(self)
        d.pop("params")
        d["history"] = [list(h) for h in self.history[-50:]]
        return d


def search_noise(n: int, shape, seed: int, dtype=F64) -> torch.Tensor:
    """The search's standard normal noise: ``n`` draws from seed ``NOISE_SEED_OFFSET + seed``."""
    g = torch.Generator().manual_seed(NOISE_SEED_OFFSET + int(seed))
    return torch.randn(n, *shape, generator=g, dtype=dtype)


def _batch_cond(cond: Mapping | None, index, total: int) -> dict | None:
    if not cond:
        return None
    return {k: (v[index] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == total else v)
            for k, v in cond.items()}


def shard(count: int, ctx: Context | None) -> torch.Tensor:
    """The indices of ``count`` samples this rank keeps: ``k`` with ``k mod world == rank``."""
    ctx = ctx or Context()
    return torch.arange(ctx.rank, count, ctx.world)


def _sum_over_ranks(values: list[float], ctx: Context | None) -> list[float]:
    """Sums over the ranks (float64); the identity in a single process."""
    if ctx is None or ctx.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=F64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t.tolist()


@torch.no_grad()
def _check_times(params: SolverParameters, schedule) -> None:
    """Raise :class:`NonFiniteTimes` where ``params`` leave the schedule, as a rank with samples
    does inside its loss: a rank that holds no samples must stop with the others."""
    step_table(params, schedule)


@torch.no_grad()
def evaluate_rmse(model: Model, params: SolverParameters, noise: torch.Tensor, target: torch.Tensor,
                  cond: Mapping | None = None, chunk: int = 256, ctx: Context | None = None) -> float:
    """RMSE of the searched update's end point to ``target`` (over every sample and coordinate).

    With ``ctx`` (several ranks) each rank passes its own samples and gets the RMSE over all of them.
    """
    table = step_table(params, model.schedule)
    total, count = 0.0, 0
    for lo in range(0, noise.shape[0], chunk):
        index = slice(lo, lo + chunk)
        end, _ = rollout(model, noise[index].to(_state_dtype(model)), table, _batch_cond(cond, index, noise.shape[0]))
        diff = end.to(F64) - target[index].to(F64)
        total += float(diff.pow(2).sum())
        count += diff.numel()
    total, count = _sum_over_ranks([total, float(count)], ctx)
    return math.sqrt(total / count) if count else math.nan


def training_loss(model: Model, params: SolverParameters, noise: torch.Tensor, teacher: "_teacher.Trajectory", *,
                  cond: Mapping | None = None, mid_weight: float = 1.0, chunk: int = 256,
                  global_samples: int | None = None, ctx: Context | None = None) -> tuple[float, list[torch.Tensor]]:
    """The search's loss at ``params`` over the training samples and its gradient (what one optimiser
    step sees): ``(loss, grads)``, one gradient per tensor of ``params.tensors()`` (``time_logits``,
    ``corrections``, ``time_offsets``, ``gains`` and the ``corrector`` if there is one).

    With ``ctx`` each rank passes its own samples (``noise``, their ``teacher`` trajectories and
    ``cond``) and ``global_samples``, the count over all ranks; every rank gets the loss and gradient
    of the whole set.

    Example::

        traj = fewstep.search.teacher.solve(model, noise, 100)
        loss, (g_times, g_weights, g_offsets, g_gains) = training_loss(model, params, noise, traj)
    """
    p = params.detached()
    tensors = p.tensors()
    for t in tensors:
        t.requires_grad_(True)
    fit = _Fit(model, model.schedule, noise.to(_state_dtype(model)), teacher, cond, mid_weight, chunk, True,
               None, global_samples, ctx)
    loss, _ = fit.full_loss(p, tensors)
    return loss, [t.grad.detach().clone() for t in tensors]


def _state_dtype(model: Model) -> torch.dtype:
    return F64 if model.dtype in (None, F64) else torch.float32


def _check_differentiable(model: Model, view: str) -> None:
    """One evaluation on two samples: the network must pass gradients to its input (before any teacher work)."""
    x = torch.zeros(2, *model.sample_shape, dtype=_state_dtype(model), requires_grad=True)
    t = torch.tensor(0.5 * (model.schedule.t_min + model.schedule.t_max), dtype=F64)
    nfe, calls = model.nfe, model.calls
    with torch.enable_grad():
        differentiable_view(model, x, t, view)
    model.nfe, model.calls = nfe, calls


def candidates(schedule, nfe: int, view: str, truncate: bool = False,
               bridge: bool = False) -> list[tuple[str, SolverParameters]]:
    """The training-free solvers the search space contains at this NFE, as starting points (with
    ``truncate``, also from the truncated starts :data:`INIT_STARTS`, with the start searched; with
    ``bridge`` those carry the truncation bridge)."""
    from ..sample import truncated_start

    out = []
    names = {"x0": {1: "ddim", 2: "dpm++(2M)", 3: "dpm++(3M)"},
             "velocity": {1: "euler", 2: "adams-bashforth-2", 3: "adams-bashforth-3"}}[view]
    starts = [(None, None)]
    if truncate:
        starts += [(lam, truncated_start(schedule, lam)) for lam in INIT_STARTS]
    for (lam, t_start), grid in ((s, g) for s in starts for g in INIT_GRIDS):
        if lam is not None and t_start is None:
            continue  # the schedule starts with more signal than this already
        times = _grids.make(grid, schedule, nfe, t_start=t_start)
        for order in (1, 2, 3):
            if order > max(1, nfe - 1):
                continue
            for share in INIT_SHARES:
                try:
                    p = SolverParameters.from_grid(schedule, _compressed(schedule, view, times, share),
                                                   base_order=order, view=view, bridge=bridge)
                except ValueError:
                    continue
                label = f"{names[order]} on the {grid} grid"
                if lam is not None:
                    label += f" from log-SNR {lam:g}" + (" (bridged)" if p.bridged else "")
                if share:
                    label += f" ending {share:g} of the {'log-SNR' if view == 'x0' else 'time'} range early"
                out.append((label, p))
    return out


def _compressed(schedule, view: str, times: torch.Tensor, share: float) -> torch.Tensor:
    """The grid squeezed towards its start in the searched coordinate, ending ``share`` of it early."""
    if share == 0:
        return times
    c0, c1 = coordinate_range(schedule, view)
    coords = _to_coord(schedule, view, times)
    if float(times[0]) < float(schedule.t_max):
        c0 = float(coords[0])  # a truncated grid: squeeze towards its own start
    out = _to_time(schedule, view, c0 + (coords - c0) * (1.0 - share))
    out[0] = times[0]
    return out


def search(
    model: Model,
    nfe: int,
    *,
    samples: int = 256,
    val_samples: int = 64,
    seed: int = 0,
    iterations: int = 200,
    optimizer: str = "lbfgs",
    batch: int = 64,
    lr: float | None = None,
    mid_weight: float = 1.0,
    offsets: bool = True,
    free_sums: bool = False,
    corrector: bool = False,
    truncate: bool = True,
    bridge: bool = False,
    teacher_steps: int = 100,
    view: str | None = None,
    base: int | None = None,
    cond_fn: Callable[[int, torch.Generator], Mapping] | None = None,
    exact_end: Callable[[torch.Tensor], torch.Tensor] | None = None,
    exact_name: str = "",
    eval_every: int = 10,
    patience: int = 5,
    starts: int = 3,
    time_budget: float | None = None,
    chunk: int = 256,
    cache_dir=None,
    use_cache: bool = True,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    ctx: Context | None = None,
) -> SearchResult:
    """Search a solver for ``model`` at ``nfe`` network evaluations.

    Args:
        model: a :class:`fewstep.Model` whose network is differentiable (a ``torch.nn.Module``, or
            :func:`fewstep.search.rollout.differentiable_testbed` for the exact testbeds).
        nfe: the budget (number of network evaluations, the final step to zero noise included).
        samples, val_samples: training and held-out noise draws.
        seed: selects the noise (and labels from ``cond_fn``).
        iterations: optimiser iterations (L-BFGS: loss-and-gradient evaluations on the whole
            training set; Adam: mini-batch steps).
        optimizer: ``"lbfgs"`` (full batch, deterministic; default) or ``"adam"`` (mini-batches of
            ``batch`` samples, cosine learning rate from ``lr``, default 2e-2).
        lr: L-BFGS step scale (default 1, with a strong-Wolfe line search) or Adam's peak rate.
        mid_weight: weight of the intermediate-state loss (0 = end point only).
        offsets: also search the time the network is told at each node (see
            :mod:`~fewstep.search.parameterisation`); ``False`` is DS-Solver's search space.
        free_sums: also search ``gains``, letting each row of weights sum to other than one
            (DyWeight's unconstrained weights, Zhao et al. 2026).
        corrector: also search a corrector (UniPC-style: each node's state is recomputed once its
            prediction is known, at no extra evaluation), starting from "no correction".
        truncate: also start from truncated grids (sampling begins from pure noise below ``t_max``,
            see :mod:`~fewstep.search.parameterisation`) and search where the solver starts;
            ``False`` keeps node 0 at ``t_max``.
        bridge: with a searched start, apply the truncation bridge inside the search space (the first
            state is read as ``x_0 + w(t_0) D_0``, :mod:`~fewstep.search.parameterisation`), so the
            coefficients are fitted with it; ``view="x0"`` only.
        teacher_steps: the teacher's evaluations per sample (DPM-Solver++(3M) on a log-SNR grid).
        view: ``"x0"`` or ``"velocity"`` (default: by schedule, see
            :func:`~fewstep.search.parameterisation.default_view`).
        base: force the base order (1-3) instead of picking the best training-free start.
        cond_fn: ``cond_fn(n, generator) -> dict`` of per-sample conditioning (e.g. class labels).
        exact_end: exact end points for the teacher (testbeds); ``exact_name`` names them in the cache key.
        eval_every, patience: validation period (iterations) and early-stopping patience (measurements).
        starts: how many of the best training-free starting points get a short trial run (up to
            ``3 * eval_every`` iterations each) before the best continues.
        time_budget: stop optimising after this many seconds (the teacher not counted).
        chunk: samples per network call (memory).
        cache_dir, use_cache: where teacher trajectories are cached.
        progress: show tqdm bars (teacher, then the search with train/validation RMSE).
        log: called with one-line messages (start solver, teacher, stops).
        ctx: a :class:`fewstep.distributed.Context` to search data-parallel (every rank calls
            ``search`` with the same arguments; see the module docstring). Every rank returns the
            same result.
    """
    if not isinstance(model, Model):
        raise TypeError(f"model: expected a fewstep.Model, got {type(model).__name__}")
    for name, v, lo in (("nfe", nfe, 1), ("samples", samples, 1), ("val_samples", val_samples, 1),
                        ("iterations", iterations, 0), ("batch", batch, 1), ("teacher_steps", teacher_steps, 1),
                        ("eval_every", eval_every, 1), ("patience", patience, 1), ("chunk", chunk, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"optimizer: expected 'lbfgs' or 'adam', got {optimizer!r}")
    if model.sample_shape is None:
        raise ValueError("model: needs sample_shape (the shape of one sample) to draw search noise")
    if base is not None and base not in (1, 2, 3):
        raise ValueError(f"base: expected 1, 2, 3 or None (pick the best), got {base!r}")
    if lr is not None and not (lr > 0):
        raise ValueError(f"lr: expected a positive number, got {lr!r}")
    if not (mid_weight >= 0):
        raise ValueError(f"mid_weight: expected a number >= 0, got {mid_weight!r}")
    ctx = ctx or Context()
    if samples < ctx.world or val_samples < ctx.world:
        raise ValueError(f"samples, val_samples: need at least one per process ({ctx.world}), got {samples}, {val_samples}")
    sch = model.schedule
    view = view or default_view(sch)
    say = log or (lambda msg: None)
    _check_differentiable(model, view)

    # ---- noise, conditioning and teacher ------------------------------------------------------
    cpu0 = time.process_time()
    total = samples + val_samples
    noise = search_noise(total, model.sample_shape, seed)
    cond = dict(cond_fn(total, torch.Generator().manual_seed(NOISE_SEED_OFFSET + 1 + int(seed)))) if cond_fn else None
    # this rank's samples (all of them in one process): training first, then held-out
    train_idx, val_idx = shard(samples, ctx), samples + shard(val_samples, ctx)
    mine = torch.cat([train_idx, val_idx])
    n_train = train_idx.numel()
    local_cond = _batch_cond(cond, mine, total)
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=teacher_steps * math.ceil(mine.numel() / chunk), desc="teacher", unit="eval", leave=False)
    traj, from_cache = _teacher.cached(model, noise[mine], teacher_steps, cond=local_cond, exact_end=exact_end,
                                       exact_name=exact_name, cache_dir=cache_dir, progress=bar,
                                       use_cache=use_cache, chunk=chunk)
    if bar is not None:
        bar.close()
    teacher_seconds = time.perf_counter() - t0
    where = f" ({mine.numel()} on each of {ctx.world} processes)" if ctx.world > 1 else ""
    say(f"teacher: {total} trajectories{where}, DPM-Solver++(3M) x {teacher_steps} evaluations "
        f"({'from cache' if from_cache else f'{teacher_seconds:.1f} s'})")
    t_start = time.perf_counter()
    train, val = slice(0, n_train), slice(n_train, mine.numel())
    dtype = _state_dtype(model)
    local_noise = noise[mine].to(dtype)
    train_noise, val_noise = local_noise[train], local_noise[val]
    train_traj = traj.subset(train)
    train_cond, val_cond = _batch_cond(local_cond, train, mine.numel()), _batch_cond(local_cond, val, mine.numel())
    val_end = traj.end[val]

    # ---- start from the best training-free solvers in the search space ---------------------------
    # scored on the first (up to) 64 training samples of the whole set, wherever they live
    probe_n = min(samples, 64)
    probe = slice(0, int((train_idx < probe_n).sum()))
    probe_cond = _batch_cond(train_cond, probe, n_train)
    if bridge and view != "x0":
        raise ValueError(f"bridge: the truncation bridge is searched in the data view (view='x0'), got view={view!r}")
    options = candidates(sch, nfe, view, truncate=truncate, bridge=bridge)
    if corrector:
        options = [(n, p.with_corrector()) for n, p in options]
    if base is not None:
        options = [(n, p) for n, p in options if p.base_order == base] or options
    scored = []
    for name, p in options:
        err = evaluate_rmse(model, p, train_noise[probe], train_traj.end[probe], probe_cond, chunk, ctx)
        if math.isfinite(err):
            scored.append((err, name, p))
    if not scored:
        raise RuntimeError("search: every starting solver diverged on this model")
    scored.sort(key=lambda s: s[0])
    say(f"start: {scored[0][1]} (training RMSE {scored[0][0]:.4g} on {probe_n} samples; "
        f"best of {len(scored)} training-free starts)")
    init_name, init = scored[0][1], scored[0][2]
    train_rmse_init = evaluate_rmse(model, init, train_noise, train_traj.end, train_cond, chunk, ctx)
    val_rmse_init = evaluate_rmse(model, init, val_noise, val_end, val_cond, chunk, ctx)

    fit = _Fit(model, sch, train_noise, train_traj, train_cond, mid_weight, chunk, offsets,
               lambda p: evaluate_rmse(model, p, val_noise, val_end, val_cond, chunk, ctx), samples, ctx, free_sums)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=iterations, desc=f"search nfe={nfe}", unit="it", leave=False)
    fit.bar = bar
    deadline = None if time_budget is None else t_start + time_budget
    # several starts, briefly (the loss is not convex: different training-free solvers lead to
    # different optima), then the best by validation error is optimised to the end
    runs = []
    trial_budget = min(iterations // (2 * max(starts, 1)), 3 * eval_every) if starts > 1 else 0
    for _, name, p in _trial_starts(scored, starts if trial_budget > 0 else 1):
        run = fit.new_run(p, name, optimizer, lr, batch, seed, iterations)
        if trial_budget > 0:
            fit.advance(run, trial_budget, eval_every, patience, deadline)
        runs.append(run)
    run = min(runs, key=lambda r: r.best[0])
    if len(runs) > 1:
        say("trial starts: " + "; ".join(f"{r.name}: validation RMSE {r.best[0]:.4g}" for r in runs)
            + f" -> continuing {run.name}")
    fit.advance(run, iterations - fit.evals, eval_every, patience, deadline)
    if bar is not None:
        bar.close()
    if run.stop:
        say(run.stop)
    final = run.best[1]
    history = [(0, train_rmse_init, val_rmse_init)] + run.history
    return SearchResult(
        params=final,
        nfe=nfe,
        init=init_name,
        continued_from=run.name,
        train_rmse_init=train_rmse_init,
        val_rmse_init=val_rmse_init,
        train_rmse=evaluate_rmse(model, final, train_noise, train_traj.end, train_cond, chunk, ctx),
        val_rmse=run.best[0],
        iterations=fit.evals,
        seconds=time.perf_counter() - t_start,
        teacher_seconds=teacher_seconds,
        teacher_cached=from_cache,
        cpu_seconds=time.process_time() - cpu0,
        model_fingerprint=_teacher.model_fingerprint(model, model.sample_shape),
        samples=samples,
        val_samples=val_samples,
        teacher_steps=teacher_steps,
        history=history,
    )


def _trial_starts(scored: list, count: int) -> list:
    """The ``count`` best starts, with the best of each kind (from ``t_max`` / truncated) among them
    when ``count > 1``: the probe error of a start says little about where its optimisation ends, and
    the two kinds lead to different optima (on gmm16 at NFE 6 the best truncated starts alone end
    worse than the best start from ``t_max``)."""
    chosen = list(scored[:count])
    if count > 1:
        for truncated in (False, True):
            kind = [s for s in scored if (s[2].start_logit is not None) == truncated]
            if kind and not any(s is kind[0] for s in chosen):
                chosen[-1] = kind[0]
    return chosen


@dataclass
class _Run:
    """One optimisation run: its parameters, optimiser and best validated point."""

    name: str
    params: SolverParameters
    opt: torch.optim.Optimizer
    best: tuple
    history: list = field(default_factory=list)
    stale: int = 0
    stop: str | None = None
    step: int = 0
    order: torch.Tensor | None = None
    cursor: int = 0
    batch: int = 0
    running: float | None = None
    gen: torch.Generator | None = None
    sched: object = None
    searched: list = field(default_factory=list)  # the tensors the optimiser moves


class _Fit:
    """The training data and loss, shared by every run of one search (this rank's part of it)."""

    def __init__(self, model, schedule, noise, traj, cond, mid_weight, chunk, offsets, validate,
                 global_samples: int | None = None, ctx: Context | None = None, free_sums: bool = False):
        self.model, self.schedule = model, schedule
        self.noise, self.traj, self.cond = noise, traj, cond
        self.samples = noise.shape[0]  # on this rank
        self.global_samples = global_samples or self.samples  # on all ranks together
        self.ctx = ctx or Context()
        self.mid_weight, self.chunk, self.offsets = mid_weight, chunk, offsets
        self.free_sums = free_sums
        self.validate = validate
        self.evals = 0
        self.bar = None

    def loss(self, params: SolverParameters, index, weight: float) -> tuple[float, float]:
        """Loss on the samples ``index`` (times ``weight``), backpropagated; ``(loss, end-point MSE)``."""
        table = step_table(params, self.schedule)
        end, states = rollout(self.model, self.noise[index], table, _batch_cond(self.cond, index, self.samples))
        sub = self.traj.subset(index)
        loss_end = (end.to(F64) - sub.end).pow(2).mean()
        loss = loss_end
        if self.mid_weight > 0 and states:
            # intermediate states against the teacher at the solver's own times (DS-Solver's trajectory loss)
            mid = sum((s.to(F64) - sub.at(table.times[i + 1])).pow(2).mean() for i, s in enumerate(states))
            loss = loss + self.mid_weight * mid / len(states)
        (loss * weight).backward()
        return float(loss.detach()) * weight, float(loss_end.detach()) * weight

    def full_loss(self, params: SolverParameters, searched: list[torch.Tensor]) -> tuple[float, float]:
        """The loss over the whole training set (all ranks), its gradient summed into ``searched``.

        Each chunk's mean is weighted by its share of the global training set, so the sum over
        chunks and ranks is the global mean: the number and gradient one process would compute.
        """
        total_loss, total_end = 0.0, 0.0
        if self.samples == 0:
            _check_times(params, self.schedule)
        for lo in range(0, self.samples, self.chunk):
            index = torch.arange(lo, min(lo + self.chunk, self.samples))
            l, e = self.loss(params, index, index.numel() / self.global_samples)
            total_loss, total_end = total_loss + l, total_end + e
        self._sync(searched)
        total_loss, total_end = _sum_over_ranks([total_loss, total_end], self.ctx)
        return total_loss, total_end

    def _sync(self, searched: list[torch.Tensor]) -> None:
        """All-reduce the gradients (a rank without samples in a mini-batch contributes zeros)."""
        if self.ctx.world == 1:
            return
        from ..distributed import all_reduce_grads

        for t in searched:
            if t.grad is None:
                t.grad = torch.zeros_like(t)
        all_reduce_grads(searched, 1.0, self.ctx)  # the weights are already in the loss

    def time_up(self, deadline) -> bool:
        """Whether the time budget is spent -- decided together, so that every rank stops at once."""
        if deadline is None:
            return False
        late = float(time.perf_counter() > deadline)
        return _sum_over_ranks([late], self.ctx)[0] > 0

    def new_run(self, start: SolverParameters, name: str, optimizer: str, lr, batch: int, seed: int,
                iterations: int) -> _Run:
        params = start.detached()
        searched = [params.time_logits, params.corrections]
        searched += [params.time_offsets] if self.offsets else []
        searched += [params.gains] if self.free_sums else []
        searched += [params.corrector] if params.corrector is not None else []
        searched += [params.start_logit] if params.start_logit is not None else []
        for t in searched:
            t.requires_grad_(True)
        if optimizer == "lbfgs":
            opt = torch.optim.LBFGS(searched, lr=lr or 1.0, history_size=20, line_search_fn="strong_wolfe",
                                    tolerance_grad=1e-12, tolerance_change=1e-14)
        else:
            opt = torch.optim.Adam(searched, lr=lr or 2e-2)
        run = _Run(name, params, opt, (self.validate(params), params.detached(), 0))
        run.searched = searched
        if optimizer == "adam":
            run.gen = torch.Generator().manual_seed(NOISE_SEED_OFFSET + 2 + int(seed))
            run.order = torch.randperm(self.global_samples, generator=run.gen)
            run.batch = min(batch, self.global_samples)
            run.sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda k: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(k, iterations) / max(iterations, 1))))
        return run

    def _measure(self, run: _Run, train_rmse: float) -> None:
        try:
            val = self.validate(run.params)
        except NonFiniteTimes:
            val = math.inf  # never the best point; counts towards the early stop
        run.history.append((self.evals, train_rmse, val))
        if math.isfinite(val) and val < run.best[0]:
            run.best, run.stale = (val, run.params.detached(), self.evals), 0
        else:
            run.stale += 1
        if self.bar is not None:
            self.bar.set_postfix(train=f"{train_rmse:.3g}", val=f"{val:.3g}", best=f"{run.best[0]:.3g}")

    def advance(self, run: _Run, budget: int, eval_every: int, patience: int, deadline) -> None:
        """Spend up to ``budget`` loss evaluations on ``run`` (validating every ``eval_every``)."""
        if isinstance(run.opt, torch.optim.LBFGS):
            self._advance_lbfgs(run, budget, eval_every, patience, deadline)
        else:
            self._advance_adam(run, budget, eval_every, patience, deadline)

    def _tick(self):
        self.evals += 1
        if self.bar is not None:
            self.bar.update(1)

    def _advance_lbfgs(self, run, budget, eval_every, patience, deadline):
        last = {"train": math.nan}

        def closure():
            run.opt.zero_grad(set_to_none=True)
            try:
                total_loss, total_end = self.full_loss(run.params, run.searched)
            except NonFiniteTimes:
                total_loss = total_end = math.nan
            self._tick()
            if not math.isfinite(total_loss):
                # a line-search trial outside the schedule, or one whose rollout overflows (the loss is
                # summed over ranks, so every rank lands here): a huge finite loss with no gradient
                # makes the strong-Wolfe search step back (NaN or inf would poison its interpolation)
                run.opt.zero_grad(set_to_none=True)
                last["train"] = math.inf
                return torch.tensor(REJECTED_LOSS, dtype=F64)
            last["train"] = math.sqrt(total_end)
            return torch.tensor(total_loss, dtype=F64)

        spent = 0
        while spent < budget and run.stop is None:
            group = run.opt.param_groups[0]
            group["max_iter"] = group["max_eval"] = min(eval_every, budget - spent)
            before = self.evals
            run.opt.step(closure)
            made = self.evals - before
            spent += made
            if made == 0:
                run.stop = f"converged after {self.evals} evaluations"
                break
            self._measure(run, last["train"])
            if made < group["max_eval"]:
                # L-BFGS returns early only when its gradient or step tolerance is met
                run.stop = f"converged after {self.evals} evaluations"
            elif run.stale >= patience:
                run.stop = f"early stop after {self.evals} evaluations (validation flat for {patience} rounds)"
            elif self.time_up(deadline):
                run.stop = f"time budget reached after {self.evals} evaluations"

    def _advance_adam(self, run, budget, eval_every, patience, deadline):
        world, rank = self.ctx.world, self.ctx.rank
        for _ in range(budget):
            if run.cursor + run.batch > self.global_samples:
                run.order, run.cursor = torch.randperm(self.global_samples, generator=run.gen), 0
            index = run.order[run.cursor: run.cursor + run.batch]  # global training indices
            run.cursor += run.batch
            local = index[index % world == rank] // world  # the ones this rank holds (see `shard`)
            run.opt.zero_grad(set_to_none=True)
            e = 0.0
            try:
                if local.numel():
                    _, e = self.loss(run.params, local, local.numel() / index.numel())
                else:
                    _check_times(run.params, self.schedule)
            except NonFiniteTimes:
                # Adam cannot take the step back: stop, keeping the best validated point
                run.stop = f"stopped at iteration {run.step}: the parameters left the schedule (lower lr)"
                return
            self._sync(run.searched)
            e = _sum_over_ranks([e], self.ctx)[0]
            run.opt.step()
            run.sched.step()
            run.step += 1
            self._tick()
            run.running = math.sqrt(e) if run.running is None else 0.9 * run.running + 0.1 * math.sqrt(e)
            if run.step % eval_every == 0:
                self._measure(run, run.running)
                if run.stale >= patience:
                    run.stop = f"early stop at iteration {run.step} (validation flat for {patience} rounds)"
                    return
            if self.time_up(deadline):
                run.stop = f"time budget reached at iteration {run.step}"
                return
