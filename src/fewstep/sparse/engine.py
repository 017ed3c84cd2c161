"""The sparse inference engine: convert a convolutional network in place, record, recompute edits.

Spatially sparse inference (SIGE: Li, Lin, Meng, Ermon, Han & Zhu, "Efficient Spatially Sparse
Inference for Conditional GANs and Diffusion Models", NeurIPS 2022 / T-PAMI) runs a network twice:

* ``full`` mode on the *original* input: a normal dense run that records, per layer call, what a
  later sparse run needs: the input of every convolution and pooling layer (to read the halo of
  the active tiles), GroupNorm's per-channel scale and shift, attention keys and values, and the
  network's output;
* ``sparse`` mode on the *edited* input with an edit mask: every convolution gathers the input
  windows of its active output tiles (halo included; pixels outside the active tiles come from the
  recorded input), convolves them as one batch of small images, and keeps only the new tiles;
  GroupNorm applies the recorded scale and shift; attention computes queries only for active
  tokens; the network's output is the recorded one with the active tiles replaced.

Conversion is automatic and keyed on module type: ``nn.Conv2d``, ``nn.AvgPool2d``/``nn.MaxPool2d``,
``nn.GroupNorm`` and the registered attention types get a sparse ``forward``; activations, dropout
and identity layers work unchanged (per-pixel); skip connections, additions, concatenations and
nearest-neighbour up-sampling written in the model's own ``forward`` run on the stored tiles
(:mod:`fewstep.sparse.activation`). A layer with no sparse implementation that receives a sparse
feature map either raises :class:`UnsupportedLayerError` naming it (``unsupported="error"``, the
default) or runs densely on its recorded input with the active tiles written in
(``unsupported="dense"``), and is listed in :meth:`SparseEngine.report`.

Exactness: in sparse mode the output equals that of a dense run on the edited input in which
(1) every GroupNorm uses the full run's statistics and (2) the input of every convolution,
pooling and attention layer, and the network's output, is replaced outside the active tiles of its
resolution by the full run's value (tested to 1e-4, ``tests/test_sparse.py``). When the active
tiles cover everything the edit can reach, (2) changes nothing.

Example::

    >>> import torch
    >>> from fewstep.sparse import SparseEngine
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(),
    ...                           torch.nn.Conv2d(8, 3, 3, padding=1))
    >>> engine = SparseEngine(net, tile=4, dilation=1)
    >>> x = torch.randn(1, 3, 32, 32); edited = x.clone(); edited[..., 8:12, 8:12] += 1
    >>> with torch.no_grad(), engine.full():
    ...     y = net(x)
    >>> with torch.no_grad(), engine.sparse(edited != x):
    ...     y_edit = net(edited)
    >>> bool((y_edit - net.__class__.forward(net, edited)).abs().max() < 1e-5)   # margin covers the reach
    True
    >>> engine.restore()
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import attention as _attention
from .activation import _MODULE_STACK, SparseActivation, UnsupportedOperation
from .geometry import Geometry, MaskPlan, WindowPlan, check_options, window_plan

__all__ = ["SparseEngine", "UnsupportedLayerError", "MissingCacheError", "MODES", "ELEMENTWISE_MODULES"]

MODES = ("off", "full", "sparse")

#: Leaf modules that act pixel by pixel (their forward calls functions SparseActivation supports).
ELEMENTWISE_MODULES = (
    nn.SiLU, nn.ReLU, nn.GELU, nn.LeakyReLU, nn.Mish, nn.Hardswish, nn.ELU, nn.Softplus, nn.ReLU6,
    nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Upsample,
)


class UnsupportedLayerError(UnsupportedOperation):
    """A layer with no sparse implementation received a sparse feature map (the message names it)."""


class MissingCacheError(RuntimeError):
    """Sparse mode was asked for a call that no full run recorded."""


@dataclasses.dataclass
class _Stats:
    macs: int = 0
    dense_macs: int = 0


class SparseEngine:
    """Convert ``net`` (an ``nn.Module`` or a :class:`fewstep.Model` wrapping one) in place.

    Args:
        net: the network. Its modules are patched (instance ``forward`` attributes and hooks);
            :meth:`restore` undoes it.
        tile: output tile side in pixels (the unit of sparsity; SIGE uses 4).
        dilation: margin in pixels added around the mask at every resolution (or ``{height: px}``).
        dense_fraction: a resolution with more than this share of active tiles runs densely.
        unsupported: ``"error"`` (default) raises :class:`UnsupportedLayerError` when a layer without
            a sparse implementation meets a sparse feature map; ``"dense"`` runs it densely on its
            recorded input and reports it.
        dense: module names or types always run densely in sparse mode (their inputs are recorded).

    Modes (attribute :attr:`mode` or the context managers :meth:`full` / :meth:`sparse`):
    ``"off"`` (the unmodified network), ``"full"`` (dense, records the cache of :attr:`cache_id`),
    ``"sparse"`` (recomputes the masked region using the cache of :attr:`cache_id`).
    """

    def __init__(self, net, *, tile: int = 4, dilation: int | Mapping[int, int] = 2, dense_fraction: float = 0.5,
                 unsupported: str = "error", dense: Iterable = ()):
        from ..model import Model

        module = net.net if isinstance(net, Model) else net
        if not isinstance(module, nn.Module):
            raise TypeError(f"net: expected an nn.Module or a fewstep.Model wrapping one, got {type(module).__name__}")
        if getattr(module, "_fewstep_sparse_engine", None) is not None:
            raise ValueError("net: already converted by a SparseEngine; call engine.restore() first")
        if unsupported not in ("error", "dense"):
            raise ValueError(f"unsupported: expected 'error' or 'dense', got {unsupported!r}")
        dense_fraction = check_options(tile, dilation, dense_fraction)
        self.net = module
        self.tile = tile
        self.dilation = dilation
        self.dense_fraction = float(dense_fraction)
        self.unsupported = unsupported
        self._dense_names, self._dense_types = self._split_dense(dense)
        unknown = self._dense_names - {n for n, _ in module.named_modules()}
        if unknown:
            raise ValueError(f"dense: no module named {sorted(unknown)} in the network")
        self._mode = "off"
        self.cache_id: Any = 0
        self._caches: dict[Any, dict] = {}
        self._plan: MaskPlan | None = None
        self._calls: dict[str, int] = {}
        self._window_plans: dict = {}
        self._sources: dict = {}  # (cache_id, layer call) -> (plan, [halo | zero | rows] buffer)
        self._weights_cl: dict[str, tuple] = {}
        self._passthrough = 0  # inside a handled composite (attention) running its own forward
        self._dense_depth = 0  # inside a module run densely in sparse mode
        self._opaque_stack: list[bool] = []
        self.record_trace = False
        self.trace: dict = {}
        self.stats = _Stats()
        self.fallbacks: dict[str, str] = {}
        self.kinds: dict[str, str] = {}
        self._handles: list = []
        self._patched: list[nn.Module] = []
        self._convert()

    # ------------------------------------------------------------------------------- conversion
    def _split_dense(self, dense):
        if isinstance(dense, (str, type)):
            dense = [dense]
        names, types = set(), []
        for d in dense:
            if isinstance(d, str):
                names.add(d)
            elif isinstance(d, type) and issubclass(d, nn.Module):
                types.append(d)
            else:
                raise TypeError(f"dense: expected module names or nn.Module types, got {d!r}")
        return names, tuple(types)

    def _convert(self) -> None:
        owned: set[str] = set()
        for name, module in self.net.named_modules():
            if any(name.startswith(o + ".") for o in owned):
                continue  # children of a handled attention layer run inside its handler
            kind = self._classify(name, module)
            self.kinds[name] = kind
            if kind in ("attention",):
                owned.add(name)
            if kind in ("conv", "pool", "norm", "attention"):
                self._patch(name, module, kind)
            elif kind == "opaque":
                self._handles.append(module.register_forward_pre_hook(
                    functools.partial(self._opaque_pre, name), with_kwargs=True))
                self._handles.append(module.register_forward_hook(
                    functools.partial(self._opaque_post, name), always_call=True))
            self._handles.append(module.register_forward_pre_hook(functools.partial(self._push, name)))
            self._handles.append(module.register_forward_hook(self._pop, always_call=True))
        self._handles.append(self.net.register_forward_pre_hook(self._root_pre, with_kwargs=True, prepend=True))
        self._handles.append(self.net.register_forward_hook(self._root_post, always_call=True))
        self.net._fewstep_sparse_engine = self

    def _classify(self, name: str, module: nn.Module) -> str:
        if name in self._dense_names or (self._dense_types and isinstance(module, self._dense_types)):
            return "opaque"
        if _attention.is_attention(module):
            try:
                _attention.attention_spec(module)
            except _attention.UnsupportedLayerConfig as e:
                self.fallbacks[name] = f"unsupported attention settings: {e}"
                return "opaque"
            return "attention"
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                self.fallbacks[name] = f"padding_mode={module.padding_mode!r}"
                return "opaque"
            return "conv"
        if isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
            if _pool_params(module) is None:
                self.fallbacks[name] = "pooling with padding, ceil_mode or count_include_pad=False"
                return "opaque"
            return "pool"
        if isinstance(module, nn.GroupNorm):
            return "norm"
        if isinstance(module, ELEMENTWISE_MODULES):
            return "elementwise"
        if next(module.children(), None) is None:
            return "opaque"  # an unknown leaf: fine on non-spatial tensors, checked when one is sparse
        return "container"

    def _patch(self, name: str, module: nn.Module, kind: str) -> None:
        handler = {"conv": self._conv, "pool": self._pool, "norm": self._norm, "attention": self._attn}[kind]
        original = type(module).forward.__get__(module)
        module.forward = functools.partial(handler, name, module, original)
        self._patched.append(module)

    def restore(self) -> None:
        """Undo the conversion: remove hooks and patched ``forward`` attributes, drop the caches."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m in self._patched:
            m.__dict__.pop("forward", None)
        self._patched.clear()
        if getattr(self.net, "_fewstep_sparse_engine", None) is self:
            del self.net._fewstep_sparse_engine
        self.clear_cache()

    def __enter__(self) -> "SparseEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    # ----------------------------------------------------------------------------------- modes
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode: expected one of {list(MODES)}, got {value!r}")
        if value == "sparse" and self._plan is None:
            raise ValueError("mode: sparse mode needs a mask; call set_mask(mask) first")
        self._mode = value

    def set_mask(self, mask) -> MaskPlan:
        """Set the edit mask (boolean ``(H, W)`` at the input resolution) for the following sparse calls."""
        plan = MaskPlan(mask, tile=self.tile, dilation=self.dilation, dense_fraction=self.dense_fraction)
        if self._plan is None or not torch.equal(plan.mask, self._plan.mask):
            self._plan = plan
            self._window_plans.clear()
            self._sources.clear()
        return self._plan

    @property
    def mask_plan(self) -> MaskPlan | None:
        return self._plan

    @contextlib.contextmanager
    def full(self, cache_id: Any = None):
        """Run the block in full mode, recording into ``cache_id`` (default: the current one)."""
        with self._in_mode("full", cache_id):
            yield self

    @contextlib.contextmanager
    def sparse(self, mask=None, cache_id: Any = None):
        """Run the block in sparse mode with ``mask`` (default: the last one set)."""
        if mask is not None:
            self.set_mask(mask)
        with self._in_mode("sparse", cache_id):
            yield self

    @contextlib.contextmanager
    def _in_mode(self, mode, cache_id):
        old_mode, old_id = self._mode, self.cache_id
        if cache_id is not None:
            self.cache_id = cache_id
        self.mode = mode
        try:
            yield
        finally:
            self._mode, self.cache_id = old_mode, old_id

    def clear_cache(self, cache_id: Any = None) -> None:
        """Forget the recorded cache of ``cache_id`` (all caches when ``None``)."""
        if cache_id is None:
            self._caches.clear()
            self._sources.clear()
        else:
            self._caches.pop(cache_id, None)
            for k in [k for k in self._sources if k[0] == cache_id]:
                del self._sources[k]

    def has_cache(self, cache_id: Any = None) -> bool:
        return bool(self._caches.get(self.cache_id if cache_id is None else cache_id))

    def cache_bytes(self) -> int:
        """Memory held by all recorded caches."""
        total = 0
        for cache in self._caches.values():
            for v in cache.values():
                for t in (v if isinstance(v, (tuple, list)) else (v,)):
                    if isinstance(t, torch.Tensor):
                        total += t.numel() * t.element_size()
        return total

    # ------------------------------------------------------------------------------ root hooks
    def _root_pre(self, module, args, kwargs):
        self._calls.clear()
        _MODULE_STACK.clear()
        self._passthrough = 0
        self._dense_depth = 0
        self._opaque_stack.clear()
        self.stats = _Stats()
        if self._mode == "off":
            return None
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: sparse inference needs a (B, C, H, W) input as first argument, got {got}")
        if self._mode == "full":
            self._caches[self.cache_id] = {"<input>": tuple(x.shape)}
            for k in [k for k in self._sources if k[0] == self.cache_id]:
                del self._sources[k]  # halo values read from the previous recording
            return None
        cache = self._caches.get(self.cache_id)
        if not cache:
            raise MissingCacheError(
                f"sparse mode: no recorded cache for cache_id={self.cache_id!r}; run the original input "
                f"in full mode first (with engine.full(cache_id=...): net(original, ...))")
        if tuple(x.shape) != cache["<input>"]:
            raise ValueError(f"x: shape {tuple(x.shape)} differs from the recorded original {cache['<input>']}; "
                             f"the edited input must match the original's batch and size")
        if tuple(self._plan.size) != tuple(x.shape[-2:]):
            raise ValueError(f"mask: shape {tuple(self._plan.size)} does not match the input's spatial size "
                             f"{tuple(x.shape[-2:])}")
        if self.record_trace:
            self.trace = {}
        return None

    def _root_post(self, module, args, output):
        _MODULE_STACK.clear()
        if self._mode == "off" or output is None:
            return None
        if self._mode == "full":
            cache = self._caches.get(self.cache_id)
            if cache is not None:
                cache["<output>"] = _map_tensors(output, lambda t: t.detach())
            return None
        cached = self._cache()["<output>"]
        return _densify_output(output, cached, self)

    # --------------------------------------------------------------------------- bookkeeping
    def _push(self, name, module, args):
        _MODULE_STACK.append(name)

    def _pop(self, module, args, output):
        if _MODULE_STACK:
            _MODULE_STACK.pop()

    def _key(self, name: str) -> tuple[str, int]:
        n = self._calls.get(name, 0)
        self._calls[name] = n + 1
        return (name, n)

    def _cache(self) -> dict:
        cache = self._caches.get(self.cache_id)
        if not cache:
            raise MissingCacheError(f"sparse mode: no recorded cache for cache_id={self.cache_id!r}")
        return cache

    def _fetch(self, key):
        try:
            return self._cache()[key]
        except KeyError:
            raise MissingCacheError(
                f"sparse mode: layer {key[0]!r} (call {key[1]}) was not called in the full run of "
                f"cache_id={self.cache_id!r}; the edited call must take the same path as the original") from None

    def _geometry(self, height: int, width: int) -> Geometry | None:
        if self._dense_depth:
            return None
        return self._plan.geometry(height, width)

    def _trace(self, key, x):
        if self.record_trace:
            self.trace[key] = x.geometry.pixel_mask() if isinstance(x, SparseActivation) else None

    # ------------------------------------------------------------------------------ handlers
    def _conv(self, name, module, original, x):
        if self._mode == "off" or self._passthrough or (isinstance(x, torch.Tensor) and x.dim() != 4):
            return original(x)
        key = self._key(name)
        if self._mode == "full":
            _check_dense_input(x, name)
            self._cache()[key] = _rows_of_dense(x)
            out = original(x)
            macs = _conv_macs(module, out.shape[0], out.shape[-2] * out.shape[-1])
            self.stats.macs += macs
            self.stats.dense_macs += macs
            return out
        self._trace(key, x)
        (ho, wo), kernel, stride, padding, dilation = _conv_params(module, x.shape[-2:])
        b = x.shape[0]
        self.stats.dense_macs += _conv_macs(module, b, ho * wo)
        g_out = self._geometry(ho, wo)
        if g_out is None:
            out = original(self._densify(x, key))
            self.stats.macs += _conv_macs(module, b, ho * wo)
            return out
        blocks = self._gather(key, x, g_out, kernel, stride, padding, dilation)
        weight = self._channels_last_weight(name, module)
        y = F.conv2d(blocks, weight, module.bias, stride, 0, dilation, module.groups)
        self.stats.macs += _conv_macs(module, b, g_out.num_pixels)
        return SparseActivation(_tiles_to_rows(y, b), g_out)

    def _pool(self, name, module, original, x):
        if self._mode == "off" or self._passthrough or (isinstance(x, torch.Tensor) and x.dim() != 4):
            return original(x)
        key = self._key(name)
        kernel, stride = _pool_params(module)
        if self._mode == "full":
            _check_dense_input(x, name)
            self._cache()[key] = _rows_of_dense(x)
            return original(x)
        self._trace(key, x)
        h, w = x.shape[-2:]
        ho, wo = (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1
        g_out = self._geometry(ho, wo)
        if g_out is None:
            return original(self._densify(x, key))
        blocks = self._gather(key, x, g_out, kernel, stride, (0, 0), (1, 1))
        y = original(blocks)
        return SparseActivation(_tiles_to_rows(y, x.shape[0]), g_out)

    def _norm(self, name, module, original, x):
        if self._mode == "off" or self._passthrough:
            return original(x)
        key = self._key(name)
        if self._mode == "full":
            _check_dense_input(x, name)
            self._cache()[key] = group_norm_affine(x, module)
            return original(x)
        scale, shift = self._fetch(key)
        if isinstance(x, SparseActivation):
            return SparseActivation(torch.addcmul(shift[:, None, :], x.data, scale[:, None, :]), x.geometry)
        view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.view(view), x, scale.view(view))

    def _attn(self, name, module, original, hidden_states, *args, **kwargs):
        if self._mode == "off" or self._passthrough:
            return original(hidden_states, *args, **kwargs)
        extra = [a for a in args if a is not None] + [k for k, v in kwargs.items()
                                                      if v is not None and k not in ("temb",)]
        if extra:
            raise UnsupportedLayerError(
                f"sparse inference: attention layer {name!r} was called with extra inputs "
                f"({', '.join(map(str, extra))}); only self-attention on the feature map is supported")
        key = self._key(name)
        spec = _attention.attention_spec(module)
        x = hidden_states
        if self._mode == "full":
            _check_dense_input(x, name)
            self._passthrough += 1
            try:
                out = original(x, *args, **kwargs)
            finally:
                self._passthrough -= 1
            tokens = _rows_of_dense(x)
            affine = group_norm_affine(x, spec.norm) if spec.norm is not None else None
            self._cache()[key] = (affine, _attention.keys_values(spec, tokens, affine))
            n = tokens.shape[1]
            macs = x.shape[0] * _attention.attention_macs(spec, n, n, n)
            self.stats.macs += macs
            self.stats.dense_macs += macs
            return out
        self._trace(key, x)
        affine, kv = self._fetch(key)
        b, c, h, w = x.shape
        self.stats.dense_macs += b * _attention.attention_macs(spec, h * w, h * w, h * w)
        if isinstance(x, SparseActivation) and not self._dense_depth:
            g = x.geometry
            out = _attention.attend(spec, x.data, g.positions.to(x.device), affine, kv)
            self.stats.macs += b * _attention.attention_macs(spec, g.num_pixels, h * w, g.num_pixels)
            return SparseActivation(out, g)
        dense = self._densify(x, None) if isinstance(x, SparseActivation) else x
        tokens = _rows_of_dense(dense)
        out = _attention.attend(spec, tokens, None, affine, None)
        self.stats.macs += b * _attention.attention_macs(spec, h * w, h * w, h * w)
        return out.transpose(1, 2).reshape(b, -1, h, w)

    # ------------------------------------------------------------------- opaque (dense) layers
    def _opaque_pre(self, name, module, args, kwargs):
        entered = self._opaque_enter(name, module, args, kwargs)
        self._opaque_stack.append(entered is not None)
        return entered

    def _opaque_enter(self, name, module, args, kwargs):
        if self._mode == "off" or self._passthrough:
            return None
        key = self._key(name)
        if self._mode == "full":
            if self.unsupported == "dense" or self._is_listed_dense(name, module):
                rec = {i: _rows_of_dense(t) for i, t in _tensor_items(args, kwargs) if t.dim() == 4}
                if rec:
                    self._cache()[key] = rec
            return None
        items = dict(_tensor_items(args, kwargs, sparse=True))
        has_sparse = any(isinstance(t, SparseActivation) for t in items.values())
        listed = self._is_listed_dense(name, module)
        if not has_sparse and not listed:
            return None
        if not listed and self.unsupported == "error":
            why = f" ({self.fallbacks[name]})" if name in self.fallbacks else ""
            raise UnsupportedLayerError(
                f"sparse inference: layer {name!r} ({type(module).__name__}) received a sparse feature map but "
                f"has no sparse implementation{why}. Pass unsupported='dense' to run such layers densely on "
                f"their recorded input, or dense=[{name!r}].")
        self.fallbacks.setdefault(name, "run densely" if listed else "no sparse implementation; run densely")
        record = self._caches[self.cache_id].get(key, {})
        missing = [i for i, t in items.items() if isinstance(t, SparseActivation) and i not in record]
        if missing:
            raise MissingCacheError(f"sparse mode: no recorded input {missing} for the dense layer {name!r}")
        if self.record_trace:
            for i, t in items.items():
                if i in record:
                    self.trace[key + (i,)] = t.geometry.pixel_mask() if isinstance(t, SparseActivation) else None
        self._dense_depth += 1

        def fix(i, t):
            return _densify_rows(t, record[i]) if isinstance(t, SparseActivation) else t

        return tuple(fix(i, a) for i, a in enumerate(args)), {k: fix(k, v) for k, v in kwargs.items()}

    def _opaque_post(self, name, module, args, output):
        if self._opaque_stack and self._opaque_stack.pop():
            self._dense_depth = max(0, self._dense_depth - 1)
        return None

    def _is_listed_dense(self, name, module) -> bool:
        return name in self._dense_names or bool(self._dense_types and isinstance(module, self._dense_types))

    # --------------------------------------------------------------------------------- kernels
    def _gather(self, key, x, g_out: Geometry, kernel, stride, padding, dilation):
        """Input windows of the active output tiles as a ``(B*N, C, bh, bw)`` batch (channels last).

        One ``index_select`` from a source ``[halo | zero | rows]`` (see :class:`WindowPlan`): the
        halo values are read from the recorded input once per cache and mask, so a call costs a copy
        of the rows and one gather, both proportional to the active area.
        """
        h, w = x.shape[-2:]
        b, c = x.shape[0], x.shape[1]
        g_in = x.geometry if isinstance(x, SparseActivation) else None
        pkey = (id(g_in), id(g_out), (h, w), kernel, stride, padding, dilation)
        entry = self._window_plans.get(pkey)
        if entry is None:
            plan = window_plan(g_in, g_out, (h, w), kernel, stride, padding, dilation)
            device = x.device
            plan = dataclasses.replace(plan, index=plan.index.to(device),
                                       halo=None if plan.halo is None else plan.halo.to(device))
            entry = (g_in, g_out, plan)  # holding the geometries keeps their ids unique
            self._window_plans[pkey] = entry
        plan = entry[2]
        if g_in is None:
            source = torch.cat([_rows_of_dense(x), x.new_zeros(b, 1, c)], dim=1)
        else:
            bkey = (self.cache_id, key)
            buf = self._sources.get(bkey)
            if buf is None or buf[0] is not plan or buf[1].shape[0] != b:
                dense = self._fetch(key)
                zero = plan.zero_row
                src = x.data.new_empty(b, zero + 1 + g_in.num_pixels, c)
                src[:, :zero] = dense.index_select(1, plan.halo)
                src[:, zero] = 0.0
                buf = (plan, src)
                self._sources[bkey] = buf
            source = buf[1]
            source[:, plan.zero_row + 1:] = x.data
        out = source.index_select(1, plan.index)
        return out.view(b * plan.n_tiles, plan.bh, plan.bw, c).permute(0, 3, 1, 2)

    def _densify(self, x, key):
        if not isinstance(x, SparseActivation):
            return x
        if key is None:
            raise UnsupportedLayerError("sparse inference: a dense computation needs the recorded input")
        return _densify_rows(x, self._fetch(key))

    def _channels_last_weight(self, name, module) -> torch.Tensor:
        w = module.weight
        entry = self._weights_cl.get(name)
        if entry is None or entry[0] is not w or entry[1] != w._version:
            entry = (w, w._version, w.detach().contiguous(memory_format=torch.channels_last))
            self._weights_cl[name] = entry
        return entry[2]

    # ---------------------------------------------------------------------------------- report
    def report(self) -> dict:
        """What the conversion did and what the last sparse call computed.

        Keys: ``converted`` (module counts per kind), ``fallbacks`` (``{name: reason}`` of layers run
        densely or without sparse support), ``resolutions`` (active tile share per resolution of the
        current mask), ``macs`` / ``dense_macs`` of the last call (convolutions and attention) and
        ``cache_bytes``.
        """
        counts: dict[str, int] = {}
        for k in self.kinds.values():
            counts[k] = counts.get(k, 0) + 1
        return {
            "converted": counts,
            "fallbacks": dict(self.fallbacks),
            "resolutions": self._plan.summary() if self._plan is not None else [],
            "macs": self.stats.macs,
            "dense_macs": self.stats.dense_macs,
            "cache_bytes": self.cache_bytes(),
        }

    def __repr__(self) -> str:
        counts = self.report()["converted"]
        return (f"SparseEngine({type(self.net).__name__}, mode={self._mode!r}, tile={self.tile}, "
                f"dilation={self.dilation!r}, dense_fraction={self.dense_fraction}, converted={counts})")


