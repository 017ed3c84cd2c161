"""Forward-value sampling: F-DDIM and F-DPMSolver (Jiao, Li, Cai & Li, arXiv 2512.24927, ICML 2026).

DDIM freezes the data prediction at the *left* end of a step (a left-endpoint rectangle rule for
the integral in the data form of the probability-flow ODE). The forward-value rule freezes it at
the *right* end::

    x_t = (sigma_t / sigma_s) x_s + (alpha_t - alpha_s sigma_t / sigma_s) x0(x_t, t)

whose leading error has the opposite sign to DDIM's (paper's abstract; research notes §2.1). The
implicit ``x0(x_t, t)`` is replaced by the data prediction at a cheap *lookahead* point ``x~_t``,
a multistep exponential integrator in noise form that reuses the noise predictions already made
(no extra evaluation). The very first noise prediction is free: at ``t_max`` it is the initial
noise itself. So every step costs exactly one network evaluation, made at the lookahead point
and at the *cleaner* end of the step.

``order=p`` sets the order of the lookahead only (``p = 1`` is F-DDIM, ``p >= 2`` F-DPMSolver);
the forward-value corrector stays first order, as in the authors' code
(``sampler.py::Forward_DPMSolver``, research notes §2.2–2.3).

Grid and budget: the grid lists evaluation times *including* the free first point ``t_max``, so
``nfe = N`` buys ``N + 1`` grid points. After the last point the result is the data prediction
made by the last evaluation (the step to zero noise).

Example::

    >>> import torch, fewstep
    >>> from fewstep import schedules, testbeds
    >>> sch = schedules.EDM()
    >>> gm = testbeds.Gaussian(mean=0.3, std=0.5, dim=2)
    >>> noise = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> x0, info = fewstep.sample(gm.model(sch, "eps"), noise, solver="fv", nfe=10, grid="karras",
    ...                           return_info=True)
    >>> info.nfe, len(info.grid)
    (10, 11)
"""
from __future__ import annotations

import math

import numpy as np

from .base import MultistepPlan, Solver, Step, register
from .coefficients import lagrange_weights
from ..schedules import Node


def _lookahead_step(nodes: list[Node], i: int, q: int, initial_scale: float, free_first: bool) -> Step:
    """Noise-form multistep exponential integrator from node ``i`` to node ``i + 1`` (research §2.3).

    ``x~ = (alpha_t / alpha_s) x_s - alpha_t * integral_{lam_s}^{lam_t} e^{-lam} P(lam) dlam`` where
    ``P`` interpolates the noise predictions made at nodes ``i, i-1, ..., i-q+1`` in lambda
    (DPM-Solver's noise form, eq. (3.4) of Lu et al. 2022; F-DPMSolver's ``ODESampler_onestep``).
    """
    s, t = nodes[i], nodes[i + 1]
    if i == 0 and free_first:
        # The free "prediction" at t_max is x / initial_scale. Folding it into the x coefficient keeps
        # the step defined where alpha(t_max) = 0 (a flow starting from pure noise): there the
        # lookahead is x~ = (sigma_t / sigma_s) x_s, the limit of the first-order noise-form step.
        a = t.sigma / initial_scale
        if s.alpha > 0.0:
            a += (t.alpha / s.alpha) * (1.0 - s.sigma / initial_scale)
        return Step(a=a, d=(0.0,))
    if q == 1:
        # closed form: DDIM in noise form, x~ = (alpha_t/alpha_s) x_s + (sigma_t - sigma_s alpha_t/alpha_s) eps_s
        return Step(a=t.alpha / s.alpha, d=(t.sigma - s.sigma * t.alpha / s.alpha,))
    lams = [nodes[i - k].lam for k in range(q)]
    # e^{-lam} = e^{-lam_t} e^{-(lam - lam_t)} and alpha_t e^{-lam_t} = sigma_t: bounded kernel, no overflow
    w = lagrange_weights(lams, s.lam, t.lam, kernel=lambda u: np.exp(t.lam - u))
    return Step(a=t.alpha / s.alpha, d=tuple(float(-t.sigma * wk) for wk in w))


