"""Images and masks for ``fewstep edit``: PNG in and out with no imaging library.

Reading covers non-interlaced PNGs of every colour type and bit depth (greyscale, RGB, palette,
with or without alpha; ISO/IEC 15948 section 9 filters). Writing reuses :func:`fewstep.zoo.images.encode_png`.

Example::

    >>> import torch, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x.png")
    >>> img = torch.linspace(-1, 1, 48).view(1, 3, 4, 4)
    >>> save_image(img, path)
    >>> back = load_image(path, channels=3, size=(4, 4))
    >>> bool((back - img).abs().max() < 1 / 255 + 1e-6)
    True
"""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import torch

__all__ = ["read_png", "load_image", "load_mask", "save_image"]

_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path: str | os.PathLike) -> np.ndarray:
    """``(H, W, C)`` uint8 array of a non-interlaced PNG (palette images expanded to RGB or RGBA;
    16-bit samples keep their high byte; 1/2/4-bit greyscale scaled to 0..255)."""
    with open(path, "rb") as f:
        data = f.read()
    name = os.fspath(path)
    if not data.startswith(_SIGNATURE):
        raise ValueError(f"{name}: not a PNG file")
    pos, header, palette, alpha, idat = 8, None, None, None, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length:
            raise ValueError(f"{name}: truncated PNG chunk {kind!r}")
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = np.frombuffer(body, np.uint8).reshape(-1, 3)
        elif kind == b"tRNS":
            alpha = np.frombuffer(body, np.uint8)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None or not idat:
        raise ValueError(f"{name}: PNG without IHDR or IDAT")
    width, height, depth, colour, _, _, interlace = header
    if colour not in _CHANNELS or interlace != 0 or depth not in (1, 2, 4, 8, 16) or (
            depth < 8 and colour not in (0, 3)) or (depth == 16 and colour == 3):
        raise ValueError(f"{name}: unsupported PNG (bit depth {depth}, colour type {colour}, interlace "
                         f"{interlace}); re-save it as a non-interlaced 8-bit PNG")
    channels = _CHANNELS[colour]
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise ValueError(f"{name}: corrupt PNG image data ({e})") from None
    stride = (width * channels * depth + 7) // 8
    if len(raw) != height * (stride + 1):
        raise ValueError(f"{name}: PNG image data has the wrong length")
    bpp = max(1, channels * depth // 8)
    rows = _unfilter(np.frombuffer(raw, np.uint8).reshape(height, stride + 1), bpp, name)
    if depth == 16:  # keep the most significant byte of each sample
        img = rows.reshape(height, width, channels, 2)[..., 0]
    elif depth < 8:  # unpack 1, 2 or 4-bit samples, most significant first
        per = 8 // depth
        shifts = np.arange(8 - depth, -1, -depth, dtype=np.uint8)
        samples = (rows[:, :, None] >> shifts[None, None, :]) & ((1 << depth) - 1)
        img = samples.reshape(height, stride * per)[:, :width, None]
        if colour == 0:
            img = (img.astype(np.uint16) * 255 // ((1 << depth) - 1)).astype(np.uint8)
    else:
        img = rows.reshape(height, width, channels)
    if colour == 3:
        if palette is None:
            raise ValueError(f"{name}: palette PNG without a PLTE chunk")
        idx = img[..., 0]
        rgb = palette[np.minimum(idx, len(palette) - 1)]
        if alpha is not None:
            a = np.full(len(palette), 255, np.uint8)
            a[:len(alpha)] = alpha[:len(palette)]
            return np.concatenate([rgb, a[idx][..., None]], axis=-1)
        return rgb
    return img


def _unfilter(rows: np.ndarray, bpp: int, name: str) -> np.ndarray:
    """Undo the per-row filters (section 9.2: None, Sub, Up, Average, Paeth)."""
    height, width = rows.shape[0], rows.shape[1] - 1
    out = np.zeros((height, width), np.uint8)
    prev = np.zeros(width, np.int64)
    for y in range(height):
        kind, line = int(rows[y, 0]), rows[y, 1:].astype(np.int64)
        if kind == 0:
            cur = line
        elif kind == 1:  # Sub: a running sum per byte lane
            cur = np.cumsum(line.reshape(-1, bpp), axis=0).reshape(-1) % 256
        elif kind == 2:  # Up
            cur = (line + prev) % 256
        elif kind in (3, 4):  # Average, Paeth: each byte needs the reconstructed left neighbour
            up, src, rec = prev.tolist(), line.tolist(), [0] * width
            for i in range(width):
                a = rec[i - bpp] if i >= bpp else 0
                b = up[i]
                if kind == 3:
                    pred = (a + b) >> 1
                else:
                    c = up[i - bpp] if i >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                rec[i] = (src[i] + pred) & 255
            cur = np.asarray(rec, np.int64)
        else:
            raise ValueError(f"{name}: unknown PNG filter type {kind} in row {y}")
        out[y] = cur
        prev = cur
    return out


def _check_size(arr: np.ndarray, size, name: str) -> None:
    if size is not None and tuple(arr.shape[:2]) != tuple(size):
        raise ValueError(f"{name}: the image is {arr.shape[1]}x{arr.shape[0]} (width x height); "
                         f"this model needs {size[1]}x{size[0]}")


def load_image(path: str | os.PathLike, channels: int, size: tuple[int, int] | None = None,
               name: str = "image") -> torch.Tensor:
    """A ``(1, channels, H, W)`` float tensor in ``[-1, 1]`` (greyscale <-> RGB converted, alpha dropped)."""
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 or 3, got {channels!r}")
    arr = read_png(path)
    _check_size(arr, size, name)
    colour = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
    x = torch.from_numpy(colour.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    if x.shape[0] != channels:
        x = x.mean(dim=0, keepdim=True) if channels == 1 else x.expand(3, -1, -1).clone()
    return x[None]


def load_mask(path: str | os.PathLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A boolean ``(H, W)`` mask: pixels whose brightest colour channel is above 127 (alpha ignored)."""
    arr = read_png(path)
    if size is not None and tuple(arr.shape[:2]) != tuple(size):
        raise ValueError(f"mask: the mask is {arr.shape[1]}x{arr.shape[0]} (width x height) but the image is "
                         f"{size[1]}x{size[0]}; they must match")
    colour = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
    return torch.from_numpy(colour.max(axis=-1) > 127)


def save_image(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Write one ``(1, C, H, W)`` or ``(C, H, W)`` image in ``[-1, 1]`` as an 8-bit PNG, atomically."""
    from ..bench.report import atomic_path
    from ..zoo.images import encode_png

    x = image.detach().to("cpu", torch.float32)
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"image: save one image at a time, got a batch of {x.shape[0]}")
        x = x[0]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"image: expected (1 or 3, H, W), got {tuple(image.shape)}")
    png = encode_png(((x + 1.0) / 2.0).clamp(0.0, 1.0))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(png)
