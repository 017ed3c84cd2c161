"""Multilevel Euler–Maruyama (ML-EM, Jacot 2026, arXiv 2603.24594) over a family of models.

The drift is known only through models ``f_1, ..., f_k`` of increasing accuracy and cost (networks of
increasing size, cheapest first). Each step replaces the single prediction of a base one-step solver by
the randomised telescoping sum (research note §1.2)::

    f_hat = sum_l (B_l / p_l) (f_l - f_{l-1}),   f_0 = 0,   B_l ~ Bernoulli(p_l) independent

so ``E[f_hat] = f_k`` while the finest model is evaluated only with probability ``p_k``. The base
updates (Euler–Maruyama ``em``, DDIM ``ddim``, DDPM ``ddpm``) are affine in the prediction, so the
expected update is the finest model's update. Regrouped per network, ``f_hat = sum_j c_j f_j`` with
``c_j = B_j/p_j - B_{j+1}/p_{j+1}``: each network is evaluated at most once per step, only when ``c_j != 0``.

Options:

* ``family`` (required): list of :class:`fewstep.Model`, cheapest first; the last is the finest and
  should be the model passed to ``fewstep.sample`` (its NFE is what ``return_info`` reports). All share
  the schedule, prediction type and sample shape.
* ``costs``: FLOPs per call and sample of each member (default: measured once with
  ``FlopCounterMode``, :func:`fewstep.multilevel.measure_flops`).
* ``probabilities``: ``k`` numbers (every step) or a ``steps x k`` table; default: the variance/cost
  rule ``p_l ∝ w_i sqrt(V_l/C_l)`` (:mod:`fewstep.multilevel.probabilities`) from a pilot on the batch.
* ``budget`` (0.25): expected FLOPs as a fraction of the finest model alone on the same steps (rule only).
* ``form``: ``"sde"`` (Euler–Maruyama, default), ``"ode"`` (DDIM/Euler) or ``"ddpm"`` (ancestral).
* ``pattern``: ``"per_sample"`` (default: every sample draws its own levels; a network runs on the
  samples that need it) or ``"shared"`` (one draw per step for the whole batch, as in the paper's
  experiments as far as we can tell; one full-batch call per needed network).
* ``draws``: ``"systematic"`` (default; our addition, measured better) or ``"independent"`` (the
  paper's fresh Bernoulli draw per step). Both fire level ``l`` at step ``i`` with probability
  ``p_il``, so each step stays unbiased; systematic draws (one random phase per level and sample,
  :func:`level_draws`) fire a level ``floor`` or ``ceil`` of its expected number of times, evenly
  spread, instead of a Poisson-like number of times.
* ``seed``: seed of the CPU generator that draws the level pattern (default: drawn from torch's global
  generator). The pattern is drawn on the host before sampling: which networks run is decided in
  Python and never waits on the device.
* ``pilot_points`` (6), ``pilot_samples`` (64): size of the pilot when ``probabilities`` is not given.
* ``brownian`` (False): Brownian-tree noise, as for ``em``.
* ``stats``: a :class:`fewstep.multilevel.MLEMStats` that the run fills (per-level calls, FLOPs).

``nfe`` is the number of steps (grid points): the finest model runs at most that often.

Example::

    >>> import torch, fewstep
    >>> from fewstep import schedules, testbeds, multilevel
    >>> gm = testbeds.mixtures()["gmm16"]
    >>> sch = schedules.LinearVP()
    >>> fam = [gm.model(sch, error=testbeds.perturbed(gm, d, seed=s)) for s, d in enumerate([0.4, 0.1])]
    >>> fam.append(gm.model(sch))
    >>> noise = torch.randn(32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> stats = multilevel.MLEMStats()
    >>> x0 = fewstep.sample(fam[-1], noise, solver="mlem", family=fam, costs=[1, 4, 16], nfe=50,
    ...                     budget=0.3, seed=0, stats=stats, generator=torch.Generator().manual_seed(1))
    >>> tuple(x0.shape), stats.rows[2] < 50 * 32, 0.2 < stats.flops_ratio < 0.4
    ((32, 16), True, True)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..model import Model
from ..multilevel import cost as _cost
from ..multilevel.estimator import check_family, check_schedules, subset_model
from ..multilevel.pilot import LevelVariances, pilot_run
from ..multilevel.probabilities import check_table, optimal_probabilities
from ..multilevel.stats import MLEMStats
from ..noise import NoiseSource
from .base import Evaluate, MultistepPlan, Solver, StepDone, lincomb, register
from .ddim import DDIM
from .sde import DDPM, EulerMaruyama

__all__ = ["MultilevelEM", "MLEMPlan", "FORMS", "PATTERNS", "DRAWS", "network_weights", "level_draws"]

#: ``form=`` -> the one-step solver whose plan ML-EM executes with the multilevel prediction.
FORMS = {"sde": EulerMaruyama, "ode": DDIM, "ddpm": DDPM}
PATTERNS = ("per_sample", "shared")
DRAWS = ("independent", "systematic")


@dataclass
class MLEMPlan:
    """The base solver's plan plus what the multilevel estimator needs, all precomputed in float64."""

    base: MultistepPlan
    costs: list[float] | None  # None: measured with FlopCounterMode when the run starts
    weights: list[float]  # |coefficient of the prediction| in each step (the rule's w_i)
    probabilities: list[list[float]] | None  # None: a pilot sets them at run time
    budget: float
    view: str = "x0"

    @property
    def nodes(self):
        return self.base.nodes

    @property
    def needs_noise(self) -> bool:
        return any(p.noise != 0.0 for p in self.base.predictors)

    @property
    def nfe(self) -> int:
        return len(self.base.nodes)


