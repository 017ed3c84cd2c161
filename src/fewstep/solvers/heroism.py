"""HEROISM: high-order Lagrange interpolation with successive refinement (Li, Zhou, Wei & Chen,
"Faster Diffusion Models via Higher-Order Approximation", arXiv 2506.24042).

The paper's Algorithm 1 could not be read (research notes §3.2). This module implements the
*reconstruction* of research notes §3.5, faithfully, plus a low-NFE multistep mode; see
``docs/algorithms/heroism.md`` for what is confirmed and what is our choice.

The exact probability-flow step from node ``s`` to ``t`` is an integral of one prediction ``D``
against a kernel. Two forms (``quantity=``):

* ``"score"`` – the paper's integral (research §3.4): in ``abar = alpha^2 / (alpha^2 + sigma^2)``,
  ``x_t / alpha_t = x_s / alpha_s + integral_{abar_s}^{abar_t} s(gamma) / (2 gamma^{3/2}) d gamma``
  with the score ``s = -eps / sqrt(1 - abar)`` of the variance-preserving marginal;
* ``"x0"`` – the data form in log-SNR (DPM-Solver++ eq. (9)):
  ``x_t / sigma_t = x_s / sigma_s + integral_{lam_s}^{lam_t} e^lam x0(lam) d lam``.

``D`` is replaced by its Lagrange interpolant on ``K = order`` nodes, and the integral of each
basis polynomial against the kernel is precomputed (float64, Gauss–Legendre) in ``prepare``.
Every update is then ``y = a * x_s + sum_k c[k] * D_k``.

Modes (``mode=``):

* ``"collocation"`` (research §3.5): each grid step holds ``K`` nodes, both ends included
  (``nodes="equispaced"`` or ``"chebyshev"``, Chebyshev–Lobatto), in the form's own variable. The
  first-order guess at every node (the interpolant frozen at the left end, i.e. DDIM) is refined
  ``refinements = N`` times: evaluate the model at the ``K - 1`` non-initial nodes, re-integrate the
  interpolant. With ``sweep="jacobi"`` the ``K - 1`` evaluations of a round are one batched network
  call (Picard); with ``"gauss-seidel"`` the nodes are refined one after another, each using the
  newest values. Each round raises the local order by one up to the collocation order (``K``;
  ``K + 1`` for ``K = 3``, Lobatto–Simpson), so ``N = K - 1`` is the least that gives order ``K``;
  the default ``N = K`` gets there at practical step counts (measured: docs/algorithms/heroism.md).
* ``"multistep"`` (default; low NFE): Adams-type. The interpolation nodes are the grid points
  themselves. A predictor integrates the interpolant through the last ``K - 1`` evaluated grid
  points; then the newest node is refined ``N`` times (default 1) with the interpolant through it
  and the ``K - 1`` previous points (order ``K``), each refinement reusing the latest evaluation.
  The refined state is not evaluated again: its data prediction is the evaluated one with the
  noise prediction held fixed. No point is evaluated twice and the right end of one step is the
  left end of the next, so ``N = 1`` costs one network evaluation per grid point, like
  DPM-Solver++. With ``N = 0`` the predictor alone interpolates ``K`` points (order ``K``).

Budget (``M`` grid steps, ``M + 1`` grid points, ``K`` nodes, ``N`` refinements):

====================  =================================  =====================================
mode                  network evaluations (NFE)          network calls (sequential depth)
====================  =================================  =====================================
collocation, jacobi   ``(M + 1) + M * N * (K - 1)``      ``(M + 1) + M * N``
collocation, g.-s.    ``(M + 1) + M * N * (K - 1)``      same as NFE
multistep             ``1 + M * max(N, 1)``              same as NFE
====================  =================================  =====================================

``nfe`` buys the largest ``M`` that fits (never more evaluations). In collocation mode every grid
point is evaluated once at its final state (the left end of the next step); the result is the
data prediction at the last grid point (in multistep mode with the last evaluation's noise
prediction held fixed at the refined state: the first-order step to zero noise).

Example::

    >>> import torch, fewstep
    >>> from fewstep import schedules, testbeds
    >>> sch = schedules.EDM()
    >>> gm = testbeds.Gaussian(mean=0.3, std=0.5, dim=2)
    >>> noise = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> x0, info = fewstep.sample(gm.model(sch, "eps"), noise, solver="heroism", nfe=16,
    ...                           mode="collocation", order=3, return_info=True)
    >>> info.nfe, info.calls      # M = 2 steps of 1 + 3 * 2 evaluations, + 1; calls 3 + 2 * 3
    (15, 9)
    >>> x0, info = fewstep.sample(gm.model(sch, "eps"), noise, solver="heroism", nfe=10, return_info=True)
    >>> info.nfe, info.calls      # multistep: one evaluation per grid point
    (10, 10)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from .base import Evaluate, Solver, StartBridge, StepDone, lincomb, register, x0_weights
from .coefficients import lagrange_weights
from ..schedules import Node, Schedule

__all__ = ["Heroism", "HeroismPlan"]

MODES = ("multistep", "collocation")
QUANTITIES = ("x0", "score")
NODE_KINDS = ("equispaced", "chebyshev")
SWEEPS = ("jacobi", "gauss-seidel")


# ------------------------------------------------------------------------------------ integrals
def _abar_complement(node: Node) -> float:
    """``1 - abar = sigma^2 / (alpha^2 + sigma^2)``, exact where ``abar`` rounds to 1."""
    return node.sigma**2 / (node.alpha**2 + node.sigma**2)


class _Form:
    """Where the prediction is interpolated and which kernel it is integrated against."""

    view: str

    def coordinate(self, node: Node, left: Node) -> float:
        raise NotImplementedError

    def node_at(self, schedule: Schedule, left: Node, right: Node, fractions) -> list[Node]:
        """Nodes at the given fractions of the step in this form's coordinate (ends exact)."""
        raise NotImplementedError

    def update(self, left: Node, right: Node, stencil: list[Node]) -> "_Update":
        """``y(right) = a * x(left) + sum_k c[k] * D(stencil[k])`` for the interpolant of ``D``."""
        raise NotImplementedError


