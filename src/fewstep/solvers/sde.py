"""Stochastic one-step samplers: DDPM ancestral sampling (``ddpm``) and Euler–Maruyama (``em``).

Both spend one network evaluation per step, work in data view (the model's ``x0`` prediction ``D``),
and end with the shared final step to zero noise, which returns the last data prediction with no
noise. Notation: step ``i`` goes from node ``s`` to node ``t``; ``lambda = log(alpha / sigma)``,
``h = lambda_t - lambda_s > 0``; ``z`` is the step's standard normal draw.

**DDPM** (Ho, Jain & Abbeel 2020; in the DDIM form of Song, Meng & Ermon 2021, eq. (12) with
``eta = 1``): sample the forward process's posterior ``q(x_t | x_s, x0 = D)``::

    c   = eta * sigma_t * sqrt(1 - e^{-2h})                 # DDIM eq. (16): sigma_eta
    x_t = alpha_t D + sqrt(sigma_t^2 - c^2) * (x_s - alpha_s D) / sigma_s + c z

With ``eta = 1`` this is exactly the posterior of the Gaussian forward process (variance
``sigma_t^2 (1 - e^{-2h})``, DDPM's beta-tilde) and equals SA-Solver's order-1 predictor with
``tau = 1`` (SDE-DPM-Solver++(1)); ``eta = 0`` is DDIM.

**Euler–Maruyama** on the reverse-time SDE (Song et al. 2021, eq. (6)), written in log-SNR time so
the step size is the same dimensionless ``h`` every solver here uses. With ``D`` the data prediction
and ``kappa = d log(sigma) / d lambda`` (``-alpha^2`` for VP, ``-1`` for VE, ``-alpha`` for flows)::

    dx = [(kappa - 1) x + 2 alpha D] d lambda + sqrt(2) sigma dW_lambda
    x_t = x_s + h [(kappa_s - 1) x_s + 2 alpha_s D] + sigma_s sqrt(2h) z

(derivation: divide ``dx = [f x - g^2 score] dt + g dW`` by ``d lambda / dt``, use ``score = (alpha D -
x) / sigma^2``, ``g^2 = 2 sigma^2 |d lambda/dt|``). It is the plain, non-exponential discretisation:
first order in the weak sense, and a baseline that shows what SA-Solver's exact integration of the
linear part buys. A step that starts at pure noise (``lambda = -inf``, a flow at ``t = 1``) has an
infinite drift there, so Euler–Maruyama takes the exact DDPM step on that one interval.

``brownian=True`` draws each step's ``z`` as the normalised increment of one Brownian path in
log-SNR fixed by the seed (see :mod:`fewstep.noise`), so the same seed gives close samples at
different NFE.

Example::

    >>> import torch, fewstep
    >>> from fewstep import schedules, testbeds
    >>> gm = testbeds.Gaussian(mean=0.3, std=0.5, dim=2)
    >>> gens = [torch.Generator().manual_seed(i) for i in range(4)]
    >>> noise = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> x0 = fewstep.sample(gm.model(schedules.LinearVP()), noise, solver="ddpm", nfe=50, generator=gens)
    >>> tuple(x0.shape)
    (4, 2)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..noise import NoiseSource, lambda_positions
from ..schedules import Node
from .base import MultistepPlan, Solver, Step, nodes_with_end, register, run_multistep

__all__ = ["DDPM", "EulerMaruyama", "StochasticPlan", "StochasticSolver", "ddpm_step", "em_step", "final_step"]


@dataclass
class StochasticPlan(MultistepPlan):
    """A :class:`MultistepPlan` with what the noise needs: each node's position on the Brownian axis
    (:func:`fewstep.noise.lambda_positions`, the zero-noise end included) and whether to use it."""

    positions: list[float] = field(default_factory=list)
    brownian: bool = False

    @property
    def needs_noise(self) -> bool:
        return any(p.noise != 0.0 for p in self.predictors)


class StochasticSolver(Solver):
    """Base for solvers whose steps draw noise: ``stochastic = True`` and a ``brownian`` option.

    The driver passes a :class:`~fewstep.noise.NoiseSource`; with ``brownian=True`` a plain source is
    turned into Brownian increments over the plan's log-SNR positions (same generators, so a list of
    per-sample generators still gives batch-invariant samples).
    """

    stochastic = True

    def check_options(self) -> None:
        if not isinstance(self.opts.get("brownian", False), bool):
            raise ValueError(f"brownian: expected True or False, got {self.opts['brownian']!r}")

    def _plan(self, schedule, times, nodes: list[Node], steps: list[Step], **kw) -> StochasticPlan:
        return StochasticPlan(view="x0", nodes=nodes, predictors=steps, positions=lambda_positions(schedule, times),
                              brownian=bool(self.opts.get("brownian", False)), **kw)

    def run(self, plan, x, noise):
        if noise is None and getattr(plan, "needs_noise", False):
            raise ValueError(
                f"noise: {self.name} draws noise at some steps; drive it with a fewstep.noise.NoiseSource "
                f"(fewstep.sample does this; generator= seeds it)"
            )
        if getattr(plan, "brownian", False) and isinstance(noise, NoiseSource) and not noise.brownian:
            noise = noise.as_brownian(plan.positions)
        return run_multistep(plan, x, noise)


def final_step() -> Step:
    """The step to zero noise: the last data prediction, no noise (alpha = 1, sigma = 0)."""
    return Step(a=0.0, d=(1.0,))


def ddpm_step(s: Node, t: Node, eta: float = 1.0) -> Step:
    """Ancestral (posterior) step ``s -> t`` with DDIM's ``eta`` (1 = DDPM), in data view."""
    if t.sigma == 0.0:
        return final_step()
    h = t.lam - s.lam
    one_minus_e2h = 1.0 if h == math.inf else -math.expm1(-2.0 * h)
    c = eta * t.sigma * math.sqrt(one_minus_e2h)
    keep = t.sigma * math.sqrt(max(0.0, 1.0 - eta * eta * one_minus_e2h))  # sqrt(sigma_t^2 - c^2)
    a = keep / s.sigma
    return Step(a=a, d=(t.alpha - a * s.alpha,), noise=c)


