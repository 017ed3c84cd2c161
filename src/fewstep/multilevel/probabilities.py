"""How often to evaluate each level: the variance/cost rule ``p_l ∝ sqrt(V_l / C_l)``.

Minimising the variance of the telescoping estimator, ``sum_l (1/p_l - 1) V_l``, at a fixed expected
cost ``sum_l p_l C_l`` gives ``p_l = min(1, kappa sqrt(V_l / C_l))`` (Lagrange; research note §1.2,
the sibling paper's Proposition 3), with ``V_l`` the mean square of ``f_l - f_{l-1}`` and ``C_l`` the cost
of the pair ``f_l, f_{l-1}``. The coarsest level is always evaluated (``p_1 = 1``).

Our choice for a whole trajectory: the error that step ``i`` injects into the state is
``w_i (f_hat - f)``, where ``w_i`` is the coefficient of the prediction in the base solver's update
(``2 h alpha`` for Euler–Maruyama, 1 for the final step to zero noise). Minimising the total injected
variance ``sum_i w_i^2 sum_l (1/p_il - 1) V_il`` at a fixed total cost gives one constant ``kappa`` for
the whole run::

    p_il = min(1, kappa * w_i * sqrt(V_il / C_l))       (l >= 2),   p_i1 = 1

so the probabilities scale with the step size (the research note's ``p ∝ eta``: total cost is then
independent of the number of steps). ``kappa`` is found by bisection so that the expected cost, counted
per network as in :mod:`fewstep.multilevel.cost`, is ``budget`` times the cost of the same steps with
the finest model alone.

Example::

    >>> table = optimal_probabilities([[1.0, 0.04, 0.0025]] * 10, [1.0, 4.0, 16.0], budget=0.3)
    >>> [round(p, 3) for p in table[0]]
    [1.0, 0.614, 0.077]
"""
from __future__ import annotations

import math
from typing import Sequence

from .cost import expected_flops

__all__ = ["optimal_probabilities", "MIN_PROBABILITY", "full_table", "check_table"]

#: Probabilities never go below this (a level with zero measured variance is still drawn, rarely).
MIN_PROBABILITY = 1e-4


def full_table(num_steps: int, num_levels: int) -> list[list[float]]:
    """All levels always: the estimator is exactly the finest model (``f_hat = f_k``)."""
    return [[1.0] * num_levels for _ in range(num_steps)]


def _table(kappa: float, scores: list[list[float]]) -> list[list[float]]:
    return [[1.0] + [min(1.0, max(MIN_PROBABILITY, kappa * s)) for s in row[1:]] for row in scores]


def optimal_probabilities(
    variances: Sequence[Sequence[float]],
    costs: Sequence[float],
    budget: float,
    weights: Sequence[float] | None = None,
) -> list[list[float]]:
    """Probabilities ``table[step][level]`` from per-step level variances and per-network costs.

    Args:
        variances: ``V[i][l]``, the mean square of ``f_l - f_{l-1}`` at step ``i`` (``V[i][0]`` unused).
        costs: FLOPs per call of each network, cheapest first.
        budget: expected cost as a fraction of the finest model alone on the same steps; ``>= 1``
            returns all ones (the finest model alone). Must exceed ``costs[0] / costs[-1]``.
        weights: ``w_i``, the prediction's coefficient in step ``i`` (default 1 for every step).
    """
    k = len(costs)
    n = len(variances)
    if k < 2:
        raise ValueError(f"costs: need at least 2 levels, got {k}")
    if any(len(row) != k for row in variances):
        raise ValueError(f"variances: every row needs {k} entries (one per level)")
    if weights is None:
        weights = [1.0] * n
    if len(weights) != n:
        raise ValueError(f"weights: expected {n} entries (one per step), got {len(weights)}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0 or not math.isfinite(budget):
        raise ValueError(f"budget: expected a positive number (fraction of the finest model's cost), got {budget!r}")
    if budget >= 1.0:
        return full_table(n, k)
    floor = costs[0] / costs[-1]
    if budget <= floor:
        raise ValueError(
            f"budget: must exceed {floor:.4g}, the cost of the coarsest model alone relative to the finest "
            f"(costs {list(costs)}), got {budget!r}"
        )
    pair = [costs[0]] + [costs[l] + costs[l - 1] for l in range(1, k)]
    scores = [[0.0] + [abs(float(w)) * math.sqrt(max(float(v[l]), 0.0) / pair[l]) for l in range(1, k)]
              for w, v in zip(weights, variances)]
    target = budget * costs[-1] * n
    lo, hi = -40.0, 40.0  # log kappa
    if expected_flops(_table(math.exp(hi), scores), costs) < target:
        # the budget is not reached below full probability: every level as often as the rule allows
        return _table(math.exp(hi), scores)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if expected_flops(_table(math.exp(mid), scores), costs) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    return _table(math.exp(hi), scores)


def check_table(probabilities, num_steps: int, num_levels: int) -> list[list[float]]:
    """Validate ``probabilities=``: ``num_levels`` numbers (the same every step) or a
    ``num_steps x num_levels`` table, each in ``(0, 1]``; returns the full table as floats."""
    try:
        import torch

        if isinstance(probabilities, torch.Tensor):
            probabilities = probabilities.detach().cpu().tolist()
        rows = [list(map(float, r)) for r in probabilities] if _is_nested(probabilities) else None
        flat = None if rows is not None else [float(p) for p in probabilities]
    except (TypeError, ValueError):
        raise TypeError(f"probabilities: expected {num_levels} numbers or a {num_steps}x{num_levels} table") from None
    if rows is None:
        if len(flat) != num_levels:
            raise ValueError(f"probabilities: expected {num_levels} numbers (one per level), got {len(flat)}")
        rows = [list(flat) for _ in range(num_steps)]
    if len(rows) != num_steps or any(len(r) != num_levels for r in rows):
        raise ValueError(
            f"probabilities: expected a table of {num_steps} steps x {num_levels} levels, got "
            f"{len(rows)} rows of lengths {sorted({len(r) for r in rows})}"
        )
    for r in rows:
        for p in r:
            if not (0.0 < p <= 1.0):
                raise ValueError(f"probabilities: every entry must be in (0, 1], got {p!r}")
    return rows


def _is_nested(x) -> bool:
    try:
        first = next(iter(x))
    except (TypeError, StopIteration):
        return False
    return not isinstance(first, (int, float)) and hasattr(first, "__iter__")