class _DataForm(_Form):
    """Data prediction interpolated in ``lambda``, kernel ``e^lambda`` (exponential integrator).

    A step starting from pure noise (``alpha = 0``, ``lambda = -inf``) uses the coordinate
    ``u = e^lambda = alpha / sigma`` instead, in which the same integral has kernel 1 and a finite range.
    """

    view = "x0"

    @staticmethod
    def _from_noise(left: Node) -> bool:
        return not math.isfinite(left.lam)

    def coordinate(self, node, left):
        return node.alpha / node.sigma if self._from_noise(left) else node.lam

    def node_at(self, schedule, left, right, fractions):
        if self._from_noise(left):
            u0, u1 = 0.0, right.alpha / right.sigma
            lam = [math.log(u0 + f * (u1 - u0)) for f in fractions[1:-1]]
        else:
            lam = [left.lam + f * (right.lam - left.lam) for f in fractions[1:-1]]
        inner = schedule.nodes(schedule.t_of_lambda(torch.tensor(lam, dtype=torch.float64))) if lam else []
        return [left, *inner, right]

    def update(self, left, right, stencil):
        a = right.sigma / left.sigma
        coords = [self.coordinate(n, left) for n in stencil]
        if self._from_noise(left):
            w = lagrange_weights(coords, 0.0, right.alpha / right.sigma)
            return _Update(a, tuple(float(right.sigma * wk) for wk in w))
        # sigma_t e^lam = alpha_t e^(lam - lam_t): a bounded kernel on the step
        w = lagrange_weights(coords, left.lam, right.lam, kernel=lambda u: np.exp(u - right.lam))
        return _Update(a, tuple(float(right.alpha * wk) for wk in w))


class _ScoreForm(_Form):
    """The score ``s = -eps / sqrt(1 - abar)`` interpolated in ``abar``, kernel ``gamma^{-3/2} / 2``
    (the paper's integral, research notes §3.4).

    Nodes and quadrature use the coordinate ``w = 1 - abar = sigma^2 / (alpha^2 + sigma^2)``: the
    same polynomials (interpolation is invariant under ``w = 1 - abar``), but exact near the clean
    end where ``abar`` rounds to 1.
    """

    view = "eps"

    def coordinate(self, node, left):
        return _abar_complement(node)

    def node_at(self, schedule, left, right, fractions):
        w0, w1 = _abar_complement(left), _abar_complement(right)
        # lambda = log(abar / (1 - abar)) / 2
        lam = [0.5 * (math.log1p(-w) - math.log(w)) for w in (w0 + f * (w1 - w0) for f in fractions[1:-1])]
        inner = schedule.nodes(schedule.t_of_lambda(torch.tensor(lam, dtype=torch.float64))) if lam else []
        return [left, *inner, right]

    def update(self, left, right, stencil):
        coords = [self.coordinate(n, left) for n in stencil]
        # integral over abar of gamma^{-3/2} l_k = - integral over w of (1 - w)^{-3/2} l_k
        w = -lagrange_weights(coords, _abar_complement(left), _abar_complement(right),
                              kernel=lambda u: (1.0 - u) ** -1.5)
        # x_t = (alpha_t / alpha_s) x_s + (alpha_t / 2) sum_k W_k s_k with s_k = -eps_k / sqrt(1 - abar_k)
        c = tuple(float(-0.5 * right.alpha * wk / math.sqrt(_abar_complement(n))) for wk, n in zip(w, stencil))
        return _Update(right.alpha / left.alpha, c)


