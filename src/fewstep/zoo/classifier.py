"""The digit classifier behind FD-digits, and the Fréchet distance itself.

FD-digits is the Fréchet distance (Heusel et al. 2017, eq. (6); the "FID" recipe) between Gaussians
fitted to the 64-dimensional penultimate features of a small CNN trained on the ``digits16`` training
split::

    FD = |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))

It plays the role Inception features play for ImageNet-sized images: lower is closer to the data.
The classifier also measures whether conditional samples show the requested digit.

Example::

    >>> import torch
    >>> from fewstep.zoo.classifier import frechet_distance
    >>> a = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    >>> round(frechet_distance(a, a), 6)
    0.0
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitClassifier", "ClassifierConfig", "frechet_distance", "gaussian_stats", "fd_digits", "label_accuracy"]

FEATURE_DIM = 64


class ClassifierConfig(dict):
    """Architecture of :class:`DigitClassifier` (kept in the model's json)."""

    DEFAULTS = {"width": 32, "feature_dim": FEATURE_DIM, "num_classes": 10}

    def __init__(self, **kw):
        unknown = set(kw) - set(self.DEFAULTS)
        if unknown:
            raise ValueError(f"architecture: unknown classifier settings {sorted(unknown)}; valid: {sorted(self.DEFAULTS)}")
        super().__init__({**self.DEFAULTS, **kw})


class DigitClassifier(nn.Module):
    """A 4-convolution CNN for 16x16 digits in ``[-1, 1]``; ``features(x)`` gives the FD features.

    ``forward(x)`` returns logits ``(n, 10)``.
    """

    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM, num_classes: int = 10):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2),  # 8x8
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Linear(2 * w * 16, feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of ``(n, d)`` features, in float64."""
    f = features.detach().to(torch.float64)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"features: expected (n >= 2, d), got shape {tuple(f.shape)}")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(0.5 * (m + m.T))
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` and ``b`` (each ``(n, d)``).

    ``tr((C_a C_b)^(1/2))`` is computed as the trace of the square root of the symmetric PSD matrix
    ``C_a^(1/2) C_b C_a^(1/2)`` (same eigenvalues), which stays real and stable in float64.
    """
    mu_a, c_a = gaussian_stats(a)
    mu_b, c_b = gaussian_stats(b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"a, b: feature dimensions differ ({mu_a.numel()} vs {mu_b.numel()})")
    s = _sqrt_psd(c_a)
    cross = torch.linalg.eigvalsh(s @ c_b @ s).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + torch.trace(c_a) + torch.trace(c_b) - 2.0 * cross
    return float(fd.clamp_min(0.0))


@torch.no_grad()
def _batched(fn, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch].to(torch.float32)) for i in range(0, x.shape[0], batch)])


def _check_digits(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (1, 16, 16):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected digits of shape (n, 1, 16, 16), got {shape}")
    return images.clamp(-1.0, 1.0)


def fd_digits(images: torch.Tensor, reference: torch.Tensor | None = None, classifier: DigitClassifier | None = None) -> float:
    """FD-digits of ``images`` ``(n, 1, 16, 16)`` to ``reference`` (default: the held-out digits).

    Samples are clipped to ``[-1, 1]`` first, as when they are saved as images.
    """
    from . import data, load

    clf = classifier if classifier is not None else load("digits-classifier")
    ref = reference if reference is not None else data.digits16("heldout").images
    return frechet_distance(_batched(clf.features, _check_digits(images)), _batched(clf.features, _check_digits(ref)))


def label_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier: DigitClassifier | None = None) -> float:
    """Fraction of ``images`` that the digit classifier assigns to ``labels``."""
    from . import load

    clf = classifier if classifier is not None else load("digits-classifier")
    pred = _batched(clf, _check_digits(images)).argmax(1)
    return float((pred == labels.to(pred.device)).to(torch.float64).mean())
