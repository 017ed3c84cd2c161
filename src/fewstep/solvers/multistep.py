"""Linear multistep exponential integrators: DPM-Solver++ (``dpm++``), DEIS (``deis``), iPNDM (``ipndm``).

All three reuse the predictions of earlier grid points instead of spending extra evaluations, so
each costs one network evaluation per step. Each only fills a
:class:`~fewstep.solvers.base.MultistepPlan` with float64 coefficients; the step loop is the shared
:func:`~fewstep.solvers.base.run_multistep`.

Notation: step ``i`` goes from grid node ``s = i`` to node ``t = i + 1``; the node after the last grid
point is :data:`~fewstep.schedules.ZERO_NOISE` (alpha = 1, sigma = 0, lambda = +inf).
``lambda = log(alpha / sigma)``, ``h = lambda_t - lambda_s``.

Order rules (shared, and identical to diffusers' multistep schedulers with ``final_sigmas_type="zero"``):

* warm-up: step ``i`` uses at most ``i + 1`` predictions (only those exist);
* the final step to zero noise is first order: it returns the last data prediction (lambda_t = inf
  makes every higher-order term vanish or blow up; diffusers PR #6477, ``final_sigmas_type="zero"``);
* DPM-Solver++ and DEIS with fewer than 15 grid points also cap the second-to-last step at order 2
  (diffusers' ``lower_order_final``, inherited from the DPM-Solver reference code, where it steadies
  sampling with few steps).

Example::

    >>> import torch, fewstep
    >>> from fewstep import schedules, testbeds
    >>> sch = schedules.EDM()
    >>> gm = testbeds.Gaussian(mean=0.3, std=0.5, dim=2)
    >>> noise = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> ref = gm.reference(noise, sch)
    >>> errors = [float((fewstep.sample(gm.model(sch), noise, solver="deis", nfe=n) - ref).abs().max()) for n in (10, 20)]
    >>> errors[1] < errors[0] / 8 < 1e-2      # third order: doubling the NFE divides the error by ~8
    True
"""
from __future__ import annotations

import math

import numpy as np

from ..schedules import Node
from .base import MultistepPlan, Solver, Step, nodes_with_end, register
from .coefficients import lagrange_weights
from .ddim import ddim_step

__all__ = ["DPMSolverPP", "DEIS", "IPNDM", "step_orders", "phi", "require_finite_start"]

#: diffusers' ``lower_order_final`` threshold: below this many steps the last steps use lower orders.
LOWER_ORDER_FINAL_BELOW = 15