_FORMS = {"x0": _DataForm(), "score": _ScoreForm()}


def _fractions(k: int, kind: str) -> list[float]:
    """``k`` node positions on ``[0, 1]``, both ends included (Chebyshev–Lobatto: ``(1 - cos(pi j/(k-1)))/2``)."""
    if kind == "equispaced":
        return [j / (k - 1) for j in range(k)]
    return [0.5 * (1.0 - math.cos(math.pi * j / (k - 1))) for j in range(k)]


# ------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class _Update:
    """``y = a * x_start + sum_k c[k] * D[k]`` (``D`` in the order the plan documents)."""

    a: float
    c: tuple[float, ...]

    def terms(self, x, preds):
        out = [(self.a, x)]
        out += [(ck, d) for ck, d in zip(self.c, preds) if ck != 0.0]
        return out


@dataclass(frozen=True)
class _CollocationStep:
    """One grid step: ``nodes[0]`` is the left end, ``nodes[-1]`` the right end.

    ``updates[j - 1]`` gives the state at ``nodes[j]`` from the left state and the predictions at
    ``nodes[0..K-1]``.
    """

    nodes: tuple[Node, ...]
    updates: tuple[_Update, ...]


@dataclass(frozen=True)
class _MultistepStep:
    """Step into grid point ``right``.

    ``predictor.c[k]`` multiplies the prediction at the k-th newest grid point already evaluated;
    ``corrector.c[0]`` the newest evaluation at ``right``, ``corrector.c[k]`` the (k-1)-th newest past
    one. ``shift`` turns the evaluation's prediction into the prediction at the refined state with the
    noise prediction held fixed: ``D(refined) = D(evaluated) + shift * (refined - evaluated)``
    (``1 / alpha`` for data predictions, 0 for noise/score predictions).
    """

    right: Node
    predictor: _Update
    corrector: _Update | None
    shift: float


@dataclass
class HeroismPlan:
    """Everything :meth:`Heroism.run` needs, precomputed in float64."""

    view: str
    mode: str
    sweep: str
    refinements: int
    first: Node
    steps: list
    history: int
    output: tuple[float, float]  # x0 = output[0] * x + output[1] * D at the last grid point
    nfe: int
    calls: int

    def bridged(self, top: Node) -> "HeroismPlan | None":
        """This plan started from pure noise below ``top``, with the truncation bridge: the first
        state replaced by ``x + weight * x0(x, first)``
        (:class:`fewstep.solvers.base.StartBridge`), folded into the first step's updates, which are
        the only ones that read the first state (the data prediction there stays the one made at the
        unshifted state)."""
        if self.view != "x0":
            # the score form (noise view) reads D[0] beyond the first updates (later multistep steps;
            # the first collocation round's starting values): its bridged value would have to be
            # folded there too. Not done: measured, the bridge gained nothing for it (0.79-1.03)
            return None
        bridge = StartBridge.between(top, self.first, self.view)

        def shifted(u: _Update, k: int) -> _Update:  # u reads the first state as x, D[0] as its c[k]
            return _Update(*bridge.shift(u.a, u.c, k))

        first = self.steps[0]
        if self.mode == "collocation":  # every node of the first step integrates from d_left = D[0]
            first = replace(first, updates=tuple(shifted(u, 0) for u in first.updates))
        else:  # predictor: D[0] is the newest past point; corrector: one behind the new evaluation
            first = replace(first, predictor=shifted(first.predictor, 0),
                            corrector=None if first.corrector is None else shifted(first.corrector, 1))
        return replace(self, steps=[first, *self.steps[1:]])

    def times(self) -> list[float]:
        if self.mode == "collocation":
            return [self.first.t] + [s.nodes[-1].t for s in self.steps]
        return [self.first.t] + [s.right.t for s in self.steps]


