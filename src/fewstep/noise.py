"""Noise for stochastic solvers: per-sample generators (batch invariance) and Brownian draws.

``NoiseSource(x, generator)(i)`` returns the standard normal draw of step ``i``, shaped like ``x``.

* ``generator=None`` uses torch's global generator; a single ``torch.Generator`` draws the whole
  batch; a list of generators (one per sample) draws each sample from its own generator, so a
  sample does not depend on its batch neighbours.
* ``brownian=True`` draws the increments of one Brownian path, fixed by the seed, over the
  schedule's log-SNR axis, so the same seed gives nearby results at different NFE.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["NoiseSource", "normal_like"]


def normal_like(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, from one generator or one generator per sample."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=_gen_device(generator, x)).to(x.device)
    gens = list(generator)
    if len(gens) != x.shape[0]:
        raise ValueError(f"generator: a list needs one generator per sample ({x.shape[0]}), got {len(gens)}")
    for g in gens:
        if not isinstance(g, torch.Generator):
            raise TypeError(f"generator: list entries must be torch.Generator, got {type(g).__name__}")
    return torch.cat(
        [torch.randn((1, *x.shape[1:]), generator=g, dtype=x.dtype, device=_gen_device(g, x)) for g in gens]
    ).to(x.device)


def _gen_device(g, x):
    return g.device if isinstance(g, torch.Generator) else x.device


class NoiseSource:
    """Standard normal draws for step ``i`` of a stochastic solver."""

    def __init__(self, x: torch.Tensor, generator=None, *, times=None, schedule=None, brownian: bool = False):
        if generator is not None and not isinstance(generator, (torch.Generator, Sequence)):
            raise TypeError(f"generator: expected a torch.Generator or a list of them, got {type(generator).__name__}")
        self.like = x
        self.generator = generator
        self.brownian = brownian
        self._path = None
        if brownian:
            if times is None or schedule is None:
                raise ValueError("brownian: needs the grid times and the schedule")
            self._path = _BrownianPath(x, generator, schedule, times)

    def __call__(self, i: int) -> torch.Tensor:
        if self._path is not None:
            return self._path.increment(i)
        return normal_like(self.like, self.generator)


class _BrownianPath:
    """A Brownian motion on a fixed fine lattice of the normalised log-SNR axis, drawn once from the
    seed; step ``i`` gets its normalised increment between grid points ``i`` and ``i+1``.

    Because the lattice does not depend on the grid, two grids of different NFE see the same path,
    so their samples stay close (as k-diffusion's BrownianTreeNoiseSampler intends).
    """

    LATTICE = 1024

    def __init__(self, x, generator, schedule, times):
        lam = schedule.lambda_(torch.as_tensor(times, dtype=torch.float64))
        lo, hi = float(schedule.lambda_(schedule.t_max)), float(schedule.lambda_(schedule.t_min))
        if not math.isfinite(lo):
            lo = -hi
        u = ((lam - lo) / (hi - lo)).clamp(0, 1)
        pos = torch.cat([u, torch.ones(1, dtype=torch.float64)])
        self.index = (pos * self.LATTICE).round().long().tolist()
        steps = normal_like(x.new_empty((x.shape[0], self.LATTICE, *x.shape[1:])), generator)
        self.cum = torch.cat([torch.zeros_like(steps[:, :1]), steps.cumsum(dim=1)], dim=1)

    def increment(self, i: int) -> torch.Tensor:
        a, b = self.index[i], self.index[i + 1]
        if b <= a:
            b = min(a + 1, self.LATTICE)
            a = b - 1
        return (self.cum[:, b] - self.cum[:, a]) * (1.0 / math.sqrt(b - a))
