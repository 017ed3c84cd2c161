"""Image grids as PNG files, with no imaging library: zlib + the PNG chunk format (ISO/IEC 15948).

Example::

    >>> import torch, tempfile, os
    >>> from fewstep.zoo.images import save_grid
    >>> path = os.path.join(tempfile.mkdtemp(), "grid.png")
    >>> save_grid(torch.zeros(6, 1, 16, 16), path, nrow=3)
    >>> open(path, "rb").read(8) == b"\\x89PNG\\r\\n\\x1a\\n"
    True
"""
from __future__ import annotations

import os
import struct
import zlib

import torch

from ..bench.report import atomic_path

__all__ = ["make_grid", "save_grid", "encode_png", "upscale"]


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1, pad_value: float = 1.0) -> torch.Tensor:
    """Tile ``(n, c, h, w)`` images in ``[-1, 1]`` into one ``(c, H, W)`` image in ``[0, 1]``."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected (n, 1 or 3, h, w), got {shape}")
    x = ((images.detach().to(torch.float32).cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
    n, c, h, w = x.shape
    nrow = nrow or max(1, int(n**0.5 + 0.999))
    ncol = nrow
    nrows = (n + ncol - 1) // ncol
    grid = torch.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value)
    for i in range(n):
        r, q = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top : top + h, left : left + w] = x[i]
    return grid


def upscale(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour enlargement (small digits stay crisp in a viewer)."""
    return image.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1) if factor > 1 else image


def encode_png(image: torch.Tensor) -> bytes:
    """8-bit greyscale or RGB PNG bytes of a ``(1 or 3, H, W)`` image in ``[0, 1]``."""
    c, h, w = image.shape
    pixels = (image.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(h))  # filter type 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    colour_type = 0 if c == 1 else 2
    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, scale: int = 1,
              padding: int = 1) -> None:
    """Write ``images`` (``(n, c, h, w)`` in ``[-1, 1]``) as one PNG grid, atomically."""
    png = encode_png(upscale(make_grid(images, nrow=nrow, padding=padding), scale))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(png)
        os.chmod(tmp, 0o644)  # temp files are created 0600
