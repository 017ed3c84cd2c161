"""Noise for stochastic solvers: per-sample generators (batch invariance) and Brownian draws.

``NoiseSource(x, generator)(i)`` returns the standard normal draw of step ``i``, shaped like ``x``.

* ``generator=None`` uses torch's global generator; a single ``torch.Generator`` draws the whole
  batch; a list of generators (one per sample) draws each sample from its own generator, so a
  sample does not depend on its batch neighbours (the same convention as diffusers' ``randn_tensor``).
* ``brownian=True`` makes step ``i``'s draw the normalised increment of one Brownian path over the
  interval of step ``i`` on the log-SNR axis. The path is fixed by the seed and does not depend on the
  grid, so the same seed gives nearby samples at different NFE (as k-diffusion's
  ``BrownianTreeNoiseSampler`` intends).

The Brownian path is a *Brownian tree* (Lévy's midpoint construction): ``W(1)`` is drawn from a
seed, each dyadic midpoint from a seed derived from the root seed and the midpoint's position, and a
query point between two dyadic leaves is a Brownian-bridge draw seeded by the query point itself.
Nothing is stored: each value costs ``DEPTH + 2`` seeded draws of one sample's shape, and memory is a
few tensors of that shape, whatever the resolution.

Example::

    >>> import torch
    >>> x = torch.zeros(3, 2)
    >>> gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    >>> z = NoiseSource(x, gens)(0)
    >>> alone = NoiseSource(x[1:2], [torch.Generator().manual_seed(2)])(0)
    >>> bool((z[1:2] == alone).all())
    True
"""
from __future__ import annotations

import math
import struct
from typing import Sequence

import torch

__all__ = ["NoiseSource", "normal_like", "lambda_positions", "BrownianTree"]

_MASK64 = (1 << 64) - 1


def normal_like(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, from one generator or one generator per sample."""
    gens = _check_generator(generator, x.shape[0])
    if not isinstance(gens, list):
        return torch.randn(x.shape, generator=gens, dtype=x.dtype, device=_gen_device(gens, x)).to(x.device)
    return torch.cat(
        [torch.randn((1, *x.shape[1:]), generator=g, dtype=x.dtype, device=_gen_device(g, x)) for g in gens]
    ).to(x.device)


def _check_generator(generator, batch: int):
    """``None``, one ``torch.Generator``, or a list of exactly ``batch`` of them (returned as a list)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if not isinstance(generator, Sequence) or isinstance(generator, (str, bytes)):
        raise TypeError(f"generator: expected a torch.Generator or a list of them, got {type(generator).__name__}")
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"generator: a list needs one generator per sample ({batch}), got {len(gens)}")
    for g in gens:
        if not isinstance(g, torch.Generator):
            raise TypeError(f"generator: list entries must be torch.Generator, got {type(g).__name__}")
    return gens


def _gen_device(g, x):
    return g.device if isinstance(g, torch.Generator) else x.device


def lambda_positions(schedule, times) -> list[float]:
    """Positions in ``[0, 1]`` of the grid's nodes on the schedule's log-SNR axis, then ``1.0`` for the
    zero-noise end.

    The map is affine in ``lambda`` over the schedule's finite log-SNR range, so a Brownian path on
    ``[0, 1]`` is a (scaled) Brownian motion in ``lambda`` — the time variable of the diffusion SDE's
    noise in data view (SA-Solver eq. for ``x_t``, research note §2.1). It depends on the schedule
    only, never on the grid. Nodes below the finite range (``lambda = -inf`` at a flow's ``t = 1``)
    sit at 0.
    """
    from .schedules import as_f64, finite_lambda_range

    lo, hi, _ = finite_lambda_range(schedule)
    lam = schedule.lambda_(as_f64(times).detach().reshape(-1))
    u = ((lam - lo) / (hi - lo)).clamp(0.0, 1.0)
    u = torch.where(torch.isnan(u), torch.zeros_like(u), u)
    return u.tolist() + [1.0]