@register
class MultilevelEM(Solver):
    """Multilevel Euler–Maruyama over a model family (see the module docstring for the options)."""

    name = "mlem"
    summary = "multilevel Euler-Maruyama: randomised telescoping sum over a family of models"
    paper = "Jacot, Polynomial Speedup in Diffusion Models with the Multilevel Euler-Maruyama Method, arXiv 2603.24594"
    stochastic = True
    needs_inputs = True
    orders = (1,)
    per_step_note = "random subset of the family (finest rarely)"
    options = {
        "family": None,
        "costs": None,
        "probabilities": None,
        "budget": 0.25,
        "form": "sde",
        "pattern": "per_sample",
        "draws": "systematic",
        "seed": None,
        "pilot_points": 6,
        "pilot_samples": 64,
        "brownian": False,
        "stats": None,
    }

    # ------------------------------------------------------------------------------- options
    def check_options(self) -> None:
        o = self.opts
        if o["family"] is None:
            raise ValueError("family: mlem needs family=[model_1, ..., model_k] (cheapest first, finest last)")
        self.family: list[Model] = check_family(o["family"])
        k = len(self.family)
        if o["costs"] is not None:
            try:
                costs = [float(c) for c in o["costs"]]
            except (TypeError, ValueError):
                raise TypeError(f"costs: expected {k} numbers (FLOPs per call), got {o['costs']!r}") from None
            if len(costs) != k or any(not (c > 0 and math.isfinite(c)) for c in costs):
                raise ValueError(
                    f"costs: expected {k} positive finite numbers (one per family member), got {o['costs']!r}"
                )
        b = o["budget"]
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not (b > 0 and math.isfinite(b)):
            raise ValueError(f"budget: expected a positive number (fraction of the finest model's FLOPs), got {b!r}")
        if o["form"] not in FORMS:
            raise ValueError(f"form: expected one of {sorted(FORMS)}, got {o['form']!r}")
        if o["draws"] not in DRAWS:
            raise ValueError(f"draws: expected one of {list(DRAWS)}, got {o['draws']!r}")
        if o["pattern"] not in PATTERNS:
            raise ValueError(f"pattern: expected one of {list(PATTERNS)}, got {o['pattern']!r}")
        s = o["seed"]
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 0):
            raise ValueError(f"seed: expected a non-negative integer or None, got {s!r}")
        for name, least in (("pilot_points", 2), ("pilot_samples", 1)):
            v = o[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"{name}: expected an integer >= {least}, got {v!r}")
        if not isinstance(o["brownian"], bool):
            raise ValueError(f"brownian: expected True or False, got {o['brownian']!r}")
        if o["brownian"] and o["form"] == "ode":
            raise ValueError("brownian: only for the stochastic forms 'sde' and 'ddpm', not form='ode'")
        if o["stats"] is not None and not isinstance(o["stats"], MLEMStats):
            raise TypeError(f"stats: expected a fewstep.multilevel.MLEMStats, got {type(o['stats']).__name__}")

    # ------------------------------------------------------------------------------- numerics
    def _base_solver(self) -> Solver:
        cls = FORMS[self.opts["form"]]
        return cls(brownian=self.opts["brownian"]) if cls is not DDIM else cls()

    def prepare(self, schedule, times) -> MLEMPlan:
        check_schedules(self.family, schedule, times)
        base = self._base_solver().prepare(schedule, times)
        if base.history != 1 or any(c is not None for c in (base.correctors or [])):
            raise AssertionError("mlem: the base plan must be a one-step scheme without corrector")
        # measured at run time, on the state's dtype and device, when not given
        costs = [float(c) for c in self.opts["costs"]] if self.opts["costs"] is not None else None
        weights = [abs(step.d[0]) if step.d else 0.0 for step in base.predictors]
        table = None
        if self.opts["probabilities"] is not None:
            table = check_table(self.opts["probabilities"], len(base.nodes), len(self.family))
        return MLEMPlan(base, costs, weights, table, float(self.opts["budget"]))

    def costs(self, plan: MLEMPlan, x: torch.Tensor) -> list[float]:
        """``costs=`` if given, else each member's FLOPs per call measured on one sample like ``x``."""
        if plan.costs is not None:
            return plan.costs
        return _cost.family_flops(self.family, tuple(x.shape[1:]), dtype=x.dtype, device=x.device)

    def rule(self, plan: MLEMPlan, variances: LevelVariances, costs: list[float]) -> list[list[float]]:
        """The variance/cost rule's probabilities for ``plan`` from a pilot's variances."""
        return optimal_probabilities(variances.interpolate(len(plan.nodes)), costs, plan.budget, plan.weights)

    def run(self, plan: MLEMPlan, x: torch.Tensor, noise):
        if noise is None and plan.needs_noise:
            raise ValueError(
                f"noise: mlem form={self.opts['form']!r} draws noise; drive it with a fewstep.noise.NoiseSource "
                f"(fewstep.sample does this; generator= seeds it)"
            )
        if self.opts["brownian"] and isinstance(noise, NoiseSource) and not noise.brownian:
            noise = noise.as_brownian(plan.base.positions)
        batch = x.shape[0]
        nodes = plan.base.nodes
        n = len(nodes)
        costs = self.costs(plan, x)
        stats = self.opts["stats"] if self.opts["stats"] is not None else MLEMStats()
        stats.reset(costs, batch, n)

        table = plan.probabilities
        if table is None:
            variances = yield from pilot_run(
                self.family, nodes, x, self.opts["pilot_points"], self.opts["pilot_samples"],
                record=lambda level, rows: stats.record(level, rows, pilot=True),
            )
            stats.pilot_variances = variances.mean_square
            table = self.rule(plan, variances, costs)
        stats.probabilities = table
        stats.expected_flops = batch * _cost.expected_flops(table, costs)

        seed = self.opts["seed"]
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())  # CPU: no device sync
        stats.seed = seed
        per_sample = self.opts["pattern"] == "per_sample" and batch > 1
        weights = network_weights(table, batch if per_sample else 1, seed, self.opts["draws"])  # on the host

        for i in range(n):
            node = nodes[i]
            if per_sample:
                estimate = yield from self._per_sample_estimate(i, node, x, weights[i], stats)
            else:
                estimate = yield from self._shared_estimate(i, node, x, weights[i, :, 0].tolist(), stats)
            step = plan.base.predictors[i]
            z = noise(i) if (step.noise != 0.0 and noise is not None) else None
            x = lincomb(step.terms(x, None, [estimate], z))
            yield StepDone(i, nodes[i + 1].t if i + 1 < n else 0.0, x)
        return x

    def _shared_estimate(self, i, node, x, weights, stats):
        terms = []
        for j, c in enumerate(weights):
            if c != 0.0:
                (pred,) = yield Evaluate((x,), (node,), i, model=self.family[j])
                stats.record(j, x.shape[0])
                terms.append((c, pred))
        return lincomb(terms) if terms else torch.zeros_like(x)

    def _per_sample_estimate(self, i, node, x, weights, stats):
        """``sum_j c_jb f_j`` where network ``j`` runs only on the samples ``b`` with ``c_jb != 0``."""
        batch = x.shape[0]
        estimate = None
        for j in range(weights.shape[0]):
            rows = weights[j].nonzero().flatten()  # host tensors: no device sync
            if rows.numel() == 0:
                continue
            coef = weights[j, rows].to(device=x.device, dtype=x.dtype)
            coef = coef.reshape((rows.numel(),) + (1,) * (x.dim() - 1))
            if rows.numel() == batch:
                (pred,) = yield Evaluate((x,), (node,), i, model=self.family[j])
                contribution = pred.mul(coef)
                estimate = contribution if estimate is None else estimate.add_(contribution)
            else:
                member = subset_model(self.family[j], rows, batch)
                index = rows.to(x.device)
                (pred,) = yield Evaluate((x.index_select(0, index),), (node,), i, model=member)
                if member is not self.family[j]:  # the subset copy counted this call; the user's model should too
                    self.family[j].nfe += member.nfe
                    self.family[j].calls += member.calls
                if estimate is None:
                    estimate = torch.zeros_like(x)
                estimate.index_add_(0, index, pred.mul(coef))
            stats.record(j, rows.numel())
        return estimate if estimate is not None else torch.zeros_like(x)


