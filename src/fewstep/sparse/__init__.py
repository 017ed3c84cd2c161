"""Spatially sparse inference for edits: recompute only what the user changed.

After one dense run of a convolutional network on an original input (``full`` mode, which records a
cache), an edited input is run in ``sparse`` mode: every layer recomputes only the tiles touched by
the edit mask (with a margin) and reuses the cached activations elsewhere (SIGE, Li et al., NeurIPS
2022). The conversion is automatic, keyed on module type; see :mod:`fewstep.sparse.engine`.

Example::

    >>> import torch
    >>> from fewstep import sparse
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(2, 8),
    ...                           torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 3, padding=1))
    >>> engine = sparse.SparseEngine(net)
    >>> x = torch.randn(1, 3, 64, 64)
    >>> with torch.no_grad(), engine.full():
    ...     _ = net(x)
    >>> mask = torch.zeros(64, 64, dtype=torch.bool); mask[20:28, 30:40] = True
    >>> with torch.no_grad(), engine.sparse(mask):
    ...     y = net(x + 0.5 * mask)
    >>> y.shape, engine.report()["resolutions"][0]["tiles"]
    (torch.Size([1, 3, 64, 64]), 16)
"""
from .activation import SparseActivation, UnsupportedOperation
from .attention import AttentionSpec, register_attention
from .engine import MissingCacheError, SparseEngine, UnsupportedLayerError, group_norm_affine
from .geometry import Geometry, MaskPlan, as_mask, difference_mask, dilate, resize_mask

__all__ = [
    "SparseEngine",
    "SparseActivation",
    "UnsupportedLayerError",
    "UnsupportedOperation",
    "MissingCacheError",
    "MaskPlan",
    "Geometry",
    "AttentionSpec",
    "register_attention",
    "as_mask",
    "difference_mask",
    "dilate",
    "resize_mask",
    "group_norm_affine",
]