# ----------------------------------------------------------------------------------- Brownian tree
def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (SplitMix64 chained over the parts)."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (p & _MASK64))
    return h >> 1


def _float_bits(u: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", float(u)))[0]


_TAG_END, _TAG_LEAF, _TAG_FLAT = 1, 2, 3


class BrownianTree:
    """One Brownian path ``W`` on ``[0, 1]`` (``W(0) = 0``) of tensors of ``shape``, fixed by ``seed``.

    ``W(u)`` is exact in distribution for any ``u``, and jointly exact for query points that fall in
    different leaves of the dyadic tree (width ``2**-DEPTH``): each dyadic midpoint is a Brownian-bridge
    draw given its interval's end points (Lévy's construction), and a query inside a leaf is a bridge
    draw given the leaf's end points. Every draw is seeded from ``(seed, position)``, so values never
    depend on which other points were queried, or in which order.

    Example::

        >>> tree = BrownianTree(seed=7, shape=(2,), dtype=torch.float64)
        >>> w = tree.value(0.25)
        >>> bool((tree.value(0.25) == w).all()), tuple(w.shape)
        (True, (2,))
    """

    #: Leaves are 2**-12 of the log-SNR range (about 0.002 in lambda for DDPM's schedule). Values are exact
    #: at any depth; depth only sets how finely two grids share one path: points of two grids that fall
    #: in the same leaf get independent bridge draws of variance <= leaf / 4.
    DEPTH = 12

    def __init__(self, seed: int, shape, dtype=torch.float32, device="cpu"):
        self.seed = int(seed) & _MASK64
        self.shape = tuple(shape)
        self.dtype = dtype
        self.device = torch.device(device)
        self._gen = torch.Generator(device=self.device)
        self._end = self._normal(_TAG_END)

    def _normal(self, *key: int) -> torch.Tensor:
        self._gen.manual_seed(_derive_seed(self.seed, *key))
        return torch.randn(self.shape, generator=self._gen, dtype=self.dtype, device=self.device)

    def value(self, u: float) -> torch.Tensor:
        """``W(u)`` for ``u`` in ``[0, 1]`` (clamped)."""
        u = min(max(float(u), 0.0), 1.0)
        if u == 0.0:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        if u == 1.0:
            return self._end.clone()
        w_left = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        w_right = self._end
        k = 0  # index of the level-d interval [k 2^-d, (k+1) 2^-d] that contains u
        for d in range(self.DEPTH):
            # Brownian bridge at the midpoint: mean of the ends, variance (width / 4)
            child = 2 * k + 1  # the midpoint is the odd dyadic point child / 2^(d+1)
            w_mid = torch.add(w_left, w_right).mul_(0.5).add_(self._normal(d + 1, child), alpha=math.sqrt(2.0 ** -d / 4))
            if u * 2.0 ** (d + 1) < child:
                k, w_right = 2 * k, w_mid
            else:
                k, w_left = child, w_mid
        width = 2.0 ** -self.DEPTH
        left = k * width
        f = (u - left) / width
        if f == 0.0:
            return w_left
        bridge_std = math.sqrt(width * f * (1.0 - f))
        return torch.lerp(w_left, w_right, f).add_(self._normal(_TAG_LEAF, _float_bits(u)), alpha=bridge_std)

    def flat(self, a: float, b: float) -> torch.Tensor:
        """An independent standard normal for a degenerate interval ``[a, b]`` (``b <= a``), seeded by it."""
        return self._normal(_TAG_FLAT, _float_bits(a), _float_bits(b))


class _BrownianNoise:
    """Normalised Brownian increments over consecutive positions, one tree per stream.

    A single generator (or none) gives one tree for the whole batch; a list gives one tree per sample,
    so the batch stays invariant. Each tree's root seed is drawn from its generator once, here.
    """

    def __init__(self, x: torch.Tensor, generator, positions: Sequence[float]):
        gens = _check_generator(generator, x.shape[0])
        self.positions = [float(p) for p in positions]
        if any(b < a for a, b in zip(self.positions, self.positions[1:])):
            raise ValueError("positions: must be non-decreasing (the grid runs from noise to data)")
        draw_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        self.like = x
        if isinstance(gens, list):
            self.trees = [BrownianTree(_root_seed(g), (1, *x.shape[1:]), draw_dtype, _gen_device(g, x)) for g in gens]
        else:
            self.trees = [BrownianTree(_root_seed(gens), tuple(x.shape), draw_dtype, _gen_device(gens, x))]
        self._cache: tuple[float, list[torch.Tensor]] | None = None

    def _values(self, u: float) -> list[torch.Tensor]:
        if self._cache is not None and self._cache[0] == u:
            return self._cache[1]
        vals = [tree.value(u) for tree in self.trees]
        self._cache = (u, vals)
        return vals

    def increment(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self.positions) - 1:
            raise IndexError(f"step {i}: the grid has {len(self.positions) - 1} steps")
        a, b = self.positions[i], self.positions[i + 1]
        if b > a:
            wa = self._values(a)
            wb = self._values(b)
            scale = 1.0 / math.sqrt(b - a)
            parts = [torch.sub(vb, va).mul_(scale) for va, vb in zip(wa, wb)]
        else:
            parts = [tree.flat(a, b) for tree in self.trees]
        z = parts[0] if len(parts) == 1 else torch.cat(parts)
        return z.to(device=self.like.device, dtype=self.like.dtype)


def _root_seed(generator) -> int:
    """One 62-bit integer drawn from ``generator`` (torch's global generator for ``None``)."""
    if generator is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


class NoiseSource:
    """Standard normal draws for step ``i`` of a stochastic solver.

    Args:
        x: a tensor shaped like the state (batch first); draws take its shape, dtype and device.
        generator: ``None``, a ``torch.Generator``, or a list with one generator per sample.
        times: the grid's schedule times (needed with ``brownian=True``).
        schedule: the model's schedule (needed with ``brownian=True``).
        brownian: draw Brownian increments over each step's log-SNR interval instead of independent
            normals (see :func:`lambda_positions`).

    Example::

        >>> import torch
        >>> noise = NoiseSource(torch.zeros(2, 3), torch.Generator().manual_seed(0))
        >>> tuple(noise(0).shape)
        (2, 3)
    """

    def __init__(self, x: torch.Tensor, generator=None, *, times=None, schedule=None, brownian: bool = False):
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise TypeError("x: expected a tensor with a batch dimension")
        _check_generator(generator, x.shape[0])
        if not isinstance(brownian, bool):
            raise TypeError(f"brownian: expected True or False, got {brownian!r}")
        self.like = x
        self.generator = generator
        self._path: _BrownianNoise | None = None
        if brownian:
            if times is None or schedule is None:
                raise ValueError("brownian: needs the grid times and the schedule")
            self._path = _BrownianNoise(x, generator, lambda_positions(schedule, times))

    @property
    def brownian(self) -> bool:
        return self._path is not None

    def as_brownian(self, positions: Sequence[float]) -> "NoiseSource":
        """A source with the same generator(s) whose step ``i`` draw is the normalised increment of a
        Brownian path between ``positions[i]`` and ``positions[i + 1]`` (values in ``[0, 1]``).

        Solvers call this when their ``brownian=True`` option meets a plain source; it must be called
        before any draw so that the path's seed is the generator's next value.
        """
        out = NoiseSource(self.like, self.generator)
        out._path = _BrownianNoise(self.like, self.generator, positions)
        return out

    def __call__(self, i: int) -> torch.Tensor:
        if self._path is not None:
            return self._path.increment(i)
        return normal_like(self.like, self.generator)
