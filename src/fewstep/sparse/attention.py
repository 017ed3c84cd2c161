"""Self-attention layers as the sparse engine sees them: projections, heads, scale, residual.

Each supported attention module type is reduced to an :class:`AttentionSpec` (the weights of the
query/key/value/output projections as matrices, the optional GroupNorm in front, heads, scale and the
residual), and one function, :func:`attend`, computes the layer for a subset of query tokens:

* queries: only the *active* tokens (those of the input's active tiles);
* keys and values: the full run's cached keys and values for every inactive token, recomputed ones
  for the active tokens (their inputs changed);
* GroupNorm in front of the projections: the full run's cached per-channel scale and shift.

So an active token's output is exactly the output a dense layer would give it on an input equal to
the edited features on active tokens and the original features elsewhere; an inactive token keeps
its cached output (it is not recomputed even though the keys it attends to changed: the same
approximation SIGE makes for Stable Diffusion's self-attention, Li et al. 2022, T-PAMI version).

Supported types: diffusers' ``Attention`` (self-attention on 4-D inputs, processors
``AttnProcessor2_0`` and ``AttnProcessor``, no spatial norm, no q/k norms) and fewstep's own
``fewstep.zoo.unet.SelfAttention``. :func:`register_attention` adds more.

Example::

    >>> import torch
    >>> from fewstep.zoo.unet import SelfAttention
    >>> layer = SelfAttention(8, groups=4)
    >>> spec = attention_spec(layer)
    >>> spec.heads, spec.inner, round(spec.scale, 4)
    (1, 8, 0.3536)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionSpec", "attention_spec", "register_attention", "attend", "attention_macs"]


@dataclass
class AttentionSpec:
    """Everything :func:`attend` needs from one self-attention layer (matrices are ``(out, in)``)."""

    norm: nn.GroupNorm | None
    wq: torch.Tensor
    bq: torch.Tensor | None
    wk: torch.Tensor
    bk: torch.Tensor | None
    wv: torch.Tensor
    bv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    heads: int
    scale: float
    residual: bool = True
    rescale: float = 1.0

    @property
    def inner(self) -> int:
        return int(self.wq.shape[0])


_EXTRACTORS: list[tuple[type, Callable[[nn.Module], AttentionSpec]]] = []


def register_attention(module_type: type, extractor: Callable[[nn.Module], AttentionSpec]) -> None:
    """Teach the engine a new self-attention module type.

    ``extractor(module)`` returns an :class:`AttentionSpec` or raises ``UnsupportedLayerConfig``
    (a ``ValueError``) saying why this instance cannot run sparsely.
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"module_type: expected an nn.Module subclass, got {module_type!r}")
    _EXTRACTORS.insert(0, (module_type, extractor))


class UnsupportedLayerConfig(ValueError):
    """An attention module of a known type whose settings the sparse engine does not cover."""


def is_attention(module: nn.Module) -> bool:
    _ensure_builtin()
    return any(isinstance(module, t) for t, _ in _EXTRACTORS)


def attention_spec(module: nn.Module) -> AttentionSpec:
    """The :class:`AttentionSpec` of a supported attention module (``UnsupportedLayerConfig`` if not)."""
    _ensure_builtin()
    for t, extract in _EXTRACTORS:
        if isinstance(module, t):
            return extract(module)
    raise UnsupportedLayerConfig(f"{type(module).__name__} is not a registered attention type")