def _forward_value_corrector(prev: Node, node: Node) -> Step:
    """The forward-value DDIM update into ``node`` with the data prediction at the lookahead point.

    ``x = r x_prev + c x0(x~, t)`` with ``r = sigma_t / sigma_s`` and ``c = alpha_t - alpha_s r``;
    in noise view ``x0(x~, t) = (x~ - sigma_t eps) / alpha_t``, so ``x = r x_prev + (c / alpha_t) x~
    - (c sigma_t / alpha_t) eps`` (the authors' ``coeff_x``, ``coeff_x0``).
    """
    r = node.sigma / prev.sigma
    c = node.alpha - prev.alpha * r
    return Step(a=r, at=c / node.alpha, d=(-c * node.sigma / node.alpha,))


def _usable_history(nodes: list[Node], i: int, order: int) -> int:
    """How many of the newest predictions (nodes i, i-1, ...) the lookahead may interpolate.

    A node with infinite lambda (alpha = 0, pure noise of a flow) has no place on the lambda axis,
    so the stencil stops before it.
    """
    q = 0
    while q < min(order, i + 1) and math.isfinite(nodes[i - q].lam):
        q += 1
    return max(q, 1)


@register
class ForwardValue(Solver):
    """F-DDIM (``order=1``) and F-DPMSolver (``order>=2`` lookahead): one evaluation per step.

    Example::

        >>> fewstep.sample(model, noise, solver="fv", nfe=10, order=1, grid="karras")  # doctest: +SKIP
    """

    name = "fv"
    aliases = ("forward-value",)
    summary = "forward-value first-order sampler (DDIM with the data prediction at a free lookahead)"
    paper = "Jiao, Li, Cai & Li, Are First-Order Diffusion Samplers Really Slower? A Fast Forward-Value Approach, arXiv 2512.24927 (ICML 2026)"
    orders = (1, 2, 3, 4)
    options = {"order": 1}
    #: the global order whatever the lookahead's order: the corrector is first order (``fewstep bench order``)
    accuracy_order = 1

    def evals_per_step(self) -> str:
        return "1 (first free)"

    # The grid includes the free first point t_max: nfe evaluations buy nfe + 1 grid points.
    def min_nfe(self) -> int:
        return 1

    def num_points(self, nfe: int) -> int:
        return nfe + 1

    def nfe_for_points(self, num_points: int) -> int:
        return num_points - 1

    def prepare(self, schedule, times):
        nodes = schedule.nodes(times)
        if len(nodes) < 2:
            raise ValueError(
                "grid: fv needs at least 2 points (the first, t_max, is evaluated for free), "
                f"got {len(nodes)}"
            )
        p = self.order
        n = len(nodes)
        # the free noise prediction is x / initial_scale: sigma(t_max) on grids that start at t_max,
        # sigma(t0) on a grid that starts lower (fewstep.sample's default truncates the schedule at few
        # steps and starts from sigma(t0) * noise)
        initial_scale = float(schedule.initial_scale) if float(times[0]) >= float(schedule.t_max) else nodes[0].sigma
        predictors, correctors = [], [None]
        for i in range(n - 1):
            q = _usable_history(nodes, i, p)
            predictors.append(_lookahead_step(nodes, i, q, initial_scale, free_first=True))
            correctors.append(_forward_value_corrector(nodes[i], nodes[i + 1]))
        # Result: the data prediction made by the last evaluation, x0 = (x~ - sigma eps) / alpha, at
        # the lookahead point where the network was called (no corrector at the last node: the
        # forward-value rule into zero noise would be x0(x_0, 0) = x_0, an identity).
        last = nodes[-1]
        correctors[-1] = None
        predictors.append(Step(a=1.0 / last.alpha, d=(-last.sigma / last.alpha,)))
        return MultistepPlan(
            view="eps",
            nodes=nodes,
            predictors=predictors,
            correctors=correctors,
            history=p,
            free_first=True,
            initial_scale=initial_scale,
        )
