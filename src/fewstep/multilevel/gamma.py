"""The exponent ``gamma`` of a family: error ``∝ cost^(-1/gamma)``, fitted on a log-log scale.

Jacot's "harder than Monte Carlo" regime is ``gamma > 2``: a drift of accuracy ``eps`` costs
``eps^-gamma``. There ML-EM's cost is of the order of one call of the finest model, whereas
Euler–Maruyama with the finest model costs ``eps^-1`` such calls (research note §1.1). The paper reports
``gamma ≈ 2.5`` for UNets on CelebA 64x64; how it measured the error is not public (UNCONFIRMED), so we
fit whatever error the caller supplies (see :func:`level_errors`).

Example::

    >>> fit = estimate_gamma([1.0, 4.0, 16.0], [0.4, 0.2, 0.1])     # error halves per 4x cost
    >>> round(fit.gamma, 6)
    2.0
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["GammaFit", "estimate_gamma", "level_errors"]


@dataclass(frozen=True)
class GammaFit:
    """``log(error) = intercept - log(cost) / gamma`` (least squares); ``slope = -1 / gamma``."""

    gamma: float
    slope: float
    intercept: float
    points: int

    def error_at(self, cost: float) -> float:
        return math.exp(self.intercept + self.slope * math.log(cost))


def estimate_gamma(costs: Sequence[float], errors: Sequence[float]) -> GammaFit:
    """Least-squares fit of ``log(error)`` against ``log(cost)``; ``gamma = -1 / slope``.

    ``gamma`` is ``inf`` when the error does not decrease with cost (slope >= 0): more compute buys no
    accuracy, and a multilevel method has nothing to gain.
    """
    if len(costs) != len(errors):
        raise ValueError(f"costs, errors: need the same length, got {len(costs)} and {len(errors)}")
    if len(costs) < 2:
        raise ValueError("costs: need at least 2 (cost, error) points to fit gamma")
    for name, vals in (("costs", costs), ("errors", errors)):
        if any(not (float(v) > 0 and math.isfinite(float(v))) for v in vals):
            raise ValueError(f"{name}: every entry must be a positive finite number, got {list(vals)}")
    xs = [math.log(float(c)) for c in costs]
    ys = [math.log(float(e)) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("costs: need at least two different costs to fit gamma")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    gamma = -1.0 / slope if slope < 0 else math.inf
    return GammaFit(gamma, slope, my - slope * mx, len(xs))


def level_errors(mean_squares: Sequence[Sequence[float]]) -> list[float]:
    """Error proxy of levels ``1..k-1`` from a pilot's ``V[i][l]`` (mean square of ``f_l - f_{l-1}``):
    the root mean square over the pilot times of ``f_{l+1} - f_l``, i.e. each level's distance to the
    next finer one. When errors shrink geometrically with the level, this is the level's own error up to
    a constant factor, so the fitted slope (hence ``gamma``) is unchanged."""
    k = len(mean_squares[0])
    return [math.sqrt(sum(row[l + 1] for row in mean_squares) / len(mean_squares)) for l in range(k - 1)]