# ---------------------------------------------------------------------------------------- solver
@register
class Heroism(Solver):
    """HEROISM (reconstructed): Lagrange interpolation with successive refinement.

    Options: ``order`` (K, Lagrange nodes per interpolant, 2–6; the method's order), ``refinements``
    (N >= 0; default ``K`` in collocation mode, 1 in multistep mode), ``mode``
    (``"multistep"`` | ``"collocation"``), ``quantity`` (``"x0"`` | ``"score"``), ``nodes``
    (``"equispaced"`` | ``"chebyshev"``; collocation), ``sweep`` (``"jacobi"`` | ``"gauss-seidel"``;
    collocation).

    Example::

        >>> fewstep.sample(model, noise, solver="heroism", nfe=10)                     # doctest: +SKIP
        >>> fewstep.sample(model, noise, solver="heroism", nfe=61, mode="collocation",
        ...                order=4, refinements=3, sweep="jacobi", return_info=True)   # doctest: +SKIP
    """

    name = "heroism"
    summary = "Lagrange interpolation + successive refinement (collocation or Adams-type multistep)"
    paper = "Li, Zhou, Wei & Chen, Faster Diffusion Models via Higher-Order Approximation, arXiv 2506.24042 (reconstructed)"
    orders = (2, 3, 4, 5, 6)
    options = {
        "order": 3,
        "refinements": None,
        "mode": "multistep",
        "quantity": "x0",
        "nodes": "equispaced",
        "sweep": "jacobi",
    }

    def check_options(self) -> None:
        o = self.opts
        for key, valid in (("mode", MODES), ("quantity", QUANTITIES), ("nodes", NODE_KINDS), ("sweep", SWEEPS)):
            if o[key] not in valid:
                raise ValueError(f"{key}: heroism accepts {list(valid)}, got {o[key]!r}")
        n = o["refinements"]
        if n is None:
            n = self.order if o["mode"] == "collocation" else 1
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"refinements: expected an integer >= 0, got {o['refinements']!r}")
        self.opts["refinements"] = n

    # ---- budget --------------------------------------------------------------------------------
    @property
    def refinements(self) -> int:
        return int(self.opts["refinements"])

    def _per_step(self) -> int:
        if self.opts["mode"] == "collocation":
            return 1 + self.refinements * (self.order - 1)
        return max(self.refinements, 1)

    def evals_per_step(self) -> str:
        if self.opts["mode"] == "collocation":
            return f"1+N(K-1) = {self._per_step()}"
        return str(self._per_step())

    def min_nfe(self) -> int:
        return 1 + self._per_step()  # one step: the first point, the step, (its right end is its last evaluation)

    def nfe_for_points(self, num_points: int) -> int:
        return 1 + (num_points - 1) * self._per_step()

    def num_points(self, nfe: int) -> int:
        if nfe < self.min_nfe():
            raise ValueError(f"nfe: {self._describe()} needs nfe >= {self.min_nfe()}, got {nfe}")
        return 1 + (nfe - 1) // self._per_step()

    def calls_for_points(self, num_points: int) -> int:
        """Sequential depth: network calls for a grid of ``num_points`` points."""
        if self.opts["mode"] == "collocation" and self.opts["sweep"] == "jacobi":
            return num_points + (num_points - 1) * self.refinements
        return self.nfe_for_points(num_points)

    def _describe(self) -> str:
        o = self.opts
        return f"heroism (mode={o['mode']!r}, order={self.order}, refinements={self.refinements})"

    # ---- numerics ------------------------------------------------------------------------------
    def prepare(self, schedule: Schedule, times: torch.Tensor) -> HeroismPlan:
        grid = schedule.nodes(times)
        if len(grid) < 2:
            raise ValueError(f"grid: {self._describe()} needs at least 2 points, got {len(grid)}")
        form = _FORMS[self.opts["quantity"]]
        if self.opts["quantity"] == "score" and grid[0].alpha <= 0.0:
            raise ValueError(
                f"quantity: 'score' integrates in abar and needs alpha > 0 at the first grid time "
                f"(t={grid[0].t:g} has alpha = 0); use quantity='x0' or a grid starting below t_max"
            )
        if self.opts["mode"] == "collocation":
            steps = self._collocation_steps(schedule, grid, form)
            history = 1
        else:
            steps = self._multistep_steps(grid, form)
            history = self.order
        m = len(grid)
        return HeroismPlan(
            view=form.view,
            mode=self.opts["mode"],
            sweep=self.opts["sweep"],
            refinements=self.refinements,
            first=grid[0],
            steps=steps,
            history=history,
            output=x0_weights(form.view, grid[-1]),
            nfe=self.nfe_for_points(m),
            calls=self.calls_for_points(m),
        )

    def _collocation_steps(self, schedule, grid, form) -> list[_CollocationStep]:
        k = self.order
        fractions = _fractions(k, self.opts["nodes"])
        steps = []
        for left, right in zip(grid[:-1], grid[1:]):
            nodes = form.node_at(schedule, left, right, fractions)
            updates = tuple(form.update(left, nodes[j], nodes) for j in range(1, k))
            steps.append(_CollocationStep(tuple(nodes), updates))
        return steps

    def _multistep_steps(self, grid, form) -> list[_MultistepStep]:
        k, refine = self.order, self.refinements > 0
        # With refinement the predictor is one order lower (K - 1 past points) and the refinement,
        # through the newest node and K - 1 past points, raises it to K (as each collocation sweep
        # raises the order by one). Without refinement the predictor alone has order K.
        k_pred = k - 1 if refine else k
        shift_of = (lambda node: 1.0 / node.alpha) if form.view == "x0" else (lambda node: 0.0)
        steps = []
        for i in range(len(grid) - 1):
            left, right = grid[i], grid[i + 1]
            past = _stencil(grid, i, k_pred, form, left)  # grid points i, i-1, ... (k_pred >= k - 1)
            predictor = form.update(left, right, past[:k_pred])
            corrector = form.update(left, right, [right, *past[: k - 1]]) if refine else None
            steps.append(_MultistepStep(right, predictor, corrector, shift_of(right)))
        return steps

    def view(self, plan: HeroismPlan) -> str:
        return plan.view

    def run(self, plan: HeroismPlan, x: torch.Tensor, noise=None):
        if plan.mode == "collocation":
            return _run_collocation(plan, x)
        return _run_multistep(plan, x)


