"""The search space of a searched solver and the one formula that turns it into step coefficients.

A searched solver with a budget of ``N`` network evaluations is a linear multistep method

    x_{i+1} = a_i x_i + c_i * sum_{j <= i} M[i, j] D_j ,        i = 0 .. N-1,

where ``D_j`` is the model's prediction at node ``j`` in the solver's *view* and ``x_N`` is the clean
sample (the step after the last node goes to zero noise, as every fewstep solver's does):

* ``view="x0"`` (VP, EDM and every schedule with finite log-SNR at its start): ``D`` are data
  predictions and ``a_i = sigma_{i+1} / sigma_i``, ``c_i = alpha_{i+1} - alpha_i sigma_{i+1} / sigma_i``
  -- the DDIM / first-order DPM-Solver++ step. This is DS-Solver's VP form (Wang et al. 2025, Sec. 6)
  written with the exact exponential-integrator weight instead of their ``sigma (omega_t - omega_s)``
  with ``omega = alpha / sigma``; the two are the same number.
* ``view="velocity"`` (rectified flow): ``D`` are velocities, ``a_i = 1`` and ``c_i = t_{i+1} - t_i``
  -- Euler, DS-Solver's rectified-flow form (their eq. for ``x_{i+1}`` in Sec. 5).

The parameters are

* ``time_logits`` (``N`` numbers): ``p = softmax(time_logits)`` are the fractions of the searched
  coordinate (log-SNR for ``x0``, ``t`` for ``velocity``) between ``t_max`` and ``t_min``: node ``i``
  sits at the cumulative fraction ``p_0 + ... + p_{i-1}`` and ``p_{N-1}`` is the part of the range left
  unused after the last node. Every grid is strictly decreasing and inside the schedule's range, for
  any real logits, so the optimiser needs no constraints (DS-Solver Alg. 1 uses the same softmax; the
  released code forgets to use it inside the integration -- see docs/algorithms/solver-search.md).
* ``start_logit`` (optional, one number): a searched *truncated start*. Without it node 0 is at
  ``t_max`` and the state there is ``initial_scale * noise``; with it the solver starts lower, at the
  coordinate ``c0 + START_RANGE * sigmoid(start_logit) * (c1 - c0)``, from ``sigma(t_0) * noise`` (pure
  noise at a time that is not pure noise, as diffusers' "leading" spacing and fewstep's default at few
  steps do), and the softmax shares above divide the rest of the range. The evaluation the top of the
  schedule would cost goes to the part of the flow that matters; the search weighs that against the
  ``alpha(t_0) E[x0]`` it neglects.
* ``bridge`` (a flag, not searched; ``view="x0"`` only): with a searched start, the *truncation
  bridge* (:func:`fewstep.solvers.base.start_bridge_weight`) is part of the update: the first state
  ``x_0 = sigma(t_0) noise`` is read as ``x_0 + w(t_0) D_0`` with
  ``w = alpha(t_0) - sigma(t_0) alpha(t_max) / sigma(t_max)`` -- the skipped top of the flow
  integrated with the data prediction made at node 0, at no extra evaluation. Only the steps that
  read ``x_0`` change: step 0 gets ``a_0 w`` more weight on ``D_0`` (and so does corrector row 1).
  ``w`` is differentiable in the start, so the search fits the coefficients *with* the bridge.
* ``corrections`` (strictly lower triangle of an ``N x N`` matrix): additive changes to the weights of
  past predictions; each row's diagonal absorbs minus their sum, so every row of ``M`` sums to one
  *exactly* (a constant prediction is integrated exactly, as the paper's constraint requires).

``M = B(grid) + corrections`` where ``B`` is DPM-Solver++ multistep of order ``base_order`` (``x0``)
or variable-step Adams–Bashforth (``velocity``) *on the current grid*: with zero corrections the
searched solver is exactly that training-free solver, and corrections stay meaningful while the grid
moves (as GAS's "corrections to DPM-Solver++(3M)", Oganov et al. 2025). ``base_order=1`` with zero
corrections is DS-Solver's own initialisation (DDIM / Euler).

:func:`step_table` is used twice, so training and inference cannot drift: with autograd during the
search, and ``.tolist()``-ed into a :class:`~fewstep.solvers.base.MultistepPlan` by the ``searched``
solver.

Example::

    >>> import torch
    >>> from fewstep import schedules
    >>> from fewstep.search.parameterisation import SolverParameters, step_table
    >>> sch = schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000))
    >>> p = SolverParameters.from_grid(sch, torch.tensor([999.0, 500.0, 100.0, 0.0]), base_order=2)
    >>> table = step_table(p, sch)
    >>> [round(v) for v in table.times.tolist()]
    [999, 500, 100, 0]
    >>> bool(torch.allclose(table.weights.sum(1), table.scale))   # every row of M sums to one
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..schedules import RectifiedFlow, Schedule, as_f64, finite_lambda_range

__all__ = [
    "VIEWS",
    "SolverParameters",
    "StepTable",
    "default_view",
    "coordinate_range",
    "grid_from_logits",
    "base_matrix",
    "step_table",
    "bridge_weight",
    "NonFiniteTimes",
]

F64 = torch.float64
VIEWS = ("x0", "velocity")
#: diffusers' and fewstep's ``lower_order_final`` threshold (DPM-Solver++ below 15 points).
LOWER_ORDER_FINAL_BELOW = 15
#: Share of the coordinate left after the last node when a grid ends exactly at ``t_min``
#: (a softmax cannot give zero); 1e-4 of the range moves the last node by a negligible amount.
END_SLACK = 1e-4
_GL_X, _GL_W = np.polynomial.legendre.leggauss(8)
#: How far a row of searched weights may sum from one when gains are searched (``free_sums``).
GAIN_RANGE = 0.5
#: A searched start lies in the first ``START_RANGE`` of the searched coordinate's range.
START_RANGE = 0.5


def default_view(schedule: Schedule) -> str:
    """``"velocity"`` for rectified flow (DS-Solver's flow form), ``"x0"`` otherwise (its VP form)."""
    return "velocity" if isinstance(schedule, RectifiedFlow) else "x0"


@dataclass
class SolverParameters:
    """The searched quantities of one solver (float64 tensors; they may require grad during search).

    Attributes:
        view: ``"x0"`` or ``"velocity"`` (what the stored predictions are).
        base_order: order of the training-free solver the corrections are added to (1-3).
        time_logits: ``(N,)``; see the module docstring.
        corrections: ``(N, N)``; only the strictly lower triangle is used.
    """

    view: str
    base_order: int
    time_logits: torch.Tensor
    corrections: torch.Tensor
    time_offsets: torch.Tensor | None = None
    #: ``(N,)``: row ``i`` of ``M`` sums to ``1 + GAIN_RANGE * tanh(gains[i])`` (zero: the paper's
    #: sum-to-one rows; bounded, so no line search can make a step blow up)
    gains: torch.Tensor | None = None
    #: ``(N, N)`` or ``None``: a searched *corrector* (UniPC's idea, Zhao et al. 2023, with searched
    #: weights). Once node ``i >= 1`` is evaluated, its state is recomputed from the previous one with
    #: the new prediction included: row ``i`` of the corrector matrix is row ``i - 1`` of ``M`` plus
    #: ``corrector[i, j]`` on ``D_j`` (``j < i``) and minus their sum on ``D_i`` -- zero: no correction.
    corrector: torch.Tensor | None = None
    #: ``(1,)`` or ``None``: the searched truncated start (see the module docstring; ``None``: ``t_max``)
    start_logit: torch.Tensor | None = None
    #: the truncation bridge at a searched start (see the module docstring; no effect without one)
    bridge: bool = False

    def __post_init__(self):
        if self.view not in VIEWS:
            raise ValueError(f"view: expected one of {list(VIEWS)}, got {self.view!r}")
        if not isinstance(self.base_order, int) or not 1 <= self.base_order <= 3:
            raise ValueError(f"base_order: expected 1, 2 or 3, got {self.base_order!r}")
        n = self.time_logits.numel()
        if self.time_logits.dim() != 1 or n < 1:
            raise ValueError(f"time_logits: expected a non-empty 1-D tensor, got shape {tuple(self.time_logits.shape)}")
        if tuple(self.corrections.shape) != (n, n):
            raise ValueError(f"corrections: expected shape ({n}, {n}), got {tuple(self.corrections.shape)}")
        if self.time_offsets is None:
            self.time_offsets = torch.zeros(n, dtype=F64)
        if tuple(self.time_offsets.shape) != (n,):
            raise ValueError(f"time_offsets: expected shape ({n},), got {tuple(self.time_offsets.shape)}")
        if self.gains is None:
            self.gains = torch.zeros(n, dtype=F64)
        if tuple(self.gains.shape) != (n,):
            raise ValueError(f"gains: expected shape ({n},), got {tuple(self.gains.shape)}")
        if self.corrector is not None and tuple(self.corrector.shape) != (n, n):
            raise ValueError(f"corrector: expected shape ({n}, {n}), got {tuple(self.corrector.shape)}")
        if self.start_logit is not None and tuple(self.start_logit.shape) != (1,):
            raise ValueError(f"start_logit: expected shape (1,), got {tuple(self.start_logit.shape)}")
        if not isinstance(self.bridge, bool):
            raise TypeError(f"bridge: expected True or False, got {self.bridge!r}")
        if self.bridge and self.view != "x0":
            raise ValueError(f"bridge: the truncation bridge is searched in the data view (view='x0'), got view={self.view!r}")

    @property
    def bridged(self) -> bool:
        """Whether the truncation bridge is applied (a searched start with ``bridge``)."""
        return self.bridge and self.start_logit is not None

    @property
    def nfe(self) -> int:
        return self.time_logits.numel()

    def num_free(self) -> int:
        """Number of searched numbers: ``N`` logits (one is redundant: softmax) + ``N(N-1)/2`` weights
        (+ 1 for a searched start)."""
        n = self.nfe
        return n + n * (n - 1) // 2 + (self.start_logit is not None)

    def detached(self) -> "SolverParameters":
        return SolverParameters(self.view, self.base_order, self.time_logits.detach().clone(),
                                self.corrections.detach().clone(), self.time_offsets.detach().clone(),
                                self.gains.detach().clone(),
                                None if self.corrector is None else self.corrector.detach().clone(),
                                None if self.start_logit is None else self.start_logit.detach().clone(),
                                self.bridge)

    def tensors(self) -> list[torch.Tensor]:
        """``[time_logits, corrections, time_offsets, gains]``, then ``corrector`` and ``start_logit``
        when there are."""
        out = [self.time_logits, self.corrections, self.time_offsets, self.gains]
        out += [self.corrector] if self.corrector is not None else []
        return out + ([self.start_logit] if self.start_logit is not None else [])

    def with_corrector(self) -> "SolverParameters":
        """A copy with a zero corrector (the same solver, with the corrector's weights to search)."""
        p = self.detached()
        if p.corrector is None:
            p.corrector = torch.zeros(self.nfe, self.nfe, dtype=F64)
        return p

    @classmethod
    def from_grid(cls, schedule: Schedule, times, *, base_order: int = 1, view: str | None = None,
                  bridge: bool = False) -> "SolverParameters":
        """Parameters reproducing a training-free solver: the grid ``times`` (decreasing), DPM-Solver++ /
        Adams–Bashforth of ``base_order``, zero corrections. A grid starting at ``t_max`` gives no
        searched start; one starting lower (inside the first :data:`START_RANGE` of the range) gives a
        searched start there, from ``sigma(times[0]) * noise`` (with ``bridge``, plus the truncation
        bridge: then it is fewstep's bridged solver on that truncated grid).

        A last node at ``t_min`` moves up by :data:`END_SLACK` of its interval (a softmax share cannot
        be zero); every other node is reproduced to rounding."""
        view = view or default_view(schedule)
        logits, start = logits_from_grid(schedule, times, view)
        n = logits.numel()
        return cls(view, base_order, logits, torch.zeros(n, n, dtype=F64), start_logit=start,
                   bridge=bridge and view == "x0")


@dataclass
class StepTable:
    """The coefficients of every step (float64 tensors, differentiable in the parameters).

    ``x_{i+1} = a[i] * x_i + sum_j weights[i, j] * D_j``; ``weights = scale[:, None] * M``.
    ``times[i]`` is node ``i``; ``coords`` the same nodes in the searched coordinate.
    """

    view: str
    times: torch.Tensor
    coords: torch.Tensor
    eval_times: torch.Tensor
    a: torch.Tensor
    scale: torch.Tensor
    matrix: torch.Tensor
    #: ``sigma(times[0])`` as a 0-d tensor when the solver starts below ``t_max`` (a searched start):
    #: the first state is ``start_sigma * noise``; ``None``: ``initial_scale * noise``
    start_sigma: torch.Tensor | None = None
    #: ``(N, N)`` or ``None``: row ``i >= 1`` recomputes the state at node ``i`` once ``D_i`` is known,
    #: ``x_i = a[i - 1] x_{i-1} + sum_{j <= i} corrector_weights[i, j] D_j`` (row 0 is unused)
    corrector_weights: torch.Tensor | None = None
    #: the truncation bridge's weight ``w(t_0)`` as a 0-d tensor (``None``: no bridge): the first state
    #: is read as ``x_0 + w D_0``, which :attr:`weights` (and ``corrector_weights``) fold in
    bridge_weight: torch.Tensor | None = None

    @property
    def weights(self) -> torch.Tensor:
        w = self.scale[:, None] * self.matrix
        if self.bridge_weight is not None:
            w = w + _first_entry(w.shape[0], w.shape[1], 0) * (self.a[0] * self.bridge_weight)
        return w

    @property
    def nfe(self) -> int:
        return self.times.numel()


# ------------------------------------------------------------------------------------ time grid
def coordinate_range(schedule: Schedule, view: str) -> tuple[float, float]:
    """Start and end of the searched coordinate: log-SNR (``x0``) or ``t`` (``velocity``).

    For a schedule starting at pure noise (lambda = -inf) the log-SNR axis starts where fewstep's
    log-SNR grids do (:func:`fewstep.schedules.finite_lambda_range`); node 0 stays at ``t_max``.
    """
    if view == "velocity":
        return float(schedule.t_max), float(schedule.t_min)
    lam0, lam1, _ = finite_lambda_range(schedule)
    return lam0, lam1


def _to_time(schedule: Schedule, view: str, coords: torch.Tensor) -> torch.Tensor:
    if view == "velocity":
        return coords
    return schedule.t_of_lambda(coords)


def _to_coord(schedule: Schedule, view: str, times: torch.Tensor) -> torch.Tensor:
    if view == "velocity":
        return times
    return schedule.lambda_(times)


def start_coordinate(schedule: Schedule, view: str, start_logit: torch.Tensor | None):
    """The searched coordinate where the solver starts: ``c0``, or inside the first :data:`START_RANGE`."""
    c0, c1 = coordinate_range(schedule, view)
    if start_logit is None:
        return c0
    return c0 + START_RANGE * torch.sigmoid(start_logit.to(F64).reshape(())) * (c1 - c0)


def grid_from_logits(schedule: Schedule, view: str, time_logits: torch.Tensor,
                     start_logit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(times, coords)`` of the ``N`` nodes, differentiable in ``time_logits`` (and ``start_logit``)."""
    _, c1 = coordinate_range(schedule, view)
    cs = start_coordinate(schedule, view, start_logit)
    p = torch.softmax(time_logits.to(F64), dim=0)
    u = torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(p, 0)[:-1]])
    coords = cs + u * (c1 - cs)
    if start_logit is None:
        # node 0 is t_max itself (on a pure-noise schedule its log-SNR is -inf, not c0)
        t = _to_time(schedule, view, coords[1:]).clamp(schedule.t_min, schedule.t_max)
        times = torch.cat([torch.full((1,), float(schedule.t_max), dtype=F64), t])
    else:
        times = _to_time(schedule, view, coords).clamp(schedule.t_min, schedule.t_max)
    return times, coords


def logits_from_grid(schedule: Schedule, times, view: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inverse of :func:`grid_from_logits`: ``(time_logits, start_logit)`` placing the nodes at
    ``times`` (``start_logit`` is ``None`` for a grid starting at ``t_max``; see ``from_grid``)."""
    t = as_f64(times).detach().reshape(-1)
    if t.numel() < 1:
        raise ValueError("times: expected at least one time")
    if t.numel() > 1 and not bool((t[1:] < t[:-1]).all()):
        raise ValueError("times: must be strictly decreasing")
    c0, c1 = coordinate_range(schedule, view)
    start = None
    if abs(float(t[0]) - schedule.t_max) > 1e-9 * max(1.0, abs(schedule.t_max)):
        share = (float(_to_coord(schedule, view, t[:1])) - c0) / (c1 - c0) / START_RANGE
        if not 0.0 < share < 1.0:
            raise ValueError(f"times: a searched grid starts at t_max={schedule.t_max:g} or within the first "
                             f"{START_RANGE:g} of the range below it, got {t.tolist()[:3]}...")
        start = torch.tensor([math.log(share / (1.0 - share))], dtype=F64)
        c0 = float(start_coordinate(schedule, view, start))
    u = ((_to_coord(schedule, view, t) - c0) / (c1 - c0)).clamp(0.0, 1.0)
    u[0] = 0.0
    n = u.numel()
    if n > 1:
        last = 1.0 - END_SLACK * (1.0 - float(u[-2]))
        u[-1] = min(float(u[-1]), last)
    else:
        u = u * 0.0
    p = torch.diff(torch.cat([u, torch.ones(1, dtype=F64)]))
    # a node at exactly the start of a pure-noise log-SNR axis gives p = 0: keep it representable
    p = p.clamp_min(1e-12)
    return torch.log(p / p.sum()), start


# ------------------------------------------------------------------------------------ base weights
def _base_orders(n: int, order: int, view: str) -> list[int]:
    """Orders of the training-free base at each step (fewstep's and diffusers' rules for DPM-Solver++)."""
    out = []
    for i in range(n):
        p = min(order, i + 1)
        if view == "x0":
            if i == n - 1:
                p = 1  # the step to zero noise has h = inf: only the first-order term survives
            elif n < LOWER_ORDER_FINAL_BELOW and i == n - 2:
                p = min(p, 2)
        out.append(p)
    return out


def _dpmpp_row(coords: torch.Tensor, i: int, order: int) -> list[torch.Tensor]:
    """DPM-Solver++ multistep weights on ``D_i, D_{i-1}, ...`` relative to the DDIM weight (sum = 1).

    Order 2 is the midpoint form of Lu et al. 2022 (Alg. 2): ``(1 + 1/(2 r0), -1/(2 r0))``; order 3 is
    diffusers' third-order update divided by ``alpha_t (1 - e^{-h})``, the same numbers as fewstep's
    ``dpm++`` solver (``solvers/multistep.py``).
    """
    one = torch.ones((), dtype=F64)
    if order == 1:
        return [one]
    h = coords[i + 1] - coords[i]
    r0 = (coords[i] - coords[i - 1]) / h
    if order == 2:
        return [1.0 + 0.5 / r0, -0.5 / r0]
    r1 = (coords[i - 1] - coords[i - 2]) / h
    em1 = -torch.expm1(-h)  # 1 - e^{-h}
    phi2 = (1.0 - em1 / h) / em1  # h phi_2(-h) / (1 - e^{-h})
    phi3 = (0.5 - (h - em1) / (h * h)) / em1  # h phi_3(-h) / (1 - e^{-h})
    # diffusers' divided differences, as weights on the values (D_i, D_{i-1}, D_{i-2}):
    # d1_0 = (D_i - D_{i-1}) / r0, d1_1 = (D_{i-1} - D_{i-2}) / r1,
    # D1 = d1_0 + r0 / (r0 + r1) (d1_0 - d1_1), D2 = (d1_0 - d1_1) / (r0 + r1)
    zero = torch.zeros((), dtype=F64)
    d1_0 = (1.0 / r0, -1.0 / r0, zero)
    d1_1 = (zero, 1.0 / r1, -1.0 / r1)
    k = r0 / (r0 + r1)
    out = []
    for j in range(3):
        d1 = d1_0[j] + k * (d1_0[j] - d1_1[j])
        d2 = (d1_0[j] - d1_1[j]) / (r0 + r1)
        out.append((1.0 if j == 0 else 0.0) + phi2 * d1 + phi3 * d2)
    return out


def _adams_row(coords: torch.Tensor, i: int, order: int) -> list[torch.Tensor]:
    """Variable-step Adams–Bashforth weights on ``D_i, D_{i-1}, ...`` divided by the step (sum = 1):
    ``(1/h) int_{c_i}^{c_{i+1}} l_j(c) dc`` for the Lagrange basis through the last ``order`` nodes.
    Gauss–Legendre with 8 points integrates these polynomials exactly."""
    if order == 1:
        return [torch.ones((), dtype=F64)]
    a, b = coords[i], coords[i + 1]
    half = 0.5 * (b - a)
    x = half * torch.as_tensor(_GL_X, dtype=F64) + 0.5 * (a + b)
    w = torch.as_tensor(_GL_W, dtype=F64) * 0.5  # weights of the mean over [a, b]
    nodes = [coords[i - k] for k in range(order)]
    out = []
    for j in range(order):
        basis = torch.ones_like(x)
        for q in range(order):
            if q != j:
                basis = basis * (x - nodes[q]) / (nodes[j] - nodes[q])
        out.append((w * basis).sum())
    return out


def base_matrix(coords: torch.Tensor, end_coord: float, order: int, view: str) -> torch.Tensor:
    """``B``: the training-free base solver's weights (lower triangular, rows summing to one)."""
    n = coords.numel()
    full = torch.cat([coords, torch.full((1,), end_coord, dtype=F64)])
    rows = []
    for i, p in enumerate(_base_orders(n, order, view)):
        row_fn = _dpmpp_row if view == "x0" else _adams_row
        vals = row_fn(full, i, p)
        entries = [torch.zeros((), dtype=F64)] * n
        for k, v in enumerate(vals):
            entries[i - k] = v
        rows.append(torch.stack(entries))
    return torch.stack(rows)


# ------------------------------------------------------------------------------------ the table
def correction_matrix(corrections: torch.Tensor) -> torch.Tensor:
    """Strictly-lower corrections with minus their row sums on the diagonal: rows sum to zero exactly."""
    low = torch.tril(corrections.to(F64), diagonal=-1)
    return low - torch.diag(low.sum(1))


class NonFiniteTimes(ValueError):
    """The parameters put a node, or a time told to the network, outside the schedule (NaN): an
    optimiser step far out, such as an L-BFGS line-search trial (the search steps back from it)."""


def step_table(params: SolverParameters, schedule: Schedule) -> StepTable:
    """Map searched parameters and a schedule to every step's coefficients (float64, differentiable).

    The searched solver and the differentiable search both call this function; see the module
    docstring for the update it defines.
    """
    view = params.view
    times, coords = grid_from_logits(schedule, view, params.time_logits, params.start_logit)
    base = base_matrix(coords, _end_coord(view), params.base_order, view)
    row_sums = 1.0 + GAIN_RANGE * torch.tanh(params.gains.to(F64))
    matrix = (base + correction_matrix(params.corrections)) * row_sums[:, None]
    # the network may be asked at a time other than the state's (decoupled "model time", as LD3 and
    # GAS search); written as a difference so that zero offsets give exactly the grid times
    shift = _to_time(schedule, view, coords + params.time_offsets.to(F64)) - _to_time(schedule, view, coords)
    eval_times = (times + shift).clamp(schedule.t_min, schedule.t_max)
    if not (bool(torch.isfinite(times).all()) and bool(torch.isfinite(eval_times).all())):
        raise NonFiniteTimes(f"params: the searched parameters give non-finite times (grid {times.tolist()}, "
                             f"network times {eval_times.tolist()}); time_logits, start_logit or time_offsets "
                             "are far outside the schedule")
    table = _table(schedule, view, times, coords, eval_times, matrix)
    if params.start_logit is not None:
        table.start_sigma = schedule.sigma(times[0])
        if params.bridge:
            table.bridge_weight = bridge_weight(schedule, times[0])
    if params.corrector is not None:
        table.corrector_weights = _corrector_weights(table, params.corrector)
    return table


def _corrector_weights(table: StepTable, corrector: torch.Tensor) -> torch.Tensor:
    """Row ``i >= 1``: the predictor row ``i - 1`` moved onto ``D_0..D_i`` by the searched corrections
    (on ``D_j``, ``j < i``) with minus their sum on the new ``D_i``: every row keeps its sum."""
    n = table.nfe
    low = torch.tril(corrector.to(F64), diagonal=-1)
    shifted = torch.cat([torch.zeros(1, n, dtype=F64), table.matrix[:-1]])  # row i: predictor row i - 1
    moved = shifted + low - torch.diag(low.sum(1))
    scale = torch.cat([torch.zeros(1, dtype=F64), table.scale[:-1]])
    out = scale[:, None] * moved
    if table.bridge_weight is not None and n > 1:
        # row 1 restarts from the first state, read as x_0 + w D_0 (as predictor row 0)
        out = out + _first_entry(n, n, 1) * (table.a[0] * table.bridge_weight)
    return out


def _first_entry(rows: int, cols: int, row: int) -> torch.Tensor:
    """A ``rows x cols`` float64 matrix with a one at ``(row, 0)``."""
    e = torch.zeros(rows, cols, dtype=F64)
    e[row, 0] = 1.0
    return e


def bridge_weight(schedule: Schedule, t0: torch.Tensor) -> torch.Tensor:
    """The truncation bridge's weight at a start ``t0`` below ``t_max`` (differentiable in ``t0``):
    ``alpha(t0) - sigma(t0) alpha(t_max) / sigma(t_max)``, the same number as
    :func:`fewstep.solvers.base.start_bridge_weight`."""
    top = torch.tensor(float(schedule.t_max), dtype=F64)
    return schedule.alpha(t0) - schedule.sigma(t0) * (schedule.alpha(top) / schedule.sigma(top))


def _end_coord(view: str) -> float:
    # velocity: the final Euler step goes to t = 0 (clean data); x0: unused, the step to zero
    # noise is first order in the base
    return 0.0 if view == "velocity" else math.inf


def _table(schedule, view, times, coords, eval_times, matrix) -> StepTable:
    if view == "velocity":
        t_next = torch.cat([times[1:], torch.zeros(1, dtype=F64)])
        a = torch.ones_like(times)
        scale = t_next - times
    else:
        alpha, sigma = schedule.alpha(times), schedule.sigma(times)
        alpha_next = torch.cat([alpha[1:], torch.ones(1, dtype=F64)])
        sigma_next = torch.cat([sigma[1:], torch.zeros(1, dtype=F64)])
        a = sigma_next / sigma
        scale = alpha_next - alpha * a
    return StepTable(view=view, times=times, coords=coords, eval_times=eval_times, a=a, scale=scale, matrix=matrix)


def training_free_table(schedule: Schedule, times, base_order: int, view: str | None = None) -> StepTable:
    """The base solver alone (DPM-Solver++ or Adams–Bashforth of ``base_order``) on exactly ``times``
    -- what :func:`step_table` gives for zero corrections and offsets, without the softmax grid."""
    view = view or default_view(schedule)
    times = as_f64(times).detach().reshape(-1)
    coords = _to_coord(schedule, view, times)
    if view == "x0" and times.numel() > 0 and not math.isfinite(float(coords[0])):
        coords = coords.clone()
        coords[0] = coordinate_range(schedule, view)[0]  # pure noise: the log-SNR axis' finite start
    matrix = base_matrix(coords, _end_coord(view), base_order, view)
    return _table(schedule, view, times, coords, times, matrix)
