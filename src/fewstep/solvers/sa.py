"""SA-Solver (Xue et al., NeurIPS 2023): stochastic Adams predictor–corrector in data view.

The variance-controlled reverse SDE (SA-Solver §3; research note §2.1)::

    dx = [f x - (1 + tau^2)/2 g^2 score] dt + tau g dW,      tau(t) >= 0

has the marginals of the diffusion for every ``tau``: ``tau = 0`` is the probability-flow ODE,
``tau = 1`` the reverse SDE. With ``tau`` held at its value at the step's start (as the paper's code
and diffusers do), ``a = 1 + tau^2`` and ``h = lambda_t - lambda_s``, the exact solution in data view is::

    x_t = (sigma_t / sigma_s) e^{-tau^2 h} x_s + a alpha_t int_{-h}^{0} e^{a u} D(lambda_t + u) du
          + sigma_t sqrt(1 - e^{-2 tau^2 h}) xi

(using ``sigma_t e^{-tau^2 lambda_t} e^{a lambda} = alpha_t e^{a u}``, ``u = lambda - lambda_t``).

* **SA-Predictor** (stochastic Adams–Bashforth, order ``p``): ``D`` is replaced by its Lagrange
  interpolant in ``lambda`` through the ``p`` newest predictions; the integrals of the basis against
  ``e^{a u}`` are closed forms (research §2.4), computed here in float64 in the shifted variable ``u``
  with the stable series/recurrence for ``int_0^1 e^{-c s} s^k ds``.
* **SA-Corrector** (stochastic Adams–Moulton, order ``c``): once the model has been evaluated at the
  predicted point, the same step is redone from ``x_s`` with the interpolant through the new
  prediction and the ``c - 1`` before it, and **the same draw** ``xi`` (PEC mode: one evaluation per
  step; the stored prediction is the one at the predicted point, as in the paper and diffusers).
  In the shared :func:`~fewstep.solvers.base.run_multistep` this is the plan's ``correctors[i]``
  applied with ``z_prev``, the predictor's draw of the step that reached node ``i``.

Order rules (diffusers' ``SASolverScheduler``): warm-up uses at most the predictions that exist
(predictor ``min(p, i + 1)``, corrector ``min(c, i + 1)``); with ``lower_order_final`` the steps near the
end of the grid use ``min(p, steps left)`` and ``min(c, steps left + 1)``. The final step to zero noise
returns the last data prediction (the interpolant cannot be integrated to ``lambda = inf``), so the
corrector of the last grid point is skipped (it could not change the result).

``order2_rescale`` (off by default; on in diffusers and in the paper code's few-step mode): when a
predictor or corrector uses exactly two points, the weight of their difference uses ``h^2 / 2`` instead of
the ``e^{a u}``-weighted moment — an ``O(h^3)`` change "similar to UniPC" that keeps the order. On
log-SNR grids it made the ODE error 4x larger at NFE 10-30 and the sliced W2 on the mixture testbeds
worse at NFE 10 and 20 (docs/algorithms/sa-solver.md), so fewstep integrates the interpolant exactly;
pass ``order2_rescale=True`` to reproduce diffusers.

``tau``: a number (constant), a callable ``tau(t)`` of schedule time ``t`` (for :class:`DiscreteVP`
the timestep index, so diffusers' ``tau_func`` can be passed as is), a tuple ``(value, t_lo, t_hi)``
meaning ``value`` on ``t_lo <= t <= t_hi`` and 0 elsewhere, or ``None`` for the SA-Solver default:
1 on the middle of the trajectory and 0 at both ends. For :class:`DiscreteVP` that is diffusers'
``200 <= t <= 800`` (scaled to the table length); for other schedules it is the same noise levels,
``lambda`` in ``[lambda_800, lambda_200]`` of the DDPM linear schedule (about ``[-3.24, 0.33]``).

Example::

    >>> import torch, fewstep
    >>> from fewstep import schedules, testbeds
    >>> sch = schedules.LinearVP()
    >>> gm = testbeds.Gaussian(mean=0.3, std=0.5, dim=2)
    >>> noise = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> x0 = fewstep.sample(gm.model(sch), noise, solver="sa", nfe=20, tau=0.0)   # tau = 0: an ODE solver
    >>> bool((x0 - gm.reference(noise, sch)).abs().max() < 2e-2)
    True
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..schedules import DiscreteVP, Node, Schedule
from .base import Step, nodes_with_end, register
from .sde import StochasticSolver, final_step

__all__ = ["SASolver", "sa_step", "sa_orders", "exp_moments", "default_tau", "resolve_tau"]

# --------------------------------------------------------------------------------------- the maths


def _g(k: int, c: float) -> float:
    """``int_0^1 e^{-c s} s^k ds`` for ``c >= 0``: series for small ``c`` (no cancellation), the
    upward recurrence ``g_k = (k g_{k-1} - e^{-c}) / c`` (stable for ``c > k`` roughly) otherwise."""
    if c == math.inf:
        return 0.0
    if c < 1.5:
        total, term, n = 0.0, 1.0, 0  # term = (-c)^n / n!
        while True:
            piece = term / (n + k + 1)
            total += piece
            if abs(piece) < 1e-18 * abs(total):
                return total
            n += 1
            term *= -c / n
    value = -math.expm1(-c) / c
    e = math.exp(-c)
    for j in range(1, k + 1):
        value = (j * value - e) / c
    return value


def exp_moments(a: float, h: float, kmax: int) -> list[float]:
    """``J_k = int_{-h}^{0} e^{a u} u^k du`` for ``k = 0..kmax`` (``h`` may be ``inf``); float64."""
    if h == math.inf:
        return [(-1.0) ** k * math.factorial(k) / a ** (k + 1) for k in range(kmax + 1)]
    return [(-1.0) ** k * h ** (k + 1) * _g(k, a * h) for k in range(kmax + 1)]


def _rescale_gap(c: float) -> float:
    """``1/2 - int_0^1 (1 - s) e^{-c s} ds = int_0^1 (1 - s)(1 - e^{-c s}) ds``, without cancellation."""
    if c < 2.0:
        total, term, n = 0.0, 1.0, 0  # term = c^n / n!
        while True:
            n += 1
            term *= c / n
            piece = (-1.0) ** (n + 1) * term / ((n + 1) * (n + 2))
            total += piece
            if abs(piece) < 1e-18 * abs(total):
                return total
    return 0.5 - (_g(0, c) - _g(1, c))


def _lagrange_monomials(nodes: list[float]) -> list[list[float]]:
    """Ascending monomial coefficients of each Lagrange basis polynomial on ``nodes``."""
    out = []
    for j, uj in enumerate(nodes):
        poly, denom = [1.0], 1.0
        for m, um in enumerate(nodes):
            if m == j:
                continue
            # multiply by (u - um)
            poly = [(poly[k - 1] if k > 0 else 0.0) - um * (poly[k] if k < len(poly) else 0.0) for k in range(len(poly) + 1)]
            denom *= uj - um
        out.append([p / denom for p in poly])
    return out


def sa_step(s: Node, t: Node, tau: float, points: list[Node], *, corrector: bool, rescale: bool = True) -> Step:
    """One SA-Predictor (``corrector=False``) or SA-Corrector step ``s -> t`` in data view.

    ``points`` are the nodes whose predictions are interpolated, newest first (the predictor's
    newest is ``s``, the corrector's is ``t``). Returns ``x_t = a x_s + sum_j d[j] D_j + noise * xi``.
    """
    if t.sigma == 0.0:
        return final_step()
    h = t.lam - s.lam
    tau2 = float(tau) ** 2
    a = 1.0 + tau2
    if tau2 == 0.0:
        decay, noise = 1.0, 0.0
    elif h == math.inf:
        decay, noise = 0.0, t.sigma
    else:
        decay, noise = math.exp(-tau2 * h), t.sigma * math.sqrt(-math.expm1(-2.0 * tau2 * h))
    x_coef = t.sigma / s.sigma * decay
    if len(points) == 1:
        weights = [t.alpha * (1.0 if h == math.inf else -math.expm1(-a * h))]
    else:
        u = [p.lam - t.lam for p in points]
        moments = exp_moments(a, h, len(points) - 1)
        weights = [a * t.alpha * sum(l * m for l, m in zip(basis, moments)) for basis in _lagrange_monomials(u)]
        if rescale and len(points) == 2:
            # diffusers / paper code: the difference term with h^2/2 in place of its e^{a u} moment
            delta = a * t.alpha * h * _rescale_gap(a * h)
            if not corrector:
                delta *= h / (points[0].lam - points[1].lam)
            weights[0] += delta
            weights[1] -= delta
    return Step(a=x_coef, d=tuple(weights), noise=noise)


def sa_orders(grid: list[Node], predictor_order: int, corrector_order: int, *,
              lower_order_final: bool) -> tuple[list[int], list[int]]:
    """Per-node predictor and corrector orders (0 = no corrector) for a grid of evaluation nodes.

    Warm-up and ``lower_order_final`` follow diffusers' ``SASolverScheduler``; a first node at pure noise
    (``lambda = -inf``) is never interpolated through. Node ``N-1`` predicts to zero noise (order 1) and
    has no corrector (its result would be discarded).
    """
    n = len(grid)
    pure_noise_start = n > 0 and grid[0].lam == -math.inf
    pred, corr = [], []
    for i in range(n):
        if i == n - 1:
            p = 1
        else:
            p = min(predictor_order, i + 1)
            if lower_order_final:
                p = min(p, n - 1 - i)
            if pure_noise_start and i >= 1:
                p = min(p, i)
        c = 0
        if corrector_order > 0 and 1 <= i <= n - 2:
            c = min(corrector_order, i + 1)
            if lower_order_final:
                c = min(c, n - i + 1)
            if pure_noise_start:
                c = min(c, i)
        pred.append(p)
        corr.append(c)
    return pred, corr


# ------------------------------------------------------------------------------------------- tau
_REFERENCE_WINDOW: tuple[float, float] | None = None


def _reference_lambda_window() -> tuple[float, float]:
    """``(lambda(800), lambda(200))`` of the DDPM linear schedule: the noise levels of diffusers' default."""
    global _REFERENCE_WINDOW
    if _REFERENCE_WINDOW is None:
        ref = DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
        _REFERENCE_WINDOW = (float(ref.lambda_(800.0)), float(ref.lambda_(200.0)))
    return _REFERENCE_WINDOW


def default_tau(schedule: Schedule) -> Callable[[float], float]:
    """The SA-Solver default: ``tau = 1`` on the middle of the trajectory, 0 at both ends (module docstring)."""
    if isinstance(schedule, DiscreteVP):
        n = schedule.num_train_timesteps
        lo, hi = 0.2 * n, 0.8 * n  # diffusers: 1 if 200 <= t <= 800 else 0 (for 1000 timesteps)
        return lambda t: 1.0 if lo <= t <= hi else 0.0
    lam_lo, lam_hi = _reference_lambda_window()
    return lambda t: 1.0 if lam_lo <= float(schedule.lambda_(t)) <= lam_hi else 0.0


def _check_tau_option(tau) -> None:
    if tau is None or callable(tau):
        return
    if _is_number(tau):
        if not (math.isfinite(tau) and tau >= 0):
            raise ValueError(f"tau: a constant must be a finite number >= 0, got {tau!r}")
        return
    if isinstance(tau, (tuple, list)) and len(tau) == 3 and all(_is_number(v) for v in tau):
        value, lo, hi = (float(v) for v in tau)
        if not (math.isfinite(value) and value >= 0 and lo <= hi):
            raise ValueError(f"tau: (value, t_lo, t_hi) needs value >= 0 and t_lo <= t_hi, got {tuple(tau)!r}")
        return
    raise ValueError(
        f"tau: expected a number >= 0, a callable tau(t) of schedule time, a tuple (value, t_lo, t_hi) "
        f"or None (the default window), got {tau!r}"
    )


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def resolve_tau(tau, schedule: Schedule) -> Callable[[float], float]:
    """Turn the ``tau`` option into a function of schedule time."""
    if tau is None:
        return default_tau(schedule)
    if callable(tau):
        return tau
    if _is_number(tau):
        value = float(tau)
        return lambda t: value
    value, lo, hi = (float(v) for v in tau)
    return lambda t: value if lo <= t <= hi else 0.0


def _tau_at(fn, t: float) -> float:
    try:
        v = fn(t)
    except Exception as e:  # the user's callable: name it in the error
        raise ValueError(f"tau: the callable raised {type(e).__name__}: {e} at t={t:g}") from e
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if not _is_number(v) or not math.isfinite(v) or v < 0:
        raise ValueError(f"tau: must give a finite number >= 0, got {v!r} at t={t:g}")
    return float(v)


# ------------------------------------------------------------------------------------------ solver
@register
class SASolver(StochasticSolver):
    """SA-Solver: stochastic Adams predictor (orders 1-4) and corrector (orders 0-4), data prediction,
    one network evaluation per step.

    Options (defaults as diffusers' ``SASolverScheduler``):

    * ``order`` (2): sets both ``predictor_order`` and ``corrector_order`` unless they are given;
    * ``predictor_order`` (1-4), ``corrector_order`` (0-4; 0 disables the corrector);
    * ``tau``: see the module docstring (default: 1 on the middle of the trajectory, 0 at the ends);
    * ``lower_order_final`` (True), ``order2_rescale`` (False; diffusers: True), ``brownian`` (False).

    With ``tau = 0`` it is a deterministic ODE solver of order ``min(c, p + 1)`` (``p`` without
    corrector); ``predictor_order=1, corrector_order=0, tau=1`` is DDPM ancestral sampling.

    Example::

        x0 = fewstep.sample(model, noise, solver="sa", nfe=20, predictor_order=3, corrector_order=4,
                            generator=torch.Generator().manual_seed(0))
    """

    name = "sa"
    aliases = ("sa-solver",)
    summary = "stochastic Adams predictor-corrector on the variance-controlled SDE (tau=0: ODE)"
    paper = "Xue et al., SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion Models, NeurIPS 2023 (arXiv 2309.05019)"
    orders = (1, 2, 3, 4)
    options = {
        "order": 2,
        "predictor_order": None,
        "corrector_order": None,
        "tau": None,
        "lower_order_final": True,
        "order2_rescale": False,
        "brownian": False,
    }

    def check_options(self) -> None:
        super().check_options()
        o = self.opts
        p = o["predictor_order"] if o["predictor_order"] is not None else o["order"]
        c = o["corrector_order"] if o["corrector_order"] is not None else o["order"]
        if not _is_int(p) or not 1 <= p <= 4:
            raise ValueError(f"predictor_order: expected 1, 2, 3 or 4, got {p!r}")
        if not _is_int(c) or not 0 <= c <= 4:
            raise ValueError(f"corrector_order: expected 0 (no corrector), 1, 2, 3 or 4, got {c!r}")
        for flag in ("lower_order_final", "order2_rescale"):
            if not isinstance(o[flag], bool):
                raise ValueError(f"{flag}: expected True or False, got {o[flag]!r}")
        _check_tau_option(o["tau"])
        self.predictor_order, self.corrector_order = int(p), int(c)

    @property
    def order(self) -> int:
        """Convergence order at ``tau = 0``: ``min(c, p + 1)`` with a corrector, ``p`` without."""
        p, c = self.predictor_order, self.corrector_order
        return min(c, p + 1) if c else p

    def prepare(self, schedule, times):
        grid = schedule.nodes(times)
        nodes = nodes_with_end(schedule, times)
        n = len(grid)
        tau_fn = resolve_tau(self.opts["tau"], schedule)
        taus = [_tau_at(tau_fn, node.t) for node in grid]
        rescale = self.opts["order2_rescale"]
        pred_orders, corr_orders = sa_orders(grid, self.predictor_order, self.corrector_order,
                                             lower_order_final=self.opts["lower_order_final"])
        predictors = [
            sa_step(nodes[i], nodes[i + 1], taus[i], [nodes[i - k] for k in range(pred_orders[i])],
                    corrector=False, rescale=rescale)
            for i in range(n)
        ]
        # the corrector of node i redoes step i-1 -> i with the tau (and the draw) of that step
        correctors: list[Step | None] = [
            sa_step(nodes[i - 1], nodes[i], taus[i - 1], [nodes[i - k] for k in range(corr_orders[i])],
                    corrector=True, rescale=rescale) if corr_orders[i] > 0 else None
            for i in range(n)
        ]
        history = max(pred_orders + corr_orders + [1])
        return self._plan(schedule, times, grid, predictors, correctors=correctors, history=history)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