def _stencil(grid: list[Node], i: int, k: int, form: _Form, left: Node) -> list[Node]:
    """Up to ``k`` grid points ``i, i-1, ...`` whose coordinate is finite for this step's form."""
    out = []
    for j in range(i, max(i - k, -1), -1):
        if not math.isfinite(form.coordinate(grid[j], left)):
            break
        out.append(grid[j])
    return out


# ------------------------------------------------------------------------------------ generators
def _run_collocation(plan: HeroismPlan, x: torch.Tensor):
    (d_left,) = yield Evaluate((x,), (plan.first,), 0)
    jacobi = plan.sweep == "jacobi"
    for m, step in enumerate(plan.steps):
        # Round 0: every node predicted with the interpolant frozen at the left end (first order, DDIM).
        preds = [d_left] * len(step.nodes)
        for _ in range(plan.refinements):
            if jacobi:
                # Picard sweep: all non-initial nodes from the previous round's values, one batched call
                ys = tuple(lincomb(u.terms(x, preds)) for u in step.updates)
                outs = yield Evaluate(ys, step.nodes[1:], m)
                preds = [preds[0], *outs]
            else:
                # Gauss–Seidel: each node integrates the newest values of the nodes before it
                for j, u in enumerate(step.updates, start=1):
                    y = lincomb(u.terms(x, preds))
                    (preds[j],) = yield Evaluate((y,), (step.nodes[j],), m)
        x = lincomb(step.updates[-1].terms(x, preds))
        # the right end, evaluated once at its final state: the left end of the next step (or the result)
        (d_left,) = yield Evaluate((x,), (step.nodes[-1],), m + 1)
        yield StepDone(m, step.nodes[-1].t, x)
    cx, cd = plan.output
    return lincomb([(cd, d_left), (cx, x)] if cx != 0.0 else [(cd, d_left)])


def _run_multistep(plan: HeroismPlan, x: torch.Tensor):
    (d,) = yield Evaluate((x,), (plan.first,), 0)
    history = [d]
    evals = max(plan.refinements, 1)
    for i, step in enumerate(plan.steps):
        # predictor: the interpolant through the last evaluated grid points (Adams–Bashforth type)
        y = y_eval = lincomb(step.predictor.terms(x, history))
        for _ in range(evals):
            y_eval = y
            (d,) = yield Evaluate((y,), (step.right,), i + 1)
            if step.corrector is not None:
                # refine the newest node: the interpolant through it (latest evaluation) and the
                # previous grid points (Adams–Moulton type)
                y = lincomb(step.corrector.terms(x, [d, *history]))
        if step.shift != 0.0 and step.corrector is not None:
            # No evaluation at the refined state: its prediction is the evaluated one with the noise
            # prediction held fixed (x0 = (y - sigma eps) / alpha). A noise or score prediction is
            # reused as it is (shift 0).
            d = lincomb([(1.0, d), (step.shift, y), (-step.shift, y_eval)])
        history.insert(0, d)
        del history[plan.history:]
        x = y
        yield StepDone(i, step.right.t, x)
    # Result: the data prediction at the last grid point (the first-order step to zero noise).
    cx, cd = plan.output
    if cx == 0.0:
        return d.clone()
    return lincomb([(cx, x), (cd, d)])
