"""The one mechanism every solver shares.

A solver is pure numerics. :meth:`Solver.prepare` turns ``(schedule, grid)`` into a plan of float64
coefficients, once; :meth:`Solver.run` is a generator that *yields* requests and *receives* network
predictions:

* ``Evaluate(xs, nodes, step)`` – evaluate the model's view at each ``(x, node)`` pair, all in one
  batched network call; the driver sends back a list of tensors.
* ``StepDone(i, t, x)`` – step ``i`` reached time ``t`` with state ``x``; the driver sends ``None``,
  or :data:`QUIET` when it needs no more of them (no callback): a solver may then stop yielding
  them, which saves a generator round trip per step (``run_multistep`` does; others may ignore it).

The generator returns the final clean sample. ``fewstep.sample``, the diffusers scheduler adapter,
the k-diffusion-style functions and the distributed runner all drive the same generator.

Most solvers (DDIM, Heun, DPM-Solver++, UniPC, DEIS, iPNDM, SA-Solver, DDPM, Euler–Maruyama,
forward value) are *linear multistep predictor–corrector* schemes in some view: each step is a
linear combination of the state, past predictions and a noise draw. They only fill a
:class:`MultistepPlan` with coefficients; :func:`run_multistep` executes every one of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Generator, NamedTuple, Sequence

import torch

from ..schedules import Node, Schedule, ZERO_NOISE

__all__ = [
    "Evaluate",
    "StepDone",
    "QUIET",
    "Solver",
    "MultistepPlan",
    "Step",
    "run_multistep",
    "lincomb",
    "x0_weights",
    "start_bridge_weight",
    "StartBridge",
    "register",
    "REGISTRY",
]


class Evaluate(NamedTuple):
    """Request: the model's view at each ``(xs[k], nodes[k])``, in one batched call.

    ``model`` names another :class:`fewstep.Model` to evaluate (multilevel solvers use a family of
    networks); ``None`` means the model being sampled.

    ``scaled``: the requester also accepts each answer as a pair ``(u, s)`` meaning the view
    ``s * u`` (:meth:`fewstep.Model.evaluate` with ``scaled=True``). Folding ``s`` into the solver's
    coefficients saves one tensor operation per evaluation; drivers that ignore the flag answer with
    plain tensors, which stay valid.

    ``carried``: the solver's next state combines its current state and these answers, each with a
    nonzero weight, and its next request (or its result) is at that state; a NaN or Inf in an answer
    then makes every later state non-finite, and a driver may check a state now and then instead of
    every answer (:class:`fewstep.sample.FiniteGuard`). ``False`` asks for each answer to be checked.

    Messages are immutable named tuples rather than frozen dataclasses: one is made per step, and a
    frozen dataclass's ``__init__`` costs about 0.5 us more (a fixed part of a 20 us step). Drivers
    tell the two kinds apart with ``type(msg) is Evaluate``.
    """

    xs: tuple
    nodes: tuple
    step: int
    model: Any = None
    scaled: bool = False
    carried: bool = False


class StepDone(NamedTuple):
    """Progress event: step ``i`` finished at schedule time ``t`` (0.0 for the final clean sample)."""

    i: int
    t: float
    x: torch.Tensor


class _Quiet:
    def __repr__(self) -> str:
        return "QUIET"


#: A driver's reply to :class:`StepDone`: send no more of them in this run (see the module docstring).
QUIET = _Quiet()

SolverRun = Generator[Any, Any, torch.Tensor]


def lincomb(terms: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """``sum(c * v)`` with Python-float coefficients: no host-device sync, one fused op per term."""
    (c0, v0), rest = terms[0], terms[1:]
    if rest:
        c1, v1 = rest[0]
        out = torch.add(v0, v1, alpha=c1 / c0).mul_(c0) if c0 != 1.0 else torch.add(v0, v1, alpha=c1)
        for c, v in rest[1:]:
            out.add_(v, alpha=c)
        return out
    return v0.mul(c0) if c0 != 1.0 else v0.clone()


def x0_weights(view: str, node: Node) -> tuple[float, float]:
    """``(p, q)`` with ``x0 = p * x + q * V`` for a prediction ``V`` in ``view`` ("x0" or "eps") at ``node``."""
    if view == "x0":
        return (0.0, 1.0)
    if view == "eps":
        return (1.0 / node.alpha, -node.sigma / node.alpha)  # x0 = (x - sigma eps) / alpha
    raise ValueError(f"view: expected 'x0' or 'eps', got {view!r}")


def start_bridge_weight(top: Node, start: Node) -> float:
    """The weight of the first data prediction in the truncation bridge from ``top`` to ``start``.

    A sampler that skips the top of the schedule starts at ``start`` from pure noise,
    ``x = sigma_start * z``, while the probability-flow ODE from ``x_top = sigma_top * z`` gives, in
    its data form (DPM-Solver++, Lu et al. 2022, eq. (9)),
    ``x_start = (sigma_start / sigma_top) x_top + sigma_start * integral_{lam_top}^{lam_start}
    e^lam x0(lam) dlam``. The bridge keeps that integral, with the data prediction frozen at the
    segment's *right* end (where its ``e^lam`` weight concentrates; the forward-value idea of Jiao et
    al.), i.e. the prediction the sampler makes at ``start`` anyway: ``x += w * x0(x, start)`` with
    ``w = alpha_start - sigma_start * alpha_top / sigma_top``. No extra network evaluation.
    """
    return start.alpha - start.sigma * top.alpha / top.sigma


@dataclass(frozen=True, slots=True)
class StartBridge:
    """The truncation bridge folded into a plan's first steps (:func:`start_bridge_weight`).

    The state at the first node becomes ``x' = x + weight * x0`` with ``x0 = p x + q D`` the data
    prediction made at ``x`` (:func:`x0_weights`), and the first prediction is read as the one at
    ``x'`` *with the same data prediction*: ``D' = D + slope * (x' - x)``, ``slope = 1/sigma`` in the
    noise view (``eps = (x - alpha x0) / sigma``) and 0 in the data view. Keeping the data prediction
    fixed (not the view's) is what makes the bridge the same method in every view: reusing ``eps(x)``
    at ``x'`` would give a slope that disagrees with the state by ``weight * x0 / sigma``.

    Example::

        >>> bridge = StartBridge.between(top, first, "eps")   # doctest: +SKIP
        >>> a, d = bridge.shift(step.a, step.d, 0)             # doctest: +SKIP
    """

    weight: float
    p: float
    q: float
    slope: float

    @classmethod
    def between(cls, top: Node, first: Node, view: str) -> "StartBridge":
        p, q = x0_weights(view, first)
        return cls(start_bridge_weight(top, first), p, q, 1.0 / first.sigma if view == "eps" else 0.0)

    def shift(self, a: float, weights: Sequence[float], k: int) -> tuple[float, tuple[float, ...]]:
        """An update ``a x + sum_j weights[j] D_j`` that reads the first state as ``x`` and the first
        prediction as ``D_k``, rewritten for ``x'`` and ``D'``: ``(new a, new weights)``."""
        w, p, q, r = self.weight, self.p, self.q, self.slope
        shifted = list(weights) + [0.0] * (k + 1 - len(weights))
        d_k = shifted[k]
        # x' = (1 + w p) x + w q D;  D' = r w p x + (1 + r w q) D
        shifted[k] = a * w * q + d_k * (1.0 + r * w * q)
        return a * (1.0 + w * p) + d_k * r * w * p, tuple(shifted)


# ------------------------------------------------------------------------------------------- plans
@dataclass(slots=True)
class Step:
    """One linear update ``x_new = a * x + at * x_tilde + sum_k d[k] * D[newest-k] + noise * z``.

    ``d[k]`` multiplies the k-th newest stored prediction. ``noise`` multiplies a standard normal
    draw (one per step, shared between the predictor and the corrector of that step).
    ``noise_prev`` multiplies the previous step's draw; only a corrector folded into the next
    predictor (:meth:`MultistepPlan.fused`) has one.
    """

    a: float
    d: tuple[float, ...] = ()
    at: float = 0.0
    noise: float = 0.0
    noise_prev: float = 0.0

    def terms(self, x, x_tilde, history, z, scales=None, z_prev=None):
        """``(coefficient, tensor)`` pairs; ``scales[k]`` multiplies history entry ``k`` (default 1)."""
        out = []
        if self.a != 0.0:
            out.append((self.a, x))
        if self.at != 0.0:
            out.append((self.at, x_tilde))
        if scales is None:
            for c, h in zip(self.d, history):
                if c != 0.0:
                    out.append((c, h))
        else:
            for c, h, s in zip(self.d, history, scales):
                if c != 0.0:
                    out.append((c * s, h))
        if self.noise_prev != 0.0:
            out.append((self.noise_prev, z_prev))
        if self.noise != 0.0:
            out.append((self.noise, z))
        return out


@dataclass
class MultistepPlan:
    """Coefficients of a linear multistep predictor–corrector scheme, precomputed in float64.

    Evaluation ``i`` is at ``nodes[i]``; the last predictor steps to :data:`ZERO_NOISE`.

    * ``predictors[i]`` maps the state at node ``i`` to the predicted state at node ``i+1``
      (``x_tilde``); history entry 0 is the prediction just evaluated at node ``i``.
    * ``correctors[i]`` (optional, ``i >= 1``) replaces the state at node ``i`` once its prediction
      is known: ``x = a * x_prev + at * x_tilde + sum d[k] D[i-k] + noise * z_prev`` (UniC, SA-Corrector,
      forward value).
    * ``reevaluate[i]``: evaluate again at the corrected state and replace the newest prediction
      (PECE mode, e.g. Heun).
    * ``free_first``: the first prediction is the initial noise itself (forward-value samplers).
    * ``start_sigma``, ``fuse``: see the fields.

    The fused steps (:meth:`fused`) are made with the plan: change a plan with
    :func:`dataclasses.replace`, not in place.
    """

    view: str
    nodes: list[Node]
    predictors: list[Step]
    correctors: list[Step | None] = field(default_factory=list)
    reevaluate: list[bool] = field(default_factory=list)
    history: int = 1
    free_first: bool = False
    initial_scale: float = 1.0
    #: a plan whose first node lies below ``t_max`` and starts there from pure noise (a searched
    #: solver with a searched start): the first state is ``start_sigma * noise`` (``None``: as usual)
    start_sigma: float | None = None
    #: run each corrector folded into the next predictor where the algebra allows (:meth:`fused`);
    #: ``False`` runs every predictor and corrector as written (the reference the fused loop is tested against)
    fuse: bool = True
    #: ``((fused steps, history, loop table, stochastic) or None,)``, made with the plan (plans are
    #: cached and reused between calls, so this is once)
    _fused: Any = field(default=None, init=False, repr=False, compare=False)
    #: the fused deterministic steps' state weights as 0-dim CPU tensors, one list per compute dtype
    #: (:func:`_make_state_weights`), made with the plan
    _state_weight_tensors: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        # the fold is planning: made here, once, rather than in the first run of the plan
        self._fused_run()
        _make_state_weights(self)

    @property
    def nfe(self) -> int:
        n = len(self.nodes) - (1 if self.free_first else 0)
        return n + sum(bool(r) for r in self.reevaluate)

    def times(self) -> list[float]:
        return [n.t for n in self.nodes]

    def fused(self) -> tuple[list[Step], int] | None:
        """Each corrector folded into the next predictor: ``(steps, history)``, one step per node, or
        ``None`` where that does not apply (``fuse=False``, re-evaluating plans, a predictor that
        uses ``x_tilde`` or has a zero ``x`` weight before a corrector). A plan without correctors
        gives its predictors (and runs through the same short loop).

        A corrector replaces the state at node ``i`` by
        ``x_i = c.a x_{i-1} + c.at xt_i + sum c.d H + c.noise z_{i-1}``, and predictor ``i - 1`` made
        ``xt_i = p'.a x_{i-1} + sum p'.d H' + p'.noise z_{i-1}`` (``H'_k = H_{k+1}``, the history
        before ``D_i``). Solving the second for ``x_{i-1}`` writes ``x_i`` -- and then the predicted
        ``xt_{i+1}`` -- as ONE linear combination of ``xt_i``, the history and the draws ``z_{i-1}``,
        ``z_i``: a predictor-corrector (UniPC, SA-Solver, forward value) then costs one combination
        per step instead of two, with the same numbers (float64 coefficients; the state ``x_i``
        itself is never needed, as the drivers only see ``xt``). Made once, with the plan.

        Example::

            >>> plan = fewstep.solvers.get("unipc", order=2).prepare(schedule, times)  # doctest: +SKIP
            >>> steps, history = plan.fused()                                           # doctest: +SKIP
        """
        found = self._fused_run()
        return None if found is None else found[:2]

    def bridged(self, top: Node) -> "MultistepPlan | None":
        """This plan started from pure noise below ``top`` (the schedule's first node), with the
        truncation bridge: the state at the first node replaced by ``x + weight * x0(x, nodes[0])``,
        ``weight = start_bridge_weight(top, nodes[0])``. ``None`` where the bridge does not apply: a
        plan that evaluates nothing at its first node (``free_first``) or draws noise.

        The first data prediction is the one evaluated at the unshifted state (the shift is small and
        the data prediction is flat in ``x`` at high noise), so only the two steps that read the first
        state change (:class:`StartBridge`). Coefficients in float64, once.

        Example::

            >>> plan = fewstep.solvers.get("dpm++").prepare(schedule, times)      # doctest: +SKIP
            >>> plan.bridged(schedule.nodes(torch.tensor([schedule.t_max]))[0])   # doctest: +SKIP
        """
        if self.free_first or any(s.noise != 0.0 for s in self.predictors) or any(
                c is not None and c.noise != 0.0 for c in self.correctors):
            return None
        bridge = StartBridge.between(top, self.nodes[0], self.view)

        def shifted(step: Step, k: int) -> Step:  # step reads the first state as x, its prediction as D[k]
            a, d = bridge.shift(step.a, step.d, k)
            return replace(step, a=a, d=d)

        predictors = [shifted(self.predictors[0], 0), *self.predictors[1:]]
        correctors, history = list(self.correctors), self.history
        if len(correctors) > 1 and correctors[1] is not None:
            correctors[1] = shifted(correctors[1], 1)  # at node 1 the first prediction is one back
            history = max(history, 2)
        if bridge.slope != 0.0 and not _reread_first_prediction(predictors, correctors, bridge):
            return None
        return replace(self, predictors=predictors, correctors=correctors, history=history)

    def _fused_run(self):
        """What :func:`_run_fused` needs: ``(steps, history, loop table, stochastic)``, or ``None``."""
        if self._fused is None:
            steps = self._fuse() if self.fuse else None
            self._fused = (None if steps is None else (*steps, *_loop_table(steps[0], self.nodes)),)
        return self._fused[0]

    def _fuse(self):
        n = len(self.nodes)
        correctors = self.correctors or [None] * n
        if len(self.predictors) != n or len(correctors) != n:
            return None  # not a plan run_multistep can run: let it say so when run
        if (any(self.reevaluate) or any(s.at != 0.0 or s.noise_prev != 0.0 for s in self.predictors)
                or any(c is not None and c.noise_prev != 0.0 for c in correctors)):
            return None
        steps, history = [], max(1, self.history)
        for i, pred in enumerate(self.predictors):
            corr = correctors[i] if i > 0 else None
            if corr is None:
                steps.append(pred)
                continue
            before = self.predictors[i - 1]
            if before.a == 0.0:
                return None
            r = corr.a / before.a
            width = max(len(corr.d), len(before.d) + 1, len(pred.d))
            e = [0.0] * width  # x_i = (r + c.at) xt_i + sum_k e[k] H_k + (c.noise - r p'.noise) z_{i-1}
            for k, c in enumerate(corr.d):
                e[k] += c
            for k, c in enumerate(before.d):
                e[k + 1] -= r * c
            d = [pred.a * v for v in e]
            for k, c in enumerate(pred.d):
                d[k] += c
            # SA-Solver's corrector redoes the step with the predictor's own draw: r = 1 and the same
            # noise weight, so the z_{i-1} weight is exactly zero there
            noise_prev = pred.a * (corr.noise - r * before.noise)
            steps.append(Step(a=pred.a * (r + corr.at), d=tuple(d), noise=pred.noise, noise_prev=noise_prev))
            history = max(history, width)
        return steps, history


def _reread_first_prediction(predictors: list[Step], correctors: list, bridge: StartBridge) -> bool:
    """In the noise view the bridged first prediction is ``D_0' = D_0 + slope * delta`` with
    ``delta = weight (p x_0 + q D_0)`` (:class:`StartBridge`), and a multistep predictor ``i >= 1``
    that reads ``D_0`` from its history must read ``D_0'``. It cannot see ``x_0``, but its own state
    is a known combination ``x_i = alpha x_0 + sum_j beta_j D_j`` of ``x_0`` and the predictions in
    its window, so ``x_0 = (x_i - sum_j beta_j D_j) / alpha`` folds in. Rewrites ``predictors`` in
    place; ``False`` where this does not apply (a corrector after node 1 reads ``D_0``, or a plan
    with correctors whose later predictors read it: their states are not tracked here)."""
    n = len(predictors)
    reads = [i for i in range(1, n) if len(predictors[i].d) > i and predictors[i].d[i] != 0.0]
    if any(c is not None and len(c.d) > i and c.d[i] != 0.0 for i, c in enumerate(correctors) if i >= 2):
        return False
    if not reads:
        return True
    if any(c is not None for c in correctors):
        return False
    w, p, q, r = bridge.weight, bridge.p, bridge.q, bridge.slope
    state = [1.0] + [0.0] * n  # x_i over (x_0, D_0, ..., D_{n-1}); the run holds the unshifted x_0
    for i in range(n):
        step = predictors[i]
        if i in reads:
            alpha, d = state[0], list(step.d)
            if abs(alpha) < 1e-300:
                return False
            extra_x, extra_d0 = d[i] * r * w * p, d[i] * r * w * q  # d_i * slope * delta
            a = step.a + extra_x / alpha
            for j in range(i):  # D_j is history entry i - j at step i
                d[i - j] -= extra_x * state[1 + j] / alpha
            d[i] += extra_d0
            step = predictors[i] = replace(step, a=a, d=tuple(d))
        state = [step.a * v for v in state]
        for k, c in enumerate(step.d):
            if i - k >= 0:
                state[1 + i - k] += c
    return True


class _LoopStep(NamedTuple):
    """One fused step as :func:`_run_fused` reads it, made once per plan."""

    a: float
    #: ``(k, d_k)`` of the first nonzero history weight (``None``: none), then the others
    first: tuple[int, float] | None
    rest: list[tuple[int, float]]
    step: Step
    nodes: tuple[Node]  # the Evaluate request's nodes
    t_next: float  # the time the step reaches (StepDone)
    #: the step's answer and its previous state both enter its new state (``Evaluate.carried``)
    carried: bool


def _loop_table(steps: list[Step], nodes: list[Node]) -> tuple[list[_LoopStep], bool]:
    """The fused loop's table and whether any step draws noise (or reuses the previous draw)."""
    n = len(nodes)
    table = []
    for i, st in enumerate(steps):
        weights = [(k, c) for k, c in enumerate(st.d) if c != 0.0]
        carried = st.a != 0.0 and bool(weights) and weights[0][0] == 0
        table.append(_LoopStep(st.a, weights[0] if weights else None, weights[1:], st, (nodes[i],),
                               nodes[i + 1].t if i + 1 < n else 0.0, carried))
    return table, any(st.noise != 0.0 or st.noise_prev != 0.0 for st in steps)


def _as_scaled(answer) -> tuple[torch.Tensor, float]:
    """An answer to ``Evaluate(..., scaled=True)``: a ``(u, s)`` pair, or a plain tensor (``s = 1``)."""
    return answer if type(answer) is tuple else (answer, 1.0)


def run_multistep(plan: MultistepPlan, x: torch.Tensor, noise: Callable[[int], torch.Tensor] | None) -> SolverRun:
    """Execute any :class:`MultistepPlan` (the generator shared by all multistep solvers)."""
    fused = plan._fused_run()
    if fused is not None:
        return (yield from _run_fused(plan, fused, x, noise))
    # history[k] * scales[k] is the k-th newest prediction: the scales are Python floats folded into
    # the step coefficients, so a driver may answer with unscaled tensors (see Evaluate.scaled)
    history: list[torch.Tensor] = []
    scales: list[float] = []
    keep = max(1, plan.history)
    n = len(plan.nodes)
    correctors = plan.correctors or [None] * n
    reevaluate = plan.reevaluate or [False] * n
    x_tilde = x  # state at which node i is evaluated
    x_prev = x
    z_prev = None
    for i in range(n):
        node = plan.nodes[i]
        if i == 0 and plan.free_first:
            d, s = x_tilde, 1.0 / plan.initial_scale
        else:
            (answer,) = yield Evaluate((x_tilde,), (node,), i, scaled=True)
            d, s = _as_scaled(answer)
        history.insert(0, d)
        scales.insert(0, s)
        del history[keep:], scales[keep:]
        corr = correctors[i]
        if corr is not None and i > 0:
            x = lincomb(corr.terms(x_prev, x_tilde, history, z_prev, scales))
            if reevaluate[i]:
                (answer,) = yield Evaluate((x,), (node,), i, scaled=True)
                history[0], scales[0] = _as_scaled(answer)
        else:
            x = x_tilde
        pred = plan.predictors[i]
        z = noise(i) if (pred.noise != 0.0 and noise is not None) else None
        x_tilde = lincomb(pred.terms(x, None, history, z, scales))
        x_prev, z_prev = x, z
        yield StepDone(i, plan.nodes[i + 1].t if i + 1 < n else 0.0, x_tilde)
    return x_tilde


def _make_state_weights(plan: MultistepPlan) -> None:
    """Each fused deterministic step's state weight ``a`` as a 0-dim CPU tensor, in float32 and
    float64 (the dtypes a Python float is used in: the same bits), made with the plan. ``out.mul_(a)``
    with a Python float wraps it in a new tensor on every call, about 1.5 us of a 20 us step; a 0-dim
    CPU tensor is passed to the kernel as a scalar on every device (no transfer, no sync)."""
    fused = plan._fused[0]
    if fused is None or fused[3]:
        return
    # normal tensors even when the plan is made under inference_mode: a later run may record autograd
    with torch.inference_mode(False):
        for dtype in (torch.float32, torch.float64):
            plan._state_weight_tensors[dtype] = [torch.tensor(st.a, dtype=dtype) for st in fused[2]]


def _run_fused(plan: MultistepPlan, fused: tuple, x: torch.Tensor,
               noise: Callable[[int], torch.Tensor] | None) -> SolverRun:
    """:func:`run_multistep` for a plan whose correctors are folded into the predictors
    (:meth:`MultistepPlan.fused`): one linear combination per step, from the predicted state."""
    _, keep, table, stochastic = fused
    history: list[torch.Tensor] = []
    scales: list[float] = []
    z = None
    state_weights = None if stochastic else plan._state_weight_tensors[
        torch.float64 if x.dtype == torch.float64 else torch.float32]
    events = True  # StepDone messages, until the driver answers one with QUIET
    for i, (a, first, rest, step, nodes, t_next, carried) in enumerate(table):
        if i == 0 and plan.free_first:
            d, s = x, 1.0 / plan.initial_scale
        else:
            (answer,) = yield Evaluate((x,), nodes, i, None, True, carried)
            d, s = answer if type(answer) is tuple else (answer, 1.0)  # _as_scaled, inline
        history.insert(0, d)
        scales.insert(0, s)
        if len(history) > keep:
            del history[keep:], scales[keep:]
        if stochastic:
            # the draws as the two-combination loop makes them; a folded corrector reuses z_{i-1}
            z_prev, z = z, (noise(i) if (step.noise != 0.0 and noise is not None) else None)
            x = lincomb(step.terms(x, None, history, z, scales, z_prev))
        elif first is None:
            x = x * a
        elif a == 0.0:
            x = lincomb([(c * scales[k], history[k]) for k, c in (first, *rest)])
        else:
            # lincomb's operations in lincomb's order (the same bits), without building term lists
            k, c = first
            out = torch.add(x, history[k], alpha=c * scales[k] / a)
            if a != 1.0:
                out.mul_(state_weights[i])
            for k, c in rest:
                out.add_(history[k], alpha=c * scales[k])
            x = out
        if events and (yield StepDone(i, t_next, x)) is QUIET:
            events = False
    return x


# ------------------------------------------------------------------------------------------ solvers
class Solver:
    """Base class. Subclasses set ``name``, ``orders``, ``options`` and implement ``prepare``/``run``.

    ``options`` maps each accepted keyword to its default; ``check_options`` validates values.
    Instances are immutable and hold no per-call state, so one solver is safe to share across threads.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    stochastic: ClassVar[bool] = False
    #: True for solvers that cannot run from defaults alone (a searched file, a model family)
    needs_inputs: ClassVar[bool] = False
    orders: ClassVar[tuple[int, ...]] = (1,)
    options: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(
                f"{self.name}: unknown option(s) {unknown}; valid options: {sorted(self.options) or 'none'}"
            )
        merged = {**self.options, **{k: v for k, v in options.items() if v is not None}}
        if "order" in self.options:
            order = merged["order"]
            if not isinstance(order, int) or isinstance(order, bool) or order not in self.orders:
                raise ValueError(f"order: {self.name} supports orders {list(self.orders)}, got {order!r}")
        self.opts = merged
        self.check_options()

    def check_options(self) -> None:
        """Validate ``self.opts`` (raise ValueError naming the option and the accepted values)."""

    # ---- budget --------------------------------------------------------------------------------
    @property
    def order(self) -> int:
        return int(self.opts.get("order", self.orders[0]))

    def evals_per_step(self) -> str:
        """For the solver table: network evaluations per step."""
        return "1"

    def min_nfe(self) -> int:
        return 1

    def num_points(self, nfe: int) -> int:
        """How many grid points a budget of ``nfe`` evaluations buys (never exceeding it)."""
        return nfe

    def nfe_for_points(self, num_points: int) -> int:
        return num_points

    # ---- numerics ------------------------------------------------------------------------------
    def prepare(self, schedule: Schedule, times: torch.Tensor) -> Any:
        raise NotImplementedError

    def run(self, plan: Any, x: torch.Tensor, noise: Callable[[int], torch.Tensor] | None) -> SolverRun:
        return run_multistep(plan, x, noise)

    def view(self, plan: Any) -> str:
        return plan.view

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.opts.items())
        return f"{type(self).__name__}({opts})"


REGISTRY: dict[str, type[Solver]] = {}
ALIASES: dict[str, str] = {}


def register(cls: type[Solver]) -> type[Solver]:
    """Class decorator: make a solver available under ``cls.name`` and its aliases."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a registered solver needs a name")
    REGISTRY[cls.name] = cls
    for a in cls.aliases:
        ALIASES[a] = cls.name
    return cls


def nodes_with_end(schedule: Schedule, times: torch.Tensor) -> list[Node]:
    """The grid's nodes followed by the zero-noise end point."""
    return schedule.nodes(times) + [ZERO_NOISE]


def expm1_neg(h: float) -> float:
    """``1 - exp(-h)``, exact at ``h = inf`` (the final step to zero noise)."""
    return 1.0 if h == math.inf else -math.expm1(-h)
