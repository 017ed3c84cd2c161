"""The model wrapper: one user network, seen through every view a solver needs.

A network predicts one of four quantities for ``x = alpha * x0 + sigma * eps``:

* ``"eps"``  – the noise;
* ``"x0"``   – the clean data ("sample" in diffusers);
* ``"v"``    – ``alpha * eps - sigma * x0`` (Salimans & Ho; "v_prediction" in diffusers);
* ``"flow"`` – the velocity ``dx/dt = alpha'(t) x0 + sigma'(t) eps`` in schedule time (rectified flow:
  ``eps - x0``).

Each view (``x0``, ``eps``, ``velocity``) is an exact linear combination of ``x`` and the network
output, so converting never loses more than rounding. Solvers only ever ask for a view.

Example::

    >>> import torch, fewstep
    >>> sch = fewstep.schedules.EDM()
    >>> model = fewstep.Model(lambda x, sigma: torch.zeros_like(x), schedule=sch, prediction="x0")
    >>> x = torch.ones(2, 3)
    >>> model.eps(x, 2.0)                 # (x - x0) / sigma
    tensor([[0.5000, 0.5000, 0.5000],
            [0.5000, 0.5000, 0.5000]])
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from .schedules import Node, Schedule

__all__ = ["Model", "Guided", "PREDICTIONS", "VIEWS", "NetworkOutputError"]

PREDICTIONS = ("eps", "x0", "v", "flow")
VIEWS = ("x0", "eps", "velocity")

_PREDICTION_ALIASES = {
    "epsilon": "eps",
    "sample": "x0",
    "v_prediction": "v",
    "velocity": "flow",
    "flow_prediction": "flow",
}


class NetworkOutputError(ValueError):
    """The network returned something a solver cannot use (wrong shape, dtype, device, NaN/Inf)."""


def view_coefficients(prediction: str, view: str, node: Node) -> tuple[float, float]:
    """``(cx, co)`` such that ``view = cx * x + co * output`` for a network of ``prediction`` type."""
    a, s, da, ds = node.alpha, node.sigma, node.dalpha, node.dsigma
    try:
        return _view_coefficients(prediction, view, a, s, da, ds)
    except ZeroDivisionError:
        raise ValueError(
            f"prediction: a {prediction!r} network cannot give the {view!r} view at t={node.t:g} "
            f"(alpha={a:g}, sigma={s:g}); start below that time (e.g. t_max < 1 for a flow schedule) "
            f"or use a model of another prediction type"
        ) from None


def combine_view(x: torch.Tensor, out: torch.Tensor, cx: float, co: float, scaled: bool = False):
    """``cx * x + co * out`` (the view), or with ``scaled`` the pair ``(u, s)`` with ``view = s * u``.

    Every driver (``fewstep.sample``, the diffusers adapter, the k-diffusion functions) forms views
    with this one function, so they give the same bits.
    """
    if cx == 0.0:
        if scaled:
            return out, co
        return out if co == 1.0 else out.mul(co)
    if co == 0.0:
        return (x, cx) if scaled else x.mul(cx)
    # cx*x + co*out = cx * (x + (co/cx)*out): one fused add; the scale cx is either returned for the
    # solver to fold into its weights (one tensor operation saved) or applied in place
    u = torch.add(x, out, alpha=co / cx)
    if scaled:
        return u, cx
    return u if cx == 1.0 else u.mul_(cx)


def _view_coefficients(prediction, view, a, s, da, ds):
    if prediction == "eps":
        x0, eps = (1.0 / a, -s / a), (0.0, 1.0)
    elif prediction == "x0":
        x0, eps = (0.0, 1.0), (1.0 / s, -a / s)
    elif prediction == "v":
        n = a * a + s * s
        x0, eps = (a / n, -s / n), (s / n, a / n)
    else:  # flow
        det = a * ds - s * da
        x0, eps = (ds / det, -s / det), (-da / det, a / det)
    if view == "x0":
        return x0
    if view == "eps":
        return eps
    return (da * x0[0] + ds * eps[0], da * x0[1] + ds * eps[1])


def _check_prediction(prediction: str) -> str:
    p = _PREDICTION_ALIASES.get(prediction, prediction)
    if p not in PREDICTIONS:
        raise ValueError(f"prediction: unknown type {prediction!r}; valid: {list(PREDICTIONS)}")
    return p


def _net_dtype(net) -> torch.dtype | None:
    if isinstance(net, torch.nn.Module):
        for p in net.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


class Model:
    """Wrap ``net(x, model_time, **cond) -> tensor`` with its schedule and prediction type.

    Args:
        net: the network (any callable). ``model_time`` is a 1-D tensor, one entry per sample
            (reused from call to call at the same time: the network must not modify it in place).
        schedule: a :class:`fewstep.schedules.Schedule`.
        prediction: ``"eps"``, ``"x0"``, ``"v"`` or ``"flow"`` (diffusers' names also accepted).
        dtype: dtype the network is called in (default: its parameters' dtype, else the state's).
            The sampler state stays in its own dtype; inputs and outputs are cast at the call.
        cond: keyword arguments passed to every call (class labels, text embeddings...).
        sample_shape: the shape of one sample, when known (bundled models set it).

    Attributes ``nfe`` (network evaluations, each batched node counted) and ``calls`` (network
    calls) count work since construction or :meth:`reset_counters`.
    """

    def __init__(
        self,
        net: Callable[..., torch.Tensor],
        schedule: Schedule,
        prediction: str = "eps",
        *,
        dtype: torch.dtype | None = None,
        cond: Mapping[str, Any] | None = None,
        sample_shape: Sequence[int] | None = None,
        name: str | None = None,
    ):
        if not callable(net):
            raise TypeError(f"net: expected a callable net(x, model_time, **cond), got {type(net).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule: expected a fewstep.schedules.Schedule, got {type(schedule).__name__}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        self.net = net
        self.schedule = schedule
        self.prediction = _check_prediction(prediction)
        self.dtype = dtype if dtype is not None else _net_dtype(net)
        self.cond = dict(cond or {})
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None
        self.name = name or getattr(net, "__name__", type(net).__name__)
        self.nfe = 0
        self.calls = 0
        self._times: dict = {}
        self._coefficients: dict = {}  # (node, view, prediction) -> (cx, co): nodes recur call after call
        self._steps: dict = {}  # (node, view, prediction, batch, dtype, device) -> (time tensor, cx, co)

    # ------------------------------------------------------------------ construction helpers
    def with_cond(self, **cond) -> "Model":
        """A copy whose calls add these keyword arguments (e.g. ``label=torch.tensor([3])``)."""
        m = self._copy()
        m.cond = {**self.cond, **cond}
        return m

    def guided(self, scale: float, uncond: Mapping[str, Any], **cond) -> "Guided":
        """Classifier-free guidance: ``uncond + scale * (cond - uncond)`` in one batched call."""
        return Guided(self, scale, uncond=uncond, cond={**self.cond, **cond})

    def _copy(self) -> "Model":
        m = object.__new__(type(self))
        m.__dict__.update(self.__dict__)
        m.nfe = 0
        m.calls = 0
        return m

    def reset_counters(self) -> None:
        self.nfe = 0
        self.calls = 0

    # ------------------------------------------------------------------ the one network call
    def _time_tensor(self, values: Sequence[float], counts: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        if len(values) == 1:
            # the same few times recur call after call (every sample of a solver on its grid): reuse
            # the tensor rather than filling a new one per step (on a GPU, one launch per step less)
            key = (values[0], counts[0], dtype, like.device)
            cached = self._times.get(key)
            if cached is None:
                if len(self._times) >= 512:
                    self._times.clear()
                cached = self._times[key] = torch.full((counts[0],), values[0], dtype=dtype, device=like.device)
            return cached
        return torch.tensor([v for v, c in zip(values, counts) for _ in range(c)], dtype=dtype, device=like.device)

    def raw(self, x: torch.Tensor, model_time: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        """Call the network once (subclasses such as :class:`Guided` change only this)."""
        return self.net(x, model_time, **cond)

    def evaluate(
        self,
        xs: Sequence[torch.Tensor],
        nodes: Sequence[Node],
        view: str,
        cond: Mapping[str, Any] | None = None,
        scaled: bool = False,
    ) -> list:
        """Evaluate the network at several (state, node) pairs in ONE call and return ``view`` for each.

        With ``scaled=True`` each entry is a pair ``(u, s)`` with ``view = s * u`` (a Python float
        ``s``): one tensor operation fewer per entry, for solvers that fold ``s`` into their weights.
        """
        cond = self.cond if cond is None else {**self.cond, **cond}
        k = len(xs)
        if k == 1:  # one state, one time: the common case, kept short (it runs once per step)
            x, node = xs[0], nodes[0]
            # a plan's nodes recur call after call: one lookup finds the time tensor and the view's
            # coefficients (the prediction type is in the key: copies of a model share this dict)
            key = (node, view, self.prediction, x.shape[0], x.dtype, x.device)
            found = self._steps.get(key)
            if found is None:
                if len(self._steps) >= 4096:
                    self._steps.clear()
                found = self._steps[key] = (self._time_tensor((node.model_time,), (x.shape[0],), x),
                                            *self._view_coefficients_at(node, view))
            mt, cx, co = found
            x_in = x if (self.dtype is None or x.dtype == self.dtype) else x.to(self.dtype)
            out = self.raw(x_in, mt, cond)
            self.calls += 1
            self.nfe += 1
            if not (type(out) is torch.Tensor and out.shape == x_in.shape and out.device == x_in.device
                    and out.is_floating_point()):
                out = self._check_output(out, x_in)  # the checks, with their messages
            if out.dtype != x.dtype:
                out = out.to(x.dtype)
            return [combine_view(x, out, cx, co, scaled)]
        x = torch.cat(list(xs), dim=0)
        counts = [xi.shape[0] for xi in xs] if k > 1 else [x.shape[0]]
        mt = self._time_tensor([n.model_time for n in nodes], counts, x)
        if k > 1 and cond:
            cond = {key: _repeat_batch(v, k, counts[0]) for key, v in cond.items()}
        x_in = x if (self.dtype is None or x.dtype == self.dtype) else x.to(self.dtype)
        out = self.raw(x_in, mt, cond)
        self.calls += 1
        self.nfe += k
        out = self._check_output(out, x_in)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        to_view = self._to_scaled_view if scaled else self._to_view
        return [to_view(xi, oi, n, view) for xi, oi, n in zip(xs, out.split(counts, dim=0), nodes)]

    def _check_output(self, out, x_in: torch.Tensor) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            sample = getattr(out, "sample", None)  # diffusers' UNet2DOutput and friends
            if isinstance(sample, torch.Tensor):
                out = sample
            elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
                out = out[0]
            else:
                raise NetworkOutputError(f"network returned {type(out).__name__}, expected a torch.Tensor")
        if out.shape != x_in.shape:
            raise NetworkOutputError(
                f"network returned shape {tuple(out.shape)}, expected {tuple(x_in.shape)} (the shape of its input x)"
            )
        if out.device != x_in.device:
            raise NetworkOutputError(f"network returned a tensor on {out.device}, its input was on {x_in.device}")
        if not out.is_floating_point():
            raise NetworkOutputError(f"network returned dtype {out.dtype}, expected a floating dtype")
        return out

    def _view_coefficients_at(self, node: Node, view: str) -> tuple[float, float]:
        """:func:`view_coefficients`, remembered per (node, view): a plan's nodes recur every call."""
        key = (node, view, self.prediction)
        found = self._coefficients.get(key)
        if found is None:
            if len(self._coefficients) >= 4096:
                self._coefficients.clear()
            found = self._coefficients[key] = view_coefficients(self.prediction, view, node)
        return found

    def _to_scaled_view(self, x: torch.Tensor, out: torch.Tensor, node: Node, view: str) -> tuple[torch.Tensor, float]:
        cx, co = self._view_coefficients_at(node, view)
        return combine_view(x, out, cx, co, scaled=True)

    def _to_view(self, x: torch.Tensor, out: torch.Tensor, node: Node, view: str) -> torch.Tensor:
        cx, co = self._view_coefficients_at(node, view)
        return combine_view(x, out, cx, co)

    # ------------------------------------------------------------------ public views
    def _node(self, t) -> Node:
        return self.schedule.node(float(t))

    def x0(self, x: torch.Tensor, t) -> torch.Tensor:
        """Data prediction at schedule time ``t``."""
        return self.evaluate([x], [self._node(t)], "x0")[0]

    def eps(self, x: torch.Tensor, t) -> torch.Tensor:
        """Noise prediction at schedule time ``t``."""
        return self.evaluate([x], [self._node(t)], "eps")[0]

    def velocity(self, x: torch.Tensor, t) -> torch.Tensor:
        """Probability-flow ODE velocity ``dx/dt`` at schedule time ``t``."""
        return self.evaluate([x], [self._node(t)], "velocity")[0]

    def __repr__(self) -> str:
        return f"Model({self.name}, {self.schedule!r}, prediction={self.prediction!r})"


def _repeat_batch(v, k: int, batch: int):
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
        return torch.cat([v] * k, dim=0)
    return v


class Guided(Model):
    """Classifier-free guidance as a model: conditional and unconditional halves in one batched call.

    ``output = uncond + scale * (cond - uncond)`` on the raw network output (valid for every
    prediction type, since each view is linear in the output). One guided evaluation counts as one NFE.

    Example::

        guided = model.guided(2.0, uncond={"label": torch.full((n,), 10)}, label=labels)
    """

    def __init__(self, base: Model, scale: float, *, uncond: Mapping[str, Any], cond: Mapping[str, Any]):
        if not isinstance(base, Model):
            raise TypeError(f"base: expected a fewstep.Model, got {type(base).__name__}")
        scale = float(scale)
        if scale != scale:
            raise ValueError("scale: guidance scale must be a number, got NaN")
        super().__init__(base.net, base.schedule, base.prediction, dtype=base.dtype, cond=cond,
                         sample_shape=base.sample_shape, name=base.name)
        self.base = base
        self.scale = scale
        self.uncond = dict(uncond)
        missing = set(self.uncond) ^ set(self.cond)
        if missing:
            raise ValueError(f"uncond: must give the same keys as cond; differing keys: {sorted(missing)}")

    def raw(self, x, model_time, cond):
        b = x.shape[0]
        uncond = {key: _match_batch(self.uncond[key], cond[key]) for key in cond}
        both = {key: torch.cat([cond[key], uncond[key]], dim=0) if isinstance(cond[key], torch.Tensor) else cond[key]
                for key in cond}
        out = self.net(torch.cat([x, x], dim=0), torch.cat([model_time, model_time], dim=0), **both)
        out = self._check_output(out, torch.cat([x, x], dim=0))
        c, u = out[:b], out[b:]
        return torch.add(u, torch.sub(c, u), alpha=self.scale)

    def evaluate(self, xs, nodes, view, cond=None, scaled=False):
        if cond:
            raise ValueError("cond: a Guided model carries its conditioning; build it with model.guided(...)")
        return super().evaluate(xs, nodes, view, scaled=scaled)


def _match_batch(u, c):
    """Repeat an unconditional tensor (batch 1, or one copy per batched node) to the conditional batch."""
    if isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor) and u.dim() > 0 and c.dim() > 0:
        if u.shape[0] != c.shape[0] and c.shape[0] % u.shape[0] == 0:
            return u.repeat(c.shape[0] // u.shape[0], *([1] * (u.dim() - 1)))
    return u
