"""UniPC (Zhao et al. 2023): unified predictor (UniP) and corrector (UniC), data prediction.

Step ``i`` goes from node ``s = i`` to ``t = i + 1`` with ``h = lambda_t - lambda_s``; ``m_k`` is the
data prediction at node ``k`` and ``r_k = (lambda_{i-k} - lambda_i) / h``.

* UniP-p (the unified predictor, data-prediction form):
  ``x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) m_i - alpha_t B(h) sum_{k<p} rho_k (m_{i-k} - m_i) / r_k``;
* UniC-p (the unified corrector): the same update recomputed once ``m_t`` (evaluated at the predicted ``x_t``) is
  known, with one more difference ``m_t - m_i`` (at ``r = 1``). It adds no evaluation and raises the
  order by one: UniC-p after a p-th order step is of order ``p + 1`` (the paper's convergence theorem;
  see docs/algorithms/baselines.md for what that means for the returned sample).
* ``rho`` solves ``R rho = b`` with ``R[j, k] = r_k^j`` and ``b_j = j! h phi_{j+1}(-h) / B(h)``
  (``rho = 1/2`` for UniP-2 and UniC-1, as in the paper's simplified low-order cases).
* ``B(h) = -h`` (``bh1``) or ``e^{-h} - 1`` (``bh2``, default; recommended for guided sampling).

Exactly as diffusers' ``UniPCMultistepScheduler(solver_type=..., final_sigmas_type="zero")``:
the step order is ``min(order, steps left, steps done + 1)``; the corrector at node ``i`` uses the
order of the predictor that produced it; no corrector after the final step; and the prediction kept
for later steps is the one evaluated at the *uncorrected* point (the corrected state only feeds the
next predictor), so the corrector never costs an evaluation.

Example::

    >>> import torch, fewstep
    >>> from fewstep import schedules, testbeds
    >>> sch = schedules.EDM()
    >>> gm = testbeds.Gaussian(mean=0.3, std=0.5, dim=2)
    >>> noise = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> x0 = fewstep.sample(gm.model(sch), noise, solver="unipc", nfe=12, order=3)
    >>> bool((x0 - gm.reference(noise, sch)).abs().max() < 1e-2)
    True
"""
from __future__ import annotations

import math

import numpy as np

from ..schedules import Node
from .base import MultistepPlan, Solver, Step, nodes_with_end, register
from .ddim import ddim_step
from .multistep import phi

__all__ = ["UniPC", "unipc_rhos"]

VARIANTS = ("bh1", "bh2")


def unipc_rhos(rks: list[float], h: float, order: int, variant: str, corrector: bool) -> tuple[np.ndarray, float]:
    """``(rho, B(h))`` for UniP-``order`` (``corrector=False``) or UniC-``order`` (``corrector=True``).

    ``rks`` are the ratios ``r_k`` of the past nodes used (``order - 1`` of them); the corrector adds
    ``r = 1`` for the new prediction. Linear solves in float64.
    """
    hh = -h  # data-prediction form integrates in -lambda
    b_h = hh if variant == "bh1" else math.expm1(hh)
    # the simplified low orders of the paper (and diffusers) take rho = 1/2 without a solve; they are
    # also the only ones used after an infinite step (from pure noise), where b below is undefined
    if corrector and order == 1:
        return np.array([0.5]), b_h
    if not corrector and order <= 2:
        return np.full(order - 1, 0.5), b_h
    # b_j = j! * hh * phi_{j+1}(hh) / B(h), j = 1..order (the order conditions of UniPC, data-prediction signs)
    b = np.array([math.factorial(j) * hh * phi(j + 1, hh) / b_h for j in range(1, order + 1)])
    nodes = np.array(list(rks) + [1.0])
    big_r = np.vstack([nodes**j for j in range(order)])  # R[j, k] = r_k^j
    if corrector:
        return np.linalg.solve(big_r, b), b_h
    # the predictor has no new point: drop r = 1 and the last condition
    return np.linalg.solve(big_r[:-1, :-1], b[:-1]), b_h


