"""Pilot estimation of the level variances ``V_l(t)`` (mean square of ``f_l - f_{l-1}``, ``f_0 = 0``).

A pilot takes a few of the batch's samples along a coarse DDIM trajectory of the finest model through
``points`` of the grid's nodes (the first and the last included) and, at each of those nodes,
evaluates every level on the same states. Values between pilot nodes are interpolated linearly in the
root mean square over the node index. It costs ``points x sum_l cost_l`` per pilot sample, once; pass
the resulting probabilities back as ``probabilities=`` to sample again without a pilot.

Our choice (the paper's calibration protocol is not public, research note §1.6 step 2): DDIM states
from the finest model stand in for the sampler's states, because the marginals of the SDE and the
probability-flow ODE agree; the pilot needs their order of magnitude, not their exact values.

Example::

    >>> import torch, fewstep
    >>> from fewstep import schedules, testbeds, multilevel
    >>> gm = testbeds.mixtures()["gmm16"]
    >>> sch = schedules.LinearVP()
    >>> fam = [gm.model(sch, error=testbeds.perturbed(gm, d, seed=s)) for s, d in enumerate([0.4, 0.1])]
    >>> fam.append(gm.model(sch))
    >>> noise = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> cal = multilevel.calibrate(fam, noise, nfe=20, costs=[1, 4, 16], budget=0.3)
    >>> len(cal.probabilities), cal.probabilities[0][0]
    (20, 1.0)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..solvers.base import Evaluate, lincomb
from ..solvers.ddim import ddim_step
from .cost import expected_flops
from .estimator import subset_model
from .probabilities import optimal_probabilities

__all__ = ["LevelVariances", "pilot_run", "calibrate", "Calibration"]


@dataclass
class LevelVariances:
    """Pilot result: ``mean_square[j][l]`` at grid node ``indices[j]`` (schedule time ``times[j]``)."""

    indices: list[int]
    times: list[float]
    mean_square: list[list[float]]
    samples: int
    alphas: list[float] | None = None
    sigmas: list[float] | None = None

    def eps_mean_square(self) -> list[list[float]]:
        """The same differences in the noise view: at a fixed state ``eps = (x - alpha x0) / sigma``,
        so a difference of data predictions ``d`` is ``-(alpha / sigma) d`` in eps."""
        if self.alphas is None or self.sigmas is None:
            raise ValueError("alphas, sigmas: this pilot did not record its nodes' alpha and sigma")
        return [[v * (a / s) ** 2 for v in row] for row, a, s in zip(self.mean_square, self.alphas, self.sigmas)]

    def interpolate(self, num_nodes: int) -> list[list[float]]:
        """``V[i][l]`` for every grid node ``i``: linear in the root mean square between pilot nodes."""
        rms = [[math.sqrt(max(v, 0.0)) for v in row] for row in self.mean_square]
        idx = self.indices
        out = []
        seg = 0
        for i in range(num_nodes):
            while seg + 1 < len(idx) - 1 and i > idx[seg + 1]:
                seg += 1
            if len(idx) == 1:
                row = rms[0]
            else:
                a, b = idx[seg], idx[seg + 1]
                f = 0.0 if b == a else min(max((i - a) / (b - a), 0.0), 1.0)
                row = [(1.0 - f) * ra + f * rb for ra, rb in zip(rms[seg], rms[seg + 1])]
            out.append([r * r for r in row])
        return out


def pilot_indices(num_nodes: int, points: int) -> list[int]:
    """``points`` node indices spread evenly over the grid, first and last included."""
    m = max(1, min(points, num_nodes))
    if m == 1:
        return [0]
    return sorted({round(j * (num_nodes - 1) / (m - 1)) for j in range(m)})


def pilot_run(family, nodes, x: torch.Tensor, points: int, samples: int, record=None):
    """Generator: yields :class:`Evaluate` requests (``model=`` each family member) and returns
    :class:`LevelVariances`. ``record(level, rows)`` is told about every call (for cost accounting).

    One host-device sync, at the end (the variances become Python floats for the probability rule).
    """
    batch = x.shape[0]
    n = min(int(samples), batch)
    rows = torch.arange(n)
    members = [m if n == batch else subset_model(m, rows, batch) for m in family]
    state = x[:n]
    idx = pilot_indices(len(nodes), points)
    squares = []
    for j, i in enumerate(idx):
        node = nodes[i]
        preds = []
        for level, (orig, member) in enumerate(zip(family, members)):
            (d,) = yield Evaluate((state,), (node,), i, model=member)
            if member is not orig:  # the subset copy counted this call; the user's model should too
                orig.nfe += member.nfe
                orig.calls += member.calls
                member.nfe = member.calls = 0
            if record is not None:
                record(level, n)
            preds.append(d)
        diffs = [preds[0]] + [preds[l] - preds[l - 1] for l in range(1, len(preds))]
        squares.append(torch.stack([dd.to(torch.float64).pow(2).mean() for dd in diffs]))
        if j + 1 < len(idx):
            step = ddim_step(node, nodes[idx[j + 1]])
            state = lincomb(step.terms(state, None, [preds[-1]], None))
    table = torch.stack(squares).cpu().tolist()
    return LevelVariances(idx, [nodes[i].t for i in idx], table, n, [nodes[i].alpha for i in idx],
                          [nodes[i].sigma for i in idx])


@dataclass
class Calibration:
    """Probabilities for one (family, grid, form, budget), ready for ``probabilities=``."""

    probabilities: list[list[float]]
    costs: list[float]
    variances: LevelVariances
    budget: float
    expected_flops: float  # per sample, sampling only
    pilot_flops: float  # per pilot sample
    weights: list[float]  # the base solver's prediction coefficient per step (the rule's w_i)

    @property
    def expected_ratio(self) -> float:
        """Expected FLOPs over those of the finest model alone on the same steps."""
        return self.expected_flops / (len(self.probabilities) * self.costs[-1])

    def with_budget(self, budget: float) -> "Calibration":
        """The same pilot's variances, with the rule's probabilities for another ``budget``."""
        table = optimal_probabilities(self.variances.interpolate(len(self.weights)), self.costs, budget, self.weights)
        return Calibration(table, self.costs, self.variances, float(budget), expected_flops(table, self.costs),
                           self.pilot_flops, self.weights)


def calibrate(family: Sequence, noise: torch.Tensor, *, nfe: int | None = None, grid=None, form: str = "sde",
              costs: Sequence[float] | None = None, budget: float = 0.25, points: int = 6,
              samples: int | None = None) -> Calibration:
    """Run a pilot on ``noise`` and return the rule's probabilities for ``solver="mlem"``.

    Arguments as for ``fewstep.sample(family[-1], noise, solver="mlem", family=family, nfe=nfe,
    grid=grid, form=form, costs=costs, budget=budget)``; ``points`` pilot nodes, ``samples`` pilot
    samples (default: the whole ``noise`` batch). The models carry their own conditioning.
    """
    from ..sample import plan_for
    from ..solvers.mlem import MultilevelEM

    solver = MultilevelEM(family=list(family), form=form, costs=costs, budget=budget)
    finest = solver.family[-1]
    plan, _ = plan_for(finest, solver, nfe, grid)
    x = noise * finest.schedule.initial_scale
    costs = solver.costs(plan, x)
    run = pilot_run(solver.family, plan.base.nodes, x, points, samples or x.shape[0])
    try:
        msg = next(run)
        while True:
            member = msg.model
            preds = member.evaluate(msg.xs, msg.nodes, plan.view)
            msg = run.send(preds)
    except StopIteration as stop:
        variances = stop.value
    table = solver.rule(plan, variances, costs)
    return Calibration(table, costs, variances, float(budget), expected_flops(table, costs),
                       len(variances.indices) * math.fsum(costs), list(plan.weights))