# ---------------------------------------------------------------------------------- helpers
def _check_dense_input(x, name):
    if isinstance(x, SparseActivation):
        raise ValueError(f"layer {name!r}: a sparse feature map in full mode (the engine's mode changed mid-call?)")


def _rows_of_dense(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W, C)`` contiguous rows (channels last)."""
    b, c = x.shape[:2]
    return x.detach().permute(0, 2, 3, 1).reshape(b, -1, c).contiguous()


def _tiles_to_rows(y: torch.Tensor, batch: int) -> torch.Tensor:
    """``(B*N, C, T, T)`` tile outputs -> ``(B, N*T*T, C)`` rows (no copy for channels-last outputs)."""
    c = y.shape[1]
    return y.permute(0, 2, 3, 1).reshape(batch, -1, c)


def _densify_rows(x: SparseActivation, dense_rows: torch.Tensor) -> torch.Tensor:
    """The full map of ``x``: the recorded ``(B, H*W, C)`` rows with the active rows written in, as NCHW."""
    g = x.geometry
    full = dense_rows.clone()
    full.index_copy_(1, g.positions.to(full.device), x.data.to(full.dtype))
    b, _, c = full.shape
    return full.view(b, g.height, g.width, c).permute(0, 3, 1, 2)


def group_norm_affine(x: torch.Tensor, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm of ``x`` folded into a per-sample, per-channel ``(scale, shift)``, each ``(B, C)``.

    ``norm(x) == x * scale + shift`` (statistics in float64); a sparse pass reuses them.
    """
    b, c = x.shape[:2]
    g = norm.num_groups
    xg = x.detach().reshape(b, g, -1).to(torch.float64)
    var, mean = torch.var_mean(xg, dim=2, unbiased=False)
    rstd = torch.rsqrt(var + norm.eps)  # (b, g)
    per = c // g
    rstd_c = rstd.repeat_interleave(per, dim=1)
    mean_c = mean.repeat_interleave(per, dim=1)
    weight = norm.weight.detach().to(torch.float64) if norm.weight is not None else torch.ones(c, dtype=torch.float64)
    bias = norm.bias.detach().to(torch.float64) if norm.bias is not None else torch.zeros(c, dtype=torch.float64)
    scale = weight[None, :] * rstd_c
    shift = bias[None, :] - mean_c * scale
    return scale.to(x.dtype).contiguous(), shift.to(x.dtype).contiguous()


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_params(conv: nn.Conv2d, size):
    h, w = int(size[0]), int(size[1])
    kernel, stride, dilation = _pair(conv.kernel_size), _pair(conv.stride), _pair(conv.dilation)
    if isinstance(conv.padding, str):
        # F.pad order (left, right, top, bottom); zero padding resolved by nn.Conv2d itself
        lr = conv._reversed_padding_repeated_twice
        pad_lo = (lr[2], lr[0])
        pad_total = (lr[2] + lr[3], lr[0] + lr[1])
    else:
        pad_lo = _pair(conv.padding)
        pad_total = (2 * pad_lo[0], 2 * pad_lo[1])
    ho = (h + pad_total[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w + pad_total[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return (ho, wo), kernel, stride, pad_lo, dilation


def _pool_params(pool):
    if _pair(pool.padding) != (0, 0) or pool.ceil_mode:
        return None
    if isinstance(pool, nn.MaxPool2d) and _pair(pool.dilation) != (1, 1):
        return None
    kernel = _pair(pool.kernel_size)
    stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    return kernel, stride


def _conv_macs(conv: nn.Conv2d, batch: int, outputs: int) -> int:
    k = _pair(conv.kernel_size)
    return batch * outputs * conv.out_channels * (conv.in_channels // conv.groups) * k[0] * k[1]


def _tensor_items(args, kwargs, sparse: bool = False):
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) or (sparse and isinstance(a, SparseActivation)):
            yield i, a
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) or (sparse and isinstance(v, SparseActivation)):
            yield k, v


def _map_tensors(obj, fn):
    """Apply ``fn`` to every tensor (or sparse activation) in a nested output structure."""
    if isinstance(obj, (torch.Tensor, SparseActivation)):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(**{f.name: _map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj)})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    if isinstance(obj, dict):
        return type(obj)((k, _map_tensors(v, fn)) for k, v in obj.items())
    return obj


def _densify_output(output, cached, engine: SparseEngine):
    """Write the sparse outputs into the recorded full-run outputs (same structure)."""
    if isinstance(output, SparseActivation):
        if not isinstance(cached, torch.Tensor) or tuple(cached.shape) != tuple(output.shape):
            raise MissingCacheError("sparse mode: the recorded output does not match the sparse output")
        if engine.record_trace:
            engine.trace["<output>"] = output.geometry.pixel_mask()
        g = output.geometry
        b, c = cached.shape[:2]
        full = cached.clone()
        full.view(b, c, -1).index_copy_(2, g.positions.to(full.device), output.data.transpose(1, 2).to(full.dtype))
        return full
    if isinstance(output, torch.Tensor):
        return output
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return type(output)(**{f.name: _densify_output(getattr(output, f.name), getattr(cached, f.name), engine)
                               for f in dataclasses.fields(output)})
    if isinstance(output, tuple) and hasattr(output, "_fields"):
        return type(output)(*(_densify_output(o, c, engine) for o, c in zip(output, cached)))
    if isinstance(output, (tuple, list)):
        return type(output)(_densify_output(o, c, engine) for o, c in zip(output, cached))
    if isinstance(output, dict):
        return type(output)((k, _densify_output(v, cached[k], engine)) for k, v in output.items())
    return output
