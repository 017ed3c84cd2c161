"""The feature maps of a sparse pass: only the active tiles are stored.

A :class:`SparseActivation` stands for a ``(B, C, H, W)`` feature map of which only the pixels of
its :class:`~fewstep.sparse.geometry.Geometry` are held, as a ``(B, P, C)`` tensor (channels last:
gathers copy whole channel vectors, and the rows are the tokens an attention layer needs). Every
other pixel is *defined* to equal the same feature map in the full (cached) run; the engine only
ever reads such pixels from its caches, at the inputs of convolutions, attention and the network's
output.

The object takes part in ordinary PyTorch code through ``__torch_function__``: per-pixel
(elementwise) functions and operators run on the stored rows only, ``torch.cat`` over channels,
nearest-neighbour ``F.interpolate`` by an integer factor and inference-mode dropout are supported.
Anything else (``view``, indexing, a functional ``group_norm``...) raises
:class:`UnsupportedOperation` naming the operation and the module running it, so an unsupported
layer never computes something silently wrong.

Example::

    >>> import torch
    >>> from fewstep.sparse.geometry import Geometry
    >>> g = Geometry(8, 8, 4, torch.tensor([[0, 1]]))
    >>> a = SparseActivation(torch.ones(1, 16, 3), g)
    >>> b = torch.nn.functional.silu(a * 2.0 + torch.ones(1, 3, 1, 1))
    >>> b.shape, round(float(b.data[0, 0, 0]), 4)
    (torch.Size([1, 3, 8, 8]), 2.8577)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .geometry import Geometry

__all__ = ["SparseActivation", "UnsupportedOperation", "current_module"]


class UnsupportedOperation(TypeError):
    """A layer or operation that the sparse engine cannot run on a sparse feature map."""


#: Name of the module being executed (set by the engine's hooks; used in error messages).
_MODULE_STACK: list[str] = []


def current_module() -> str:
    return _MODULE_STACK[-1] if _MODULE_STACK else "<top level>"


def _fail(what: str):
    where = current_module()
    raise UnsupportedOperation(
        f"sparse inference: {what} is not supported on a sparse feature map (in module {where!r}). "
        f"Run that module densely with SparseEngine(..., dense=[{where!r}]) or register a handler."
    )


def _fname(func) -> str:
    mod = getattr(func, "__module__", None) or ""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    if mod.startswith("torch.nn.functional"):
        return f"torch.nn.functional.{name}"
    if "Tensor" in name or mod.startswith("torch._tensor") or mod == "torch._C":
        return f"torch.Tensor.{name.split('.')[-1]}" if "." in name or "Tensor" in name else name
    return f"torch.{name}" if mod.startswith("torch") else name


class SparseActivation:
    """A ``(B, C, H, W)`` feature map held as ``data`` ``(B, P, C)`` on the active pixels of ``geometry``."""

    __slots__ = ("data", "geometry")

    def __init__(self, data: torch.Tensor, geometry: Geometry):
        self.data = data
        self.geometry = geometry

    # ---- tensor-like metadata ----------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        b, _, c = self.data.shape
        return torch.Size((b, c, self.geometry.height, self.geometry.width))

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 4

    ndim = property(dim)

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def requires_grad(self) -> bool:
        return self.data.requires_grad

    @property
    def is_cuda(self) -> bool:
        return self.data.is_cuda

    def is_floating_point(self) -> bool:
        return self.data.is_floating_point()

    def contiguous(self, memory_format=None) -> "SparseActivation":
        return self

    def to(self, *args, **kwargs) -> "SparseActivation":
        return SparseActivation(self.data.to(*args, **kwargs), self.geometry)

    def float(self) -> "SparseActivation":
        return SparseActivation(self.data.float(), self.geometry)

    def __repr__(self) -> str:
        g = self.geometry
        return (f"SparseActivation(shape={tuple(self.shape)}, tiles={g.num_tiles} of {g.tile}x{g.tile}, "
                f"active={g.fraction:.1%}, dtype={self.dtype})")

    def __getattr__(self, name):
        # Every other Tensor method would need the dense map: name it instead of an AttributeError.
        if hasattr(torch.Tensor, name):
            _fail(f"torch.Tensor.{name}")
        raise AttributeError(f"'SparseActivation' object has no attribute {name!r}")

    def __bool__(self):
        _fail("bool()")

    def __getitem__(self, item):
        _fail("indexing")

    # ---- operators ---------------------------------------------------------------------------
    def _op(func):  # noqa: N805 - a decorator factory used in the class body
        def method(self, *args):
            return _elementwise(func, (self, *args), {})

        method.__name__ = func.__name__
        return method

    __add__ = _op(torch.Tensor.__add__)
    __radd__ = _op(torch.Tensor.__radd__)
    __sub__ = _op(torch.Tensor.__sub__)
    __rsub__ = _op(torch.Tensor.__rsub__)
    __mul__ = _op(torch.Tensor.__mul__)
    __rmul__ = _op(torch.Tensor.__rmul__)
    __truediv__ = _op(torch.Tensor.__truediv__)
    __rtruediv__ = _op(torch.Tensor.__rtruediv__)
    __neg__ = _op(torch.Tensor.__neg__)
    __pow__ = _op(torch.Tensor.__pow__)
    add = _op(torch.Tensor.add)
    sub = _op(torch.Tensor.sub)
    mul = _op(torch.Tensor.mul)
    div = _op(torch.Tensor.div)
    sigmoid = _op(torch.Tensor.sigmoid)
    tanh = _op(torch.Tensor.tanh)
    relu = _op(torch.Tensor.relu)
    del _op

    # ---- functions ---------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        special = _SPECIAL.get(func)
        if special is not None:
            return special(*args, **kwargs)
        if func in _ELEMENTWISE:
            return _elementwise(func, args, kwargs)
        _fail(_fname(func))


# ------------------------------------------------------------------------------------ helpers
def _geometry_of(args) -> Geometry:
    """The common geometry of the sparse operands (their intersection when they differ)."""
    g = None
    for a in args:
        if isinstance(a, SparseActivation):
            g = a.geometry if g is None else g.intersect(a.geometry)
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, SparseActivation):
                    g = b.geometry if g is None else g.intersect(b.geometry)
    return g


def rows_on(a, g: Geometry):
    """Operand ``a`` in the ``(B, P, C)`` row layout of geometry ``g``.

    Sparse operands are restricted to ``g``; a dense ``(b, c, H, W)`` tensor is gathered at ``g``'s
    pixels; a ``(b, c, 1, 1)`` tensor (a per-channel bias such as a time embedding) becomes
    ``(b, 1, c)``; scalars pass through.
    """
    if isinstance(a, SparseActivation):
        if a.geometry is g:
            return a.data
        return a.data.index_select(1, a.geometry.rows_of(g))
    if isinstance(a, torch.Tensor):
        if a.dim() == 0 or a.numel() == 1 and a.dim() < 4:
            return a
        if a.dim() == 4:
            b, c, h, w = a.shape
            if (h, w) == (1, 1):
                return a.reshape(b, 1, c)
            if (h, w) == (g.height, g.width):
                return a.flatten(2).index_select(2, g.positions.to(a.device)).transpose(1, 2)
        _fail(f"combining a sparse feature map with a tensor of shape {tuple(a.shape)}")
    return a


_BY_ONE = {torch.Tensor.__truediv__, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.div,
           torch.Tensor.mul, torch.div, torch.mul, torch.true_divide}


def _elementwise(func, args, kwargs):
    if func in _BY_ONE and not kwargs and len(args) == 2 and isinstance(args[0], SparseActivation) and (
            type(args[1]) in (int, float) and args[1] == 1):
        return args[0]  # `h / output_scale_factor` with a factor of 1: skip a pass over the data
    g = _geometry_of(args)
    conv = [rows_on(a, g) for a in args]
    kw = {k: rows_on(v, g) for k, v in kwargs.items()}
    return SparseActivation(func(*conv, **kw), g)


def _cat(tensors, dim=0, *, out=None):
    if out is not None:
        _fail("torch.cat(out=...)")
    ref = next(t for t in tensors if isinstance(t, SparseActivation))
    if dim not in (1, -3):
        _fail(f"torch.cat along dim {dim} (only channels, dim=1)")
    g = _geometry_of(tensors)
    return SparseActivation(torch.cat([rows_on(t, g) for t in tensors], dim=2), g)


def _interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                 recompute_scale_factor=None, antialias=False):
    if not isinstance(input, SparseActivation):
        _fail("interpolate of a dense tensor with sparse arguments")
    g = input.geometry
    if mode != "nearest":
        _fail(f"torch.nn.functional.interpolate(mode={mode!r}) (only 'nearest' with an integer factor)")
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        fh, fw = size[0] / g.height, size[1] / g.width
    else:
        sf = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor, scale_factor)
        fh, fw = float(sf[0]), float(sf[1])
    if fh != fw or fh != int(fh) or fh < 1:
        _fail(f"torch.nn.functional.interpolate by factors ({fh:g}, {fw:g}) (only equal integer factors)")
    return SparseActivation(upsample_rows(input.data, g.tile, int(fh)), g.upsampled(int(fh)))


def upsample_rows(data: torch.Tensor, tile: int, factor: int) -> torch.Tensor:
    """Nearest-neighbour enlargement of tile rows, in the order of :meth:`Geometry.upsampled`."""
    b, p, c = data.shape
    n, t, f = p // (tile * tile), tile, factor
    x = data.view(b, n, t, 1, t, 1, c).expand(b, n, t, f, t, f, c)  # each pixel -> f x f
    # (b, n, Y=(t f), X=(t f), c) -> tiles of side t: Y = (sy, ty) with sy the sub-tile row
    x = x.reshape(b, n, f, t, f, t, c).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, n * f * f * t * t, c)


def _dropout(input, p=0.5, training=True, inplace=False):
    if training and p > 0:
        _fail("dropout in training mode")
    return input


def _identity(input, *args, **kwargs):
    return input


_SPECIAL = {
    torch.cat: _cat,
    torch.concat: _cat,
    torch.concatenate: _cat,
    F.interpolate: _interpolate,
    F.dropout: _dropout,
    F.dropout2d: _dropout,
    torch.Tensor.contiguous: _identity,
}

_ELEMENTWISE = {
    F.silu, F.relu, F.gelu, F.leaky_relu, F.mish, F.hardswish, F.elu, F.softplus, F.relu6,
    torch.sigmoid, torch.tanh, torch.relu, torch.neg, torch.exp, torch.square, torch.abs,
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.clamp, torch.where,
    torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__iadd__, torch.Tensor.__sub__,
    torch.Tensor.__rsub__, torch.Tensor.__isub__, torch.Tensor.__mul__, torch.Tensor.__rmul__,
    torch.Tensor.__imul__, torch.Tensor.__truediv__, torch.Tensor.__rtruediv__, torch.Tensor.__itruediv__,
    torch.Tensor.__neg__, torch.Tensor.__pow__, torch.Tensor.add, torch.Tensor.sub, torch.Tensor.mul,
    torch.Tensor.div, torch.Tensor.sigmoid, torch.Tensor.tanh, torch.Tensor.relu, torch.Tensor.clamp,
}
