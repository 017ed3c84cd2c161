"""Float64 coefficient helpers shared by the solvers' ``prepare`` methods.

Exponential-integrator and Adams-type solvers need integrals of Lagrange basis polynomials against
a kernel over one step. Closed forms exist case by case; Gauss–Legendre quadrature with 64 nodes
gives them all to float64 accuracy for the smooth kernels used here (exp, powers), so one routine
serves DEIS, iPNDM, SA-Solver, HEROISM and the forward-value lookahead.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

__all__ = ["lagrange_basis", "lagrange_weights", "gauss_legendre"]

_GL_X, _GL_W = np.polynomial.legendre.leggauss(64)


def gauss_legendre(a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature points and weights on ``[a, b]`` (``b < a`` gives negative weights, as integrals do)."""
    half = 0.5 * (b - a)
    return half * _GL_X + 0.5 * (a + b), half * _GL_W


def lagrange_basis(nodes: Sequence[float], u: np.ndarray) -> np.ndarray:
    """``L[j, m] = l_j(u[m])``, the Lagrange basis on ``nodes`` evaluated at ``u``."""
    nodes = np.asarray(nodes, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    k = nodes.size
    out = np.ones((k, u.size))
    for j in range(k):
        for q in range(k):
            if q != j:
                out[j] *= (u - nodes[q]) / (nodes[j] - nodes[q])
    return out


def lagrange_weights(
    nodes: Sequence[float], a: float, b: float, kernel: Callable[[np.ndarray], np.ndarray] | None = None
) -> np.ndarray:
    """``w[j] = integral_a^b kernel(u) l_j(u) du`` for the Lagrange basis on ``nodes``.

    ``sum_j w[j] f(nodes[j])`` is then the exact integral of ``kernel`` times the interpolant of ``f``.
    """
    u, w = gauss_legendre(a, b)
    k = np.ones_like(u) if kernel is None else kernel(u)
    return lagrange_basis(nodes, u) @ (w * k)