# ------------------------------------------------------------------------------------ shared maths
def phi(k: int, z: float) -> float:
    """``phi_k(z) = sum_{m>=0} z^m / (m + k)!`` (``phi_0 = exp``, ``phi_1(z) = (e^z - 1) / z``, ...).

    Exponential integrators need these for small ``|z|``, where the textbook closed forms cancel
    catastrophically; the series is used there and the stable recurrence
    ``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z`` elsewhere (relative error below 2e-14 for k <= 5,
    checked against 40-digit arithmetic).
    """
    if k < 0:
        raise ValueError(f"k: must be >= 0, got {k}")
    if z == -math.inf:
        return 0.0  # exp(z) -> 0 and phi_k(z) ~ -1 / ((k-1)! z) -> 0
    if abs(z) < 1.0:
        total, term, m = 0.0, 1.0 / math.factorial(k), 0
        while True:
            total += term
            m += 1
            term *= z / (m + k)
            if abs(term) < 1e-18 * abs(total):
                return total + term
    value = math.exp(z)
    for j in range(k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value


def step_orders(nodes: list[Node], order: int, *, lower_order_final: bool) -> list[int]:
    """The order used by each step of a one-evaluation-per-step multistep solver.

    ``nodes`` are the grid nodes (without the zero-noise end). See the module docstring for the
    rules. A first node at pure noise (lambda = -inf, a flow at t = 1) is never used as a past point:
    its step size in lambda is infinite, so it carries no information for extrapolation.
    """
    n = len(nodes)
    pure_noise_start = n > 0 and nodes[0].lam == -math.inf
    orders = []
    for i in range(n):
        p = 1 if i == n - 1 else min(order, i + 1)
        if lower_order_final and n < LOWER_ORDER_FINAL_BELOW and i == n - 2:
            p = min(p, 2)
        if pure_noise_start and i >= 1:
            p = min(p, i)
        orders.append(p)
    return orders


def require_finite_start(solver: str, nodes: list[Node]) -> None:
    """Solvers that integrate in ``x / alpha`` cannot start where ``alpha = 0`` (a flow at ``t = 1``)."""
    if nodes and nodes[0].alpha <= 0.0:
        raise ValueError(
            f"grid: {solver} integrates in x/alpha and sigma/alpha, which are infinite at t={nodes[0].t:g} "
            f"(alpha = 0); start the grid below that time (e.g. RectifiedFlow(t_max=0.999)) or use dpm++/unipc/ddim"
        )


# --------------------------------------------------------------------------------- DPM-Solver++
THIRD_ORDER_FORMS = ("reference", "taylor")


def dpmpp_step(nodes: list[Node], i: int, order: int, third_order: str = "reference") -> Step:
    """DPM-Solver++ multistep update from node ``i`` to ``i + 1`` in data view (Lu et al. 2022).

    With ``c = alpha_t (1 - e^{-h})`` and ``r_k = h_{k} / h`` the ratios of past step sizes:

    * order 1 (first-order DPM-Solver++, = DDIM): ``x_t = (sigma_t / sigma_s) x_s + c D_0``;
    * order 2 (the paper's Algorithm 2, DPM-Solver++(2M)): ``+ (c / 2r_0) (D_0 - D_1)``;
    * order 3 ("3M"): ``+ alpha_t h phi_2(-h) D_1 + w alpha_t h phi_3(-h) D_2`` with ``D_1 ~ h m'`` and
      ``D_2 ~ h^2 m'' / 2`` the divided differences of the last three predictions.

    ``third_order="reference"`` takes ``w = 1``, the weight of the DPM-Solver++ reference code and of
    diffusers. The Taylor expansion of the exact data-prediction integral ``x_t = (sigma_t/sigma_s) x_s +
    sigma_t int e^lambda x0(lambda) dlambda`` needs ``w = 2``
    (``alpha_t h^3 phi_3(-h) m''``), which ``third_order="taylor"`` uses: the reference form is exact
    only for data predictions linear in lambda, so its local error is O(h^3) and it converges with
    global order 2 (measured in tests/test_baselines.py); the Taylor form is a true third-order method.
    """
    s, t = nodes[i], nodes[i + 1]
    if order == 1:
        return ddim_step(s, t)
    h = t.lam - s.lam
    ratio = t.sigma / s.sigma
    c = t.alpha * -math.expm1(-h)
    if order == 2:
        r0 = (s.lam - nodes[i - 1].lam) / h
        return Step(a=ratio, d=(c * (1.0 + 0.5 / r0), -c * 0.5 / r0))
    # order 3: expand diffusers' D1, D2 (divided differences of m0, m1, m2) into weights on m0, m1, m2
    r0 = (s.lam - nodes[i - 1].lam) / h
    r1 = (nodes[i - 1].lam - nodes[i - 2].lam) / h
    m0, m1, m2 = np.eye(3)
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    # alpha_t * h * phi_1(-h), alpha_t * h * phi_2(-h), alpha_t * h * phi_3(-h) in the paper's notation:
    # weights on D0, D1 (first derivative * h) and D2 (second derivative * h^2 / 2)
    w_d1 = t.alpha * h * phi(2, -h)  # = alpha_t ((e^{-h} - 1)/h + 1)
    w_d2 = t.alpha * h * phi(3, -h)  # = alpha_t (1/2 - (e^{-h} - 1 + h)/h^2)
    if third_order == "taylor":
        w_d2 *= 2.0  # D2 ~ h^2 m''/2 while the integral's weight on m'' is alpha_t h^3 phi_3(-h)
    w = c * m0 + w_d1 * d1 + w_d2 * d2
    return Step(a=ratio, d=tuple(float(v) for v in w))


@register
class DPMSolverPP(Solver):
    """DPM-Solver++ multistep (Lu et al. 2022), data prediction, orders 1-3 (default 2).

    Reproduces diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
    solver_type="midpoint", final_sigmas_type="zero")`` on the same timesteps.
    ``third_order="taylor"`` (only used with ``order=3``) corrects the weight of the second divided
    difference so that 3M is truly third order (see :func:`dpmpp_step`); the default ``"reference"``
    keeps the published/diffusers weights.

    Example::

        x0 = fewstep.sample(model, noise, solver="dpm++", nfe=10, order=2)
    """

    name = "dpm++"
    aliases = ("dpmpp",)
    summary = "multistep exponential integrator on the data prediction (2M: the SD default)"
    paper = "Lu et al., DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models, 2022 (arXiv 2211.01095)"
    orders = (1, 2, 3)
    options = {"order": 2, "third_order": "reference"}

    def check_options(self):
        if self.opts["third_order"] not in THIRD_ORDER_FORMS:
            raise ValueError(
                f"third_order: dpm++ accepts {list(THIRD_ORDER_FORMS)}, got {self.opts['third_order']!r}"
            )

    def prepare(self, schedule, times):
        grid = schedule.nodes(times)
        nodes = nodes_with_end(schedule, times)
        orders = step_orders(grid, self.order, lower_order_final=True)
        steps = [dpmpp_step(nodes, i, p, self.opts["third_order"]) for i, p in enumerate(orders)]
        return MultistepPlan(view="x0", nodes=grid, predictors=steps, history=max(orders))


# ----------------------------------------------------------------------------------------- DEIS
def deis_step(nodes: list[Node], i: int, order: int) -> Step:
    """DEIS multistep update (Zhang & Chen 2022: exponential integrator + polynomial extrapolation of eps).

    In ``y = x / alpha`` and ``rho = sigma / alpha`` the probability-flow ODE is ``dy/drho = eps``.
    The noise prediction is interpolated by a Lagrange polynomial in ``u = log(rho) = -lambda`` through
    the last ``order`` nodes, and integrated exactly: ``y_t = y_s + sum_j eps_j int_{u_s}^{u_t} e^u l_j(u) du``
    (diffusers' "logrho" DEIS). The weights come from 64-point Gauss-Legendre, exact for ``e^u`` times
    polynomials to float64 precision.
    """
    s, t = nodes[i], nodes[i + 1]
    if order == 1 or t.sigma == 0.0:
        # exponential Euler, the same as DDIM; at t = zero noise it returns the data prediction
        rho_s, rho_t = s.sigma / s.alpha, t.sigma / t.alpha
        return Step(a=t.alpha / s.alpha, d=(t.alpha * (rho_t - rho_s),))
    u = [-nodes[i - k].lam for k in range(order)]
    w = lagrange_weights(u, -s.lam, -t.lam, kernel=np.exp)
    return Step(a=t.alpha / s.alpha, d=tuple(float(t.alpha * v) for v in w))


@register
class DEIS(Solver):
    """DEIS multistep (Zhang & Chen 2022): exponential integrator on the noise prediction with
    Lagrange interpolation in ``log(sigma / alpha)``; orders 1-3 (default 3).

    Example::

        x0 = fewstep.sample(model, noise, solver="deis", nfe=10, order=3)
    """

    name = "deis"
    summary = "multistep exponential integrator on eps, Lagrange in log(sigma/alpha)"
    paper = "Zhang & Chen, Fast Sampling of Diffusion Models with Exponential Integrator, ICLR 2023 (arXiv 2204.13902)"
    orders = (1, 2, 3)
    options = {"order": 3}

    def prepare(self, schedule, times):
        grid = schedule.nodes(times)
        require_finite_start(self.name, grid)
        nodes = nodes_with_end(schedule, times)
        orders = step_orders(grid, self.order, lower_order_final=True)
        steps = [deis_step(nodes, i, p) for i, p in enumerate(orders)]
        return MultistepPlan(view="eps", nodes=grid, predictors=steps, history=max(orders))


# ---------------------------------------------------------------------------------------- iPNDM
#: Classic fixed-step Adams–Bashforth weights (newest prediction first), iPNDM's Table / k-diffusion.
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3.0 / 2.0, -1.0 / 2.0),
    3: (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
    4: (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0),
}