def log_sigma_slope(node: Node) -> float:
    """``kappa = d log(sigma) / d lambda`` at ``node`` from the schedule's time derivatives."""
    dlog_sigma = node.dsigma / node.sigma
    dlam = node.dalpha / node.alpha - dlog_sigma
    if dlam == 0.0 or not math.isfinite(dlam):
        raise ValueError(f"grid: the log-SNR does not change with t at t={node.t:g}; Euler–Maruyama needs d lambda/dt != 0")
    return dlog_sigma / dlam


def em_step(s: Node, t: Node) -> Step:
    """Euler–Maruyama step ``s -> t`` of the reverse SDE in log-SNR time (module docstring)."""
    if t.sigma == 0.0:
        return final_step()
    if s.lam == -math.inf:
        return ddpm_step(s, t)
    h = t.lam - s.lam
    kappa = log_sigma_slope(s)
    return Step(a=1.0 + h * (kappa - 1.0), d=(2.0 * h * s.alpha,), noise=s.sigma * math.sqrt(2.0 * h))


@register
class DDPM(StochasticSolver):
    """DDPM ancestral sampling (the DDIM ``eta`` form; ``eta=1`` is DDPM), one evaluation per step.

    Options: ``eta`` in ``[0, 1]`` (default 1), ``brownian`` (default False).

    Example::

        x0 = fewstep.sample(model, noise, solver="ddpm", nfe=50, generator=torch.Generator().manual_seed(0))
    """

    name = "ddpm"
    summary = "ancestral sampling of the forward posterior (DDIM eta; eta=1 is DDPM)"
    paper = "Ho, Jain & Abbeel, Denoising Diffusion Probabilistic Models, NeurIPS 2020; Song et al., DDIM, ICLR 2021"
    orders = (1,)
    options = {"eta": 1.0, "brownian": False}

    def check_options(self) -> None:
        super().check_options()
        eta = self.opts["eta"]
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta: expected a number in [0, 1] (1 = DDPM, 0 = DDIM), got {eta!r}")

    def prepare(self, schedule, times):
        nodes = nodes_with_end(schedule, times)
        eta = float(self.opts["eta"])
        steps = [ddpm_step(nodes[i], nodes[i + 1], eta) for i in range(len(nodes) - 1)]
        return self._plan(schedule, times, nodes[:-1], steps)


@register
class EulerMaruyama(StochasticSolver):
    """Euler–Maruyama on the reverse-time SDE in log-SNR time, one evaluation per step.

    Options: ``brownian`` (default False).

    Example::

        x0 = fewstep.sample(model, noise, solver="em", nfe=100, generator=torch.Generator().manual_seed(0))
    """

    name = "em"
    summary = "Euler-Maruyama on the reverse SDE (log-SNR time); the stochastic baseline"
    paper = "Song et al., Score-Based Generative Modeling through SDEs, ICLR 2021"
    orders = (1,)
    options = {"brownian": False}

    def prepare(self, schedule, times):
        nodes = nodes_with_end(schedule, times)
        steps = [em_step(nodes[i], nodes[i + 1]) for i in range(len(nodes) - 1)]
        return self._plan(schedule, times, nodes[:-1], steps)
