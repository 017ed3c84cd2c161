"""Heun's second-order method (Karras et al. 2022, Algorithm 1; k-diffusion's ``sample_heun``).

In ``y = x / alpha`` and ``varsigma = sigma / alpha`` the probability-flow ODE is ``dy/dvarsigma = eps``
(Karras et al.'s ODE with scaling ``s(t) = alpha``). Each step between grid points spends two evaluations::

    y~_{i+1} = y_i + (varsigma_{i+1} - varsigma_i) eps(x_i)                        (Euler)
    y_{i+1}  = y_i + (varsigma_{i+1} - varsigma_i) (eps(x_i) + eps(x~_{i+1})) / 2  (trapezoid)

and the final step to zero noise is a single Euler step, i.e. it returns the data prediction
(Algorithm 1 applies the second-order correction only "if sigma_{i+1} != 0"). With ``M`` grid points
that is ``2M - 1`` evaluations.

As a :class:`~fewstep.solvers.base.MultistepPlan` in PECE mode: evaluation at node ``i + 1`` first
happens at the Euler point ``x~_{i+1}`` (the predictor), the corrector replaces the state by the
trapezoid value, and ``reevaluate`` evaluates again there; that second evaluation is the one the next
Euler step uses (and the one kept in the history).

Example::

    >>> import torch, fewstep
    >>> from fewstep import schedules, testbeds
    >>> sch = schedules.EDM()
    >>> gm = testbeds.Gaussian(mean=0.3, std=0.5, dim=2)
    >>> noise = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> x0, info = fewstep.sample(gm.model(sch), noise, solver="heun", nfe=15, return_info=True)
    >>> info.nfe
    15
"""
from __future__ import annotations

from .base import MultistepPlan, Solver, Step, nodes_with_end, register
from .multistep import require_finite_start


@register
class Heun(Solver):
    """Heun's method in ``(x/alpha, sigma/alpha)``: 2 evaluations per step, order 2.

    ``nfe=N`` buys ``(N + 1) // 2`` grid points (the last step, to zero noise, costs one evaluation).

    Example::

        x0 = fewstep.sample(model, noise, solver="heun", nfe=19)   # 10 grid points
    """

    name = "heun"
    summary = "Heun / trapezoid predictor-corrector in sigma/alpha (Karras et al. Alg. 1)"
    paper = "Karras et al., Elucidating the Design Space of Diffusion-Based Generative Models, NeurIPS 2022 (arXiv 2206.00364)"
    orders = (2,)
    options = {}

    def evals_per_step(self) -> str:
        return "2"

    def num_points(self, nfe: int) -> int:
        return (nfe + 1) // 2

    def nfe_for_points(self, num_points: int) -> int:
        return 2 * num_points - 1

    def prepare(self, schedule, times):
        grid = schedule.nodes(times)
        require_finite_start(self.name, grid)
        nodes = nodes_with_end(schedule, times)
        n = len(grid)
        predictors, correctors = [], [None]
        for i in range(n):
            s, t = nodes[i], nodes[i + 1]
            d_varsigma = t.sigma / t.alpha - s.sigma / s.alpha
            # Euler: x~_t = alpha_t (x_s / alpha_s + d_varsigma eps_s); at t = zero noise this is x0(x_s)
            predictors.append(Step(a=t.alpha / s.alpha, d=(t.alpha * d_varsigma,)))
        for i in range(1, n):
            s, t = nodes[i - 1], nodes[i]
            half = 0.5 * t.alpha * (t.sigma / t.alpha - s.sigma / s.alpha)
            # trapezoid: history[0] = eps at the Euler point x~_i, history[1] = eps at the corrected x_{i-1}
            correctors.append(Step(a=t.alpha / s.alpha, d=(half, half)))
        reevaluate = [False] + [True] * (n - 1)
        return MultistepPlan(view="eps", nodes=grid, predictors=predictors, correctors=correctors,
                             reevaluate=reevaluate, history=2)
