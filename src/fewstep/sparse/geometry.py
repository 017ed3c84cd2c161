"""Edit masks and where spatially sparse inference recomputes: active tiles per resolution.

An edit is described by one boolean mask at the network's input resolution. Every feature map of
a convolutional network lives at some resolution ``(H, W)``; there the mask is

1. resized: any-pixel pooling going down (a coarse pixel is active if any fine pixel under it is),
   nearest-neighbour going up;
2. dilated by ``dilation`` pixels of that resolution (square structuring element): a 3x3
   convolution spreads a change by one pixel, so the dilation buys margin against the growth of
   the receptive field (SIGE, Li et al. 2022, section 3.2 dilates the difference mask the same way);
3. cut into ``tile x tile`` output tiles; a tile is active when any of its pixels is.

The active tiles of one resolution form a :class:`Geometry`. If more than ``dense_fraction`` of
the tiles are active (or the resolution is not a multiple of the tile), the resolution is computed
densely: sparse gathers would cost more than they save.

Example::

    >>> import torch
    >>> from fewstep.sparse.geometry import MaskPlan
    >>> mask = torch.zeros(32, 32, dtype=torch.bool); mask[4:8, 4:8] = True
    >>> plan = MaskPlan(mask, tile=4, dilation=1, dense_fraction=0.5)
    >>> g = plan.geometry(32, 32)
    >>> g.num_tiles, round(g.fraction, 4)           # 4x4 edit + 1 px margin touches 3x3 tiles
    (9, 0.1406)
    >>> plan.geometry(4, 4) is None                   # one tile, all active: dense
    True
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F

__all__ = ["as_mask", "difference_mask", "dilate", "resize_mask", "Geometry", "MaskPlan", "WindowPlan", "window_plan"]


def as_mask(mask, name: str = "mask") -> torch.Tensor:
    """A boolean ``(H, W)`` CPU tensor from a tensor/array of shape ``(H, W)``, ``(C, H, W)`` or
    ``(B, C, H, W)``: the union over batch and channels (one edit region is shared by all samples).

    Numeric masks are active where nonzero.
    """
    if not isinstance(mask, torch.Tensor):
        try:
            mask = torch.as_tensor(mask)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name}: expected a tensor or array of shape (H, W), got {type(mask).__name__}") from e
    if mask.is_complex():
        raise TypeError(f"{name}: expected a real or boolean mask, got dtype {mask.dtype}")
    m = mask.detach().to("cpu")
    if m.dim() not in (2, 3, 4) or m.numel() == 0:
        raise ValueError(f"{name}: expected shape (H, W), (C, H, W) or (B, C, H, W), got {tuple(mask.shape)}")
    if m.is_floating_point() and not torch.isfinite(m).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    m = m if m.dtype == torch.bool else m != 0
    return m.reshape(-1, *m.shape[-2:]).any(dim=0) if m.dim() > 2 else m


def difference_mask(original: torch.Tensor, edited: torch.Tensor, threshold: float = 0.02) -> torch.Tensor:
    """Pixels where the edit changed the input: ``max over batch and channels |edited - original| > threshold``.

    ``original`` and ``edited`` are ``(B, C, H, W)`` or ``(C, H, W)`` tensors of the same shape
    (SIGE uses 0.01 to 0.02 for images in ``[-1, 1]``).
    """
    for name, v in (("original", original), ("edited", edited)):
        if not isinstance(v, torch.Tensor) or v.dim() not in (3, 4) or not v.is_floating_point():
            got = f"shape {tuple(v.shape)}, dtype {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{name}: expected a floating (B, C, H, W) or (C, H, W) tensor, got {got}")
    if original.shape != edited.shape:
        raise ValueError(f"edited: shape {tuple(edited.shape)} differs from original {tuple(original.shape)}")
    threshold = float(threshold)
    if not threshold >= 0.0:
        raise ValueError(f"threshold: expected a number >= 0, got {threshold!r}")
    diff = (edited.detach() - original.detach()).abs().to("cpu", torch.float32)
    if diff.dim() == 3:
        diff = diff[None]
    return diff.amax(dim=(0, 1)) > threshold


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Square dilation of a boolean ``(H, W)`` mask by ``radius`` pixels (max pooling, stride 1)."""
    if radius <= 0:
        return mask
    m = mask[None, None].to(torch.float32)
    return F.max_pool2d(m, 2 * radius + 1, stride=1, padding=radius)[0, 0] > 0


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a boolean mask: any-pixel pooling to a coarser size, nearest neighbour to a finer one."""
    h, w = mask.shape
    if (h, w) == (height, width):
        return mask
    m = mask[None, None].to(torch.float32)
    if height <= h and width <= w:
        out = F.adaptive_max_pool2d(m, (height, width))
    else:
        out = F.interpolate(m, size=(height, width), mode="nearest")
    return out[0, 0] > 0


@dataclass(eq=False)
class Geometry:
    """The active tiles of one resolution.

    Sparse activations store their active pixels as rows of a ``(B, P, C)`` tensor (channels last),
    ``P = num_tiles * tile * tile``, tile after tile and row-major inside a tile:
    :attr:`positions` holds each row's flat pixel index ``y * width + x``.
    """

    height: int
    width: int
    tile: int
    tiles: torch.Tensor  # (N, 2) int64 tile coordinates (ty, tx)
    _positions: torch.Tensor | None = field(default=None, repr=False)
    _lookup: torch.Tensor | None = field(default=None, repr=False)
    _derived: dict = field(default_factory=dict, repr=False)

    @property
    def num_tiles(self) -> int:
        return int(self.tiles.shape[0])

    @property
    def num_pixels(self) -> int:
        return self.num_tiles * self.tile * self.tile

    @property
    def fraction(self) -> float:
        """Active share of the resolution's tiles."""
        return self.num_tiles / ((self.height // self.tile) * (self.width // self.tile))

    @property
    def positions(self) -> torch.Tensor:
        if self._positions is None:
            t = self.tile
            dy = torch.arange(t).repeat_interleave(t)
            dx = torch.arange(t).repeat(t)
            ys = self.tiles[:, :1] * t + dy[None, :]
            xs = self.tiles[:, 1:] * t + dx[None, :]
            self._positions = (ys * self.width + xs).reshape(-1)
        return self._positions

    @property
    def lookup(self) -> torch.Tensor:
        """``(H*W,)`` row of each pixel in the sparse storage, -1 for inactive pixels."""
        if self._lookup is None:
            lut = torch.full((self.height * self.width,), -1, dtype=torch.long)
            lut[self.positions] = torch.arange(self.num_pixels)
            self._lookup = lut
        return self._lookup

    def pixel_mask(self) -> torch.Tensor:
        """The active pixels as a boolean ``(H, W)`` mask."""
        m = torch.zeros(self.height * self.width, dtype=torch.bool)
        m[self.positions] = True
        return m.view(self.height, self.width)

    def upsampled(self, factor: int) -> "Geometry":
        """The geometry of a nearest-neighbour ``factor``-times enlargement: each tile becomes
        ``factor x factor`` tiles, ordered (tile, sub-row, sub-column) as :func:`upsample_rows` makes them."""
        key = ("up", factor)
        if key not in self._derived:
            sub = torch.stack(torch.meshgrid(torch.arange(factor), torch.arange(factor), indexing="ij"), -1).view(-1, 2)
            tiles = (self.tiles[:, None, :] * factor + sub[None, :, :]).reshape(-1, 2)
            self._derived[key] = Geometry(self.height * factor, self.width * factor, self.tile, tiles)
        return self._derived[key]

    def intersect(self, other: "Geometry") -> "Geometry":
        """The tiles active in both (same resolution and tile); order follows ``self``."""
        if other is self:
            return self
        key = ("and", id(other))
        if key not in self._derived:
            cols = self.width // self.tile
            mine = self.tiles[:, 0] * cols + self.tiles[:, 1]
            theirs = other.tiles[:, 0] * cols + other.tiles[:, 1]
            keep = torch.isin(mine, theirs)
            self._derived[key] = (other, Geometry(self.height, self.width, self.tile, self.tiles[keep]))
        return self._derived[key][1]

    def rows_of(self, sub: "Geometry") -> torch.Tensor:
        """Rows of this geometry's storage that hold the pixels of ``sub`` (a subset), in ``sub``'s order."""
        key = ("rows", id(sub))
        if key not in self._derived:
            rows = self.lookup[sub.positions]
            if bool((rows < 0).any()):
                raise ValueError("geometry: the requested tiles are not a subset of the active tiles")
            self._derived[key] = (sub, rows)
        return self._derived[key][1]


def check_options(tile, dilation, dense_fraction) -> float:
    """Validate :class:`MaskPlan`'s options (ValueError naming the bad one); returns ``dense_fraction``."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile: expected an integer >= 1, got {tile!r}")
    if isinstance(dilation, Mapping):
        for k, v in dilation.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"dilation: expected integers >= 0 per height, got {k!r}: {v!r}")
    elif isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 0:
        raise ValueError(f"dilation: expected an integer >= 0 or a mapping {{height: pixels}}, got {dilation!r}")
    try:
        dense_fraction = float(dense_fraction)
    except (TypeError, ValueError):
        raise ValueError(f"dense_fraction: expected a number in [0, 1], got {dense_fraction!r}") from None
    if not 0.0 <= dense_fraction <= 1.0:
        raise ValueError(f"dense_fraction: expected a number in [0, 1], got {dense_fraction!r}")
    return dense_fraction


class MaskPlan:
    """One edit mask, turned into a :class:`Geometry` (or ``None``: dense) for every resolution asked.

    Args:
        mask: boolean ``(H, W)`` mask at the network input's resolution (see :func:`as_mask`).
        tile: side of an output tile in pixels (SIGE uses 4 for 3x3 convolutions).
        dilation: pixels of margin at every resolution, or a mapping ``{height: pixels}``
            (resolutions not in the mapping get 0).
        dense_fraction: compute a resolution densely when more than this share of its tiles is active.
    """

    def __init__(self, mask, *, tile: int = 4, dilation: int | Mapping[int, int] = 2, dense_fraction: float = 0.5):
        self.mask = as_mask(mask)
        dense_fraction = check_options(tile, dilation, dense_fraction)
        self.tile = tile
        self.dilation = dilation
        self.dense_fraction = dense_fraction
        self._geometries: dict[tuple[int, int], Geometry | None] = {}

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.mask.shape)

    def radius(self, height: int) -> int:
        if isinstance(self.dilation, Mapping):
            return int(self.dilation.get(height, 0))
        return self.dilation

    def pixels(self, height: int, width: int) -> torch.Tensor:
        """The dilated pixel mask at ``(height, width)`` (before tiling)."""
        return dilate(resize_mask(self.mask, height, width), self.radius(height))

    def geometry(self, height: int, width: int) -> Geometry | None:
        """Active tiles at ``(height, width)``, or ``None`` when that resolution runs densely."""
        key = (height, width)
        if key not in self._geometries:
            self._geometries[key] = self._make(height, width)
        return self._geometries[key]

    def _make(self, height: int, width: int) -> Geometry | None:
        t = self.tile
        if height % t or width % t:
            return None
        px = self.pixels(height, width)
        tiles = F.max_pool2d(px[None, None].to(torch.float32), t, stride=t)[0, 0] > 0
        if tiles.float().mean().item() > self.dense_fraction:
            return None
        return Geometry(height, width, t, tiles.nonzero())

    def summary(self) -> list[dict]:
        """One row per resolution met so far: size, active tile share (1.0 when dense)."""
        rows = []
        for (h, w), g in sorted(self._geometries.items(), reverse=True):
            rows.append({"height": h, "width": w, "dense": g is None, "fraction": 1.0 if g is None else g.fraction,
                         "tiles": None if g is None else g.num_tiles})
        return rows


# ------------------------------------------------------------------------------ windowed gathers
@dataclass(eq=False)
class WindowPlan:
    """Index table that gathers, for each active output tile, the input window it reads.

    The windows are read from one *source* tensor ``(B, S, C)`` laid out as

    * sparse input: ``[halo | zero | rows]`` — ``halo``: the recorded full-run input at the
      positions :attr:`halo` (window pixels outside the input's active tiles), one zero row (the
      convolution's zero padding), then the input's own rows;
    * dense input (``halo is None``): ``[the whole map, H*W rows | zero]``.

    ``index`` (``N * bh * bw`` entries) picks each window pixel from the source, so a gather is one
    ``index_select``.
    """

    n_tiles: int
    bh: int
    bw: int
    index: torch.Tensor
    halo: torch.Tensor | None

    @property
    def slots(self) -> int:
        return self.n_tiles * self.bh * self.bw

    @property
    def zero_row(self) -> int:
        return int(self.halo.numel()) if self.halo is not None else -1


def window_plan(
    g_in: Geometry | None,
    g_out: Geometry,
    in_size: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> WindowPlan:
    """Build the :class:`WindowPlan` of one windowed op (convolution, pooling).

    Output tile ``(ty, tx)`` covers output rows ``[ty*T, ty*T + T)``; its input window starts at
    ``ty*T*stride - padding`` and spans ``(T-1)*stride + (k-1)*dilation + 1`` rows (the "halo" of
    SIGE's blocks). ``g_in=None`` means the input is dense.
    """
    hin, win = in_size
    t = g_out.tile
    bh = (t - 1) * stride[0] + (kernel[0] - 1) * dilation[0] + 1
    bw = (t - 1) * stride[1] + (kernel[1] - 1) * dilation[1] + 1
    n = g_out.num_tiles
    y0 = g_out.tiles[:, 0] * t * stride[0] - padding[0]
    x0 = g_out.tiles[:, 1] * t * stride[1] - padding[1]
    ys = (y0[:, None] + torch.arange(bh)[None, :])[:, :, None].expand(n, bh, bw)
    xs = (x0[:, None] + torch.arange(bw)[None, :])[:, None, :].expand(n, bh, bw)
    inside = ((ys >= 0) & (ys < hin) & (xs >= 0) & (xs < win)).reshape(-1)
    flat = (ys.clamp(0, hin - 1) * win + xs.clamp(0, win - 1)).reshape(-1)
    if g_in is None:
        return WindowPlan(n, bh, bw, torch.where(inside, flat, hin * win), None)
    row = g_in.lookup[flat]
    outside_tiles = inside & (row < 0)
    halo, halo_slot = torch.unique(flat[outside_tiles], return_inverse=True)
    zero = halo.numel()
    index = torch.full_like(flat, zero)
    index[outside_tiles] = halo_slot
    from_rows = inside & (row >= 0)
    index[from_rows] = row[from_rows] + zero + 1
    return WindowPlan(n, bh, bw, index, halo)