def ipndm_step(nodes: list[Node], i: int, order: int, variable_step: bool) -> Step:
    """iPNDM update: Adams–Bashforth on ``dy/dvarsigma = eps`` with ``y = x / alpha``, ``varsigma = sigma / alpha``.

    ``y_t = y_s + sum_j w_j eps_{i-j}``. With ``variable_step`` the weights are the exact integrals of
    the Lagrange basis through the actual past ``varsigma`` nodes (Adams–Bashforth on a non-uniform
    grid); otherwise ``w_j = (varsigma_t - varsigma_s) * AB_j`` with the classic uniform-step weights
    (Zhang & Chen 2022, iPNDM; k-diffusion's ``sample_ipndm``).
    """
    s, t = nodes[i], nodes[i + 1]
    vs_s, vs_t = s.sigma / s.alpha, t.sigma / t.alpha
    if order == 1 or not variable_step:
        w = [(vs_t - vs_s) * c for c in ADAMS_BASHFORTH[order]]
    else:
        past = [nodes[i - k].sigma / nodes[i - k].alpha for k in range(order)]
        w = lagrange_weights(past, vs_s, vs_t)
    return Step(a=t.alpha / s.alpha, d=tuple(float(t.alpha * v) for v in w))


@register
class IPNDM(Solver):
    """Improved PNDM (Zhang & Chen 2022): Adams–Bashforth in ``(x/alpha, sigma/alpha)``, orders 1-4
    (default 4). ``variable_step=True`` (default) uses exact variable-step weights; ``False`` the
    classic fixed ones.

    Example::

        x0 = fewstep.sample(model, noise, solver="ipndm", nfe=10)
    """

    name = "ipndm"
    summary = "Adams-Bashforth on eps in sigma/alpha (variable-step weights)"
    paper = "Zhang & Chen, Fast Sampling of Diffusion Models with Exponential Integrator, ICLR 2023 (arXiv 2204.13902), iPNDM"
    orders = (1, 2, 3, 4)
    options = {"order": 4, "variable_step": True}

    def check_options(self):
        if not isinstance(self.opts["variable_step"], bool):
            raise ValueError(f"variable_step: ipndm accepts True or False, got {self.opts['variable_step']!r}")

    def prepare(self, schedule, times):
        grid = schedule.nodes(times)
        require_finite_start(self.name, grid)
        nodes = nodes_with_end(schedule, times)
        orders = step_orders(grid, self.order, lower_order_final=False)
        steps = [ipndm_step(nodes, i, p, self.opts["variable_step"]) for i, p in enumerate(orders)]
        return MultistepPlan(view="eps", nodes=grid, predictors=steps, history=max(orders))