def level_draws(table, batch: int, seed: int, draws: str = "independent") -> torch.Tensor:
    """Host bool tensor ``B[i, j, b]``: does level ``j`` fire at step ``i`` for sample ``b``.

    ``P(B[i, j, b]) = table[i][j]`` exactly, for both kinds of draws:

    * ``"independent"``: a fresh Bernoulli draw per step, level and sample (the paper's estimator).
    * ``"systematic"``: for each level and sample one uniform phase ``u``; level ``j`` fires at step
      ``i`` when ``floor(u + P_ij)`` steps up, ``P_ij = sum_{m <= i} table[m][j]`` (systematic sampling
      along time). Each step is still unbiased, and a level fires ``floor`` or ``ceil`` of its expected
      count, evenly spread, instead of a Poisson-like number of times.
    """
    probs = torch.tensor(table, dtype=torch.float64)
    n, k = probs.shape
    gen = torch.Generator().manual_seed(seed)
    if draws == "systematic":
        phase = torch.rand((1, k, batch), generator=gen, dtype=torch.float64)
        total = torch.cat([torch.zeros(1, k, dtype=torch.float64), probs.cumsum(0)])[:, :, None]
        counts = torch.floor(phase + total)
        return counts[1:] > counts[:-1]
    uniforms = torch.rand((n, k, batch), generator=gen, dtype=torch.float64)
    return uniforms < probs[:, :, None]


def network_weights(table, batch: int, seed: int, draws: str = "independent") -> torch.Tensor:
    """Host tensor ``c[i, j, b] = B_ijb/p_ij - B_i(j+1)b/p_i(j+1)`` of the level draws
    ``B`` of :func:`level_draws` (a CPU generator seeded with ``seed``)."""
    probs = torch.tensor(table, dtype=torch.float64)
    n, k = probs.shape
    scaled = level_draws(table, batch, seed, draws).to(torch.float64) / probs[:, :, None]
    return scaled - torch.cat([scaled[:, 1:], torch.zeros(n, 1, batch, dtype=torch.float64)], dim=1)