# ------------------------------------------------------------------------------------ the maths
def attend(spec: AttentionSpec, tokens: torch.Tensor, positions: torch.Tensor | None,
           norm_affine: tuple[torch.Tensor, torch.Tensor] | None,
           cached_kv: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Outputs of the layer for the query ``tokens`` ``(B, P, C)``.

    Args:
        positions: the flat pixel index of each query token, or ``None`` when ``tokens`` are all
            of them in order (dense).
        norm_affine: cached ``(scale, shift)``, each ``(B, C)``, standing for the layer's GroupNorm.
        cached_kv: the full run's keys and values ``(B, L, inner)``; required unless dense.
    """
    h = tokens
    if spec.norm is not None:
        scale, shift = norm_affine
        h = torch.addcmul(shift[:, None, :], tokens, scale[:, None, :])
    q = F.linear(h, spec.wq, spec.bq)
    k = F.linear(h, spec.wk, spec.bk)
    v = F.linear(h, spec.wv, spec.bv)
    if positions is not None:
        # keys/values of unchanged tokens from the cache, of the edited tokens recomputed
        k = cached_kv[0].clone().index_copy_(1, positions, k)
        v = cached_kv[1].clone().index_copy_(1, positions, v)
    b, p, inner = q.shape
    d = inner // spec.heads
    qh = q.view(b, p, spec.heads, d).transpose(1, 2)
    kh = k.view(b, -1, spec.heads, d).transpose(1, 2)
    vh = v.view(b, -1, spec.heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh, vh, scale=spec.scale)
    out = F.linear(out.transpose(1, 2).reshape(b, p, inner), spec.wo, spec.bo)
    if spec.residual:
        out = out + tokens
    if spec.rescale != 1.0:
        out = out / spec.rescale
    return out


def keys_values(spec: AttentionSpec, tokens: torch.Tensor, norm_affine) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of all ``tokens`` (recorded by the full pass)."""
    h = tokens
    if spec.norm is not None:
        scale, shift = norm_affine
        h = torch.addcmul(shift[:, None, :], tokens, scale[:, None, :])
    return F.linear(h, spec.wk, spec.bk), F.linear(h, spec.wv, spec.bv)


def attention_macs(spec: AttentionSpec, queries: int, keys: int, recomputed: int) -> int:
    """Multiply-adds of one sample: q for the queries, k/v for the recomputed tokens, output projection."""
    c_in, inner, c_out = spec.wq.shape[1], spec.inner, spec.wo.shape[0]
    return queries * c_in * inner + 2 * recomputed * c_in * inner + 2 * queries * keys * inner + queries * inner * c_out


# --------------------------------------------------------------------------- built-in extractors
def _diffusers_attention(attn) -> AttentionSpec:
    proc = type(getattr(attn, "processor", None)).__name__
    if proc not in ("AttnProcessor2_0", "AttnProcessor"):
        raise UnsupportedLayerConfig(f"attention processor {proc} (supported: AttnProcessor2_0, AttnProcessor)")
    for bad in ("spatial_norm", "norm_q", "norm_k", "norm_cross", "add_q_proj"):
        if getattr(attn, bad, None) not in (None, False):
            raise UnsupportedLayerConfig(f"attention with {bad}")
    if getattr(attn, "is_cross_attention", False) or getattr(attn, "only_cross_attention", False):
        raise UnsupportedLayerConfig("cross-attention (only self-attention on the feature map is supported)")
    if not isinstance(attn.to_out[0], nn.Linear):
        raise UnsupportedLayerConfig(f"output projection of type {type(attn.to_out[0]).__name__}")
    inner = attn.to_q.out_features
    head_dim = inner // attn.heads
    # AttnProcessor2_0 calls scaled_dot_product_attention with its default scale 1/sqrt(head_dim);
    # AttnProcessor uses attn.scale (the same unless scale_qk=False).
    scale = attn.scale if proc == "AttnProcessor" else 1.0 / math.sqrt(head_dim)

    def lin(m):
        return m.weight, m.bias

    wq, bq = lin(attn.to_q)
    wk, bk = lin(attn.to_k)
    wv, bv = lin(attn.to_v)
    wo, bo = lin(attn.to_out[0])
    return AttentionSpec(attn.group_norm, wq, bq, wk, bk, wv, bv, wo, bo, attn.heads, scale,
                         bool(attn.residual_connection), float(attn.rescale_output_factor))


def _fewstep_attention(layer) -> AttentionSpec:
    c = layer.qkv.in_channels
    if layer.qkv.kernel_size != (1, 1) or layer.proj.kernel_size != (1, 1):
        raise UnsupportedLayerConfig("SelfAttention with non-1x1 projections")
    w = layer.qkv.weight.view(3 * c, c)
    b = layer.qkv.bias
    bq, bk, bv = (None, None, None) if b is None else b.view(3, c).unbind(0)
    # channel order of `qkv(...).reshape(b, 3, c, h*w)`: queries, keys, values
    wq, wk, wv = w.view(3, c, c).unbind(0)
    return AttentionSpec(layer.norm, wq, bq, wk, bk, wv, bv, layer.proj.weight.view(c, c), layer.proj.bias,
                         heads=1, scale=1.0 / math.sqrt(c), residual=True, rescale=1.0)


_BUILTIN_DONE = False


def _ensure_builtin() -> None:
    global _BUILTIN_DONE
    if _BUILTIN_DONE:
        return
    _BUILTIN_DONE = True
    try:
        from ..zoo.unet import SelfAttention
    except ImportError:  # pragma: no cover - the zoo ships with fewstep
        SelfAttention = None
    if SelfAttention is not None:
        _EXTRACTORS.append((SelfAttention, _fewstep_attention))
    try:
        from diffusers.models.attention_processor import Attention
    except Exception:  # diffusers is optional (and may fail to import on odd installs)
        Attention = None
    if Attention is not None:
        _EXTRACTORS.append((Attention, _diffusers_attention))
