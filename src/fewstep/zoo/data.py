"""The two training sets of the bundled models, built offline from images that ship inside packages.

* ``digits16``: scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels; UCI "optdigits"),
  upsampled bilinearly to 16x16 and scaled to ``[-1, 1]``, with their labels 0-9. A fixed seeded
  permutation holds out 20% (359 digits) for evaluation (FD-digits, classifier accuracy).
* ``patches32``: 32x32 RGB patches cut on a regular stride from the colour photographs shipping in
  scikit-learn (``china``, ``flower``) and scikit-image (``astronaut``, ``coffee``, ``chelsea``,
  ``rocket``, ``hubble_deep_field``, ``immunohistochemistry``). Whole photographs are held
  out for evaluation (``coffee`` and ``flower``), so held-out patches never overlap training ones.

Nothing is downloaded: both packages carry these files in their wheels.

Example::

    >>> from fewstep.zoo import data
    >>> train = data.digits16("train")
    >>> tuple(train.images.shape), tuple(train.labels.shape)
    ((1438, 1, 16, 16), (1438,))
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Dataset", "digits16", "patches32", "DATASETS", "PATCH_TRAIN_PHOTOS", "PATCH_HELDOUT_PHOTOS"]

SPLITS = ("train", "heldout", "all")

# The split is part of the recipe: changing this seed changes every bundled model's data.
DIGITS_SPLIT_SEED = 20240607
DIGITS_HELDOUT_FRACTION = 0.2

PATCH_TRAIN_PHOTOS = ("china", "astronaut", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
PATCH_HELDOUT_PHOTOS = ("coffee", "flower")
PATCH_SIZE = 32
PATCH_STRIDE = 16
PATCH_SCALES = (1, 2)  # also cut from photos downscaled 2x: coarser texture, more variety


@dataclass
class Dataset:
    """Images in ``[-1, 1]`` as ``(n, channels, size, size)`` float32, labels (or ``None``), a name."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor | None

    def __len__(self) -> int:
        return self.images.shape[0]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")
    return split


def _require(package: str, pip_name: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"the zoo's training data needs {pip_name}: pip install 'fewstep[data]'", name=package
        ) from None


def digits16(split: str = "train") -> Dataset:
    """scikit-learn's digits at 16x16 in ``[-1, 1]`` with labels; ``split`` is train/heldout/all."""
    _check_split(split)
    datasets = _require("sklearn.datasets", "scikit-learn")
    raw = datasets.load_digits()
    images8 = torch.as_tensor(raw.images, dtype=torch.float32)[:, None] / 16.0  # grey levels 0..16
    labels = torch.as_tensor(raw.target, dtype=torch.long)
    # bilinear 2x: smooth strokes, and the values stay within the original range
    images = F.interpolate(images8, size=(16, 16), mode="bilinear", align_corners=False) * 2.0 - 1.0
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_held = int(round(DIGITS_HELDOUT_FRACTION * images.shape[0]))
    idx = {"heldout": perm[:n_held], "train": perm[n_held:], "all": torch.arange(images.shape[0])}[split]
    idx = idx.sort().values
    return Dataset("digits16", split, images[idx].contiguous(), labels[idx].contiguous())


def _photo(name: str) -> torch.Tensor:
    """A packaged colour photograph as ``(3, H, W)`` float32 in ``[0, 1]``."""
    import numpy as np

    if name in ("china", "flower"):
        datasets = _require("sklearn.datasets", "scikit-learn")
        arr = datasets.load_sample_image(f"{name}.jpg")
    else:
        skdata = _require("skimage.data", "scikit-image")
        arr = getattr(skdata, name)()
    arr = np.asarray(arr)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise ValueError(f"photo {name!r}: expected a colour image, got shape {arr.shape}")
    return torch.as_tensor(np.array(arr[..., :3], copy=True), dtype=torch.float32).permute(2, 0, 1) / 255.0


def _patches(photo: torch.Tensor) -> torch.Tensor:
    out = []
    for scale in PATCH_SCALES:
        img = photo if scale == 1 else F.avg_pool2d(photo[None], scale)[0]  # box filter: no aliasing
        tiles = img.unfold(1, PATCH_SIZE, PATCH_STRIDE).unfold(2, PATCH_SIZE, PATCH_STRIDE)  # 3, nh, nw, P, P
        out.append(tiles.permute(1, 2, 0, 3, 4).reshape(-1, 3, PATCH_SIZE, PATCH_SIZE))
    return torch.cat(out)


def patches32(split: str = "train") -> Dataset:
    """32x32 RGB patches in ``[-1, 1]`` from packaged photographs (held-out photos for ``heldout``)."""
    _check_split(split)
    names = {"train": PATCH_TRAIN_PHOTOS, "heldout": PATCH_HELDOUT_PHOTOS}.get(split, PATCH_TRAIN_PHOTOS + PATCH_HELDOUT_PHOTOS)
    images = torch.cat([_patches(_photo(n)) for n in names]) * 2.0 - 1.0
    return Dataset("patches32", split, images.contiguous(), None)


DATASETS = {"digits16": digits16, "patches32": patches32}