def unip_step(nodes: list[Node], i: int, order: int, variant: str) -> Step:
    """UniP-``order`` from node ``i`` to ``i + 1``, as weights on ``x_i`` and ``m_i, m_{i-1}, ...``."""
    s, t = nodes[i], nodes[i + 1]
    if order == 1:
        return ddim_step(s, t)
    h = t.lam - s.lam
    rks = [(nodes[i - k].lam - s.lam) / h for k in range(1, order)]
    rho, b_h = unipc_rhos(rks, h, order, variant, corrector=False)
    d = np.zeros(order)
    d[0] = -t.alpha * math.expm1(-h)
    for k in range(1, order):
        # - alpha_t B(h) rho_k (m_{i-k} - m_i) / r_k
        w = -t.alpha * b_h * rho[k - 1] / rks[k - 1]
        d[k] += w
        d[0] -= w
    return Step(a=t.sigma / s.sigma, d=tuple(float(v) for v in d))


def unic_step(nodes: list[Node], i: int, order: int, variant: str) -> Step | None:
    """UniC-``order`` replacing the state at node ``i`` (``i >= 1``), as weights on ``x_{i-1}`` and
    the history ``m_i`` (newest, at the uncorrected point), ``m_{i-1}``, ``m_{i-2}``, ...

    Returns ``None`` where the corrector is undefined: ``bh1`` after a step of infinite ``h`` (from
    pure noise), where ``B(h) = -h`` is infinite.
    """
    s, t = nodes[i - 1], nodes[i]
    h = t.lam - s.lam
    if not math.isfinite(h) and variant == "bh1":
        return None
    rks = [(nodes[i - 1 - k].lam - s.lam) / h for k in range(1, order)]
    rho, b_h = unipc_rhos(rks, h, order, variant, corrector=True)
    d = np.zeros(order + 1)  # d[0] -> m_i, d[1] -> m_{i-1}, d[1+k] -> m_{i-1-k}
    d[1] = -t.alpha * math.expm1(-h)
    for k in range(1, order):
        w = -t.alpha * b_h * rho[k - 1] / rks[k - 1]
        d[1 + k] += w
        d[1] -= w
    w = -t.alpha * b_h * rho[-1]  # the new difference m_i - m_{i-1} (r = 1)
    d[0] += w
    d[1] -= w
    return Step(a=t.sigma / s.sigma, d=tuple(float(v) for v in d))


def unipc_orders(grid: list[Node], order: int) -> list[int]:
    """diffusers' UniPC rule: ``min(order, steps left, steps done + 1)`` (``lower_order_final=True``).

    A first node at pure noise (lambda = -inf) is not used as a past point (infinite ratio ``r``).
    """
    n = len(grid)
    pure_noise_start = n > 0 and grid[0].lam == -math.inf
    orders = []
    for i in range(n):
        p = min(order, n - i, i + 1)
        if pure_noise_start and i >= 1:
            p = min(p, i)
        orders.append(p)
    return orders


@register
class UniPC(Solver):
    """UniPC (Zhao et al. 2023), data prediction; orders 1-3 (default 2), ``variant="bh1"|"bh2"``
    (default ``bh2``), UniC corrector on by default (``corrector=False`` gives plain UniP).

    Example::

        x0 = fewstep.sample(model, noise, solver="unipc", nfe=10, order=3)
    """

    name = "unipc"
    summary = "unified predictor-corrector; the corrector adds one order at no extra NFE"
    paper = "Zhao et al., UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models, NeurIPS 2023 (arXiv 2302.04867)"
    orders = (1, 2, 3)
    options = {"order": 2, "variant": "bh2", "corrector": True}

    def check_options(self):
        if self.opts["variant"] not in VARIANTS:
            raise ValueError(f"variant: unipc accepts {list(VARIANTS)}, got {self.opts['variant']!r}")
        if not isinstance(self.opts["corrector"], bool):
            raise ValueError(f"corrector: unipc accepts True or False, got {self.opts['corrector']!r}")

    def prepare(self, schedule, times):
        grid = schedule.nodes(times)
        nodes = nodes_with_end(schedule, times)
        variant = self.opts["variant"]
        orders = unipc_orders(grid, self.order)
        predictors = [unip_step(nodes, i, p, variant) for i, p in enumerate(orders)]
        correctors: list[Step | None] = [None] * len(grid)
        history = max(orders)
        if self.opts["corrector"]:
            for i in range(1, len(grid)):
                correctors[i] = unic_step(nodes, i, orders[i - 1], variant)
            history = max(history, max(orders[:-1], default=0) + 1)
        return MultistepPlan(view="x0", nodes=grid, predictors=predictors, correctors=correctors, history=history)
