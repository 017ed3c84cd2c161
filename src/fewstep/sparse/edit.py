"""SDEdit-style image editing with spatially sparse inference.

SDEdit (Meng et al., ICLR 2022) edits an image by noising it to an intermediate time
``t_start = strength * t_max`` and solving the probability-flow ODE (or SDE) back to clean data.
SIGE (Li et al. 2022) makes repeated edits cheap: the *original* image's trajectory is run once in
full mode at the same times, recording one cache per network evaluation; every edited trajectory
then runs in sparse mode, recomputing only the tiles around the edit.

Both trajectories start from the same noise and (for stochastic solvers) draw the same noise, so
outside the active tiles they coincide exactly; inside, the edited image is computed with the
approximations of :mod:`fewstep.sparse.engine` (original GroupNorm statistics; unchanged pixels
and attention tokens taken from the cache).

Two kinds of edit:

* ``session.edit(edited_image)`` — the user changed pixels (strokes); the mask is where the images
  differ (or given);
* ``session.edit(mask=mask)`` — re-synthesise the masked region: fresh noise inside the mask,
  the original noise outside.

Example::

    >>> import torch, fewstep
    >>> from fewstep.sparse.edit import EditSession
    >>> from fewstep.zoo.unet import UNet, UNetConfig
    >>> net = UNet(UNetConfig(in_channels=1, base_channels=8, channel_mult=(1, 2))).eval()
    >>> sch = fewstep.schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000))
    >>> model = fewstep.Model(net, schedule=sch, prediction="eps")
    >>> image = torch.zeros(1, 1, 16, 16)
    >>> with EditSession(model, image, strength=0.5, solver="ddim", nfe=4) as session:
    ...     mask = torch.zeros(16, 16, dtype=torch.bool); mask[4:8, 4:8] = True
    ...     result = session.edit(mask=mask, seed=1)
    >>> result.image.shape, result.nfe, [round(t) for t in result.times]
    (torch.Size([1, 1, 16, 16]), 4, [500, 142, 17, 0])
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import grids as _grids
from ..model import Model
from ..noise import NoiseSource
from ..solvers import Solver, get as get_solver
from ..solvers.base import Evaluate
from .engine import SparseEngine
from .geometry import as_mask, difference_mask

__all__ = ["EditSession", "EditResult", "edit_grid", "GRIDS"]

GRIDS = ("logsnr", "uniform", "quadratic", "karras")


def edit_grid(schedule, strength: float, num_points: int, grid: str = "logsnr") -> torch.Tensor:
    """Decreasing float64 times from ``t_start = t_min + strength * (t_max - t_min)`` to ``t_min``.

    ``grid`` spaces them uniformly in log-SNR (``"logsnr"``), in ``t`` (``"uniform"``), in ``sqrt(t)``
    (``"quadratic"``) or in Karras' rho = 7 spacing of ``sigma / alpha`` (``"karras"``), over the
    truncated range only.
    """
    strength = float(strength)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength: expected a number in (0, 1], got {strength!r}")
    if grid not in GRIDS:
        raise ValueError(f"grid: unknown name {grid!r}; valid: {list(GRIDS)} or a tensor of times")
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
        raise ValueError(f"nfe: need at least one evaluation, got {num_points!r}")
    t0, t1 = schedule.t_min + strength * (schedule.t_max - schedule.t_min), schedule.t_min
    f64 = torch.float64
    if num_points == 1:
        return torch.tensor([t0], dtype=f64)
    if grid == "uniform":
        t = torch.linspace(t0, t1, num_points, dtype=f64)
    elif grid == "quadratic":
        t = torch.linspace(math.sqrt(t0), math.sqrt(t1), num_points, dtype=f64) ** 2
    else:
        lam0, lam1 = float(schedule.lambda_(t0)), float(schedule.lambda_(t1))
        if not (math.isfinite(lam0) and math.isfinite(lam1)):
            raise ValueError(f"grid: {grid!r} needs a finite log-SNR at both ends; use grid='uniform'")
        if grid == "logsnr":
            lam = torch.linspace(lam0, lam1, num_points, dtype=f64)
        else:
            rho, ramp = 7.0, torch.linspace(0, 1, num_points, dtype=f64)
            s0, s1 = math.exp(-lam0) ** (1 / rho), math.exp(-lam1) ** (1 / rho)
            lam = -torch.log((s0 + ramp * (s1 - s0)) ** rho)
        t = schedule.t_of_lambda(lam).clamp(t1, t0)
    t[0], t[-1] = t0, t1
    return _grids.validate(t, schedule)


@dataclass
class EditResult:
    """One edit: the image, the original trajectory's image, and what it cost."""

    image: torch.Tensor
    original: torch.Tensor
    mask: torch.Tensor
    times: list[float]
    nfe: int
    seconds: float
    sparse: bool
    report: dict = field(default_factory=dict)


class EditSession:
    """Record the original image's trajectory once, then apply edits sparsely.

    Args:
        model: a :class:`fewstep.Model` whose ``net`` is a convolutional ``nn.Module`` (a zoo
            model, a diffusers ``UNet2DModel``...).
        image: the original image ``(B, C, H, W)`` in the model's data range (``[-1, 1]`` for the zoo).
        strength: SDEdit strength: the edit starts at ``t_min + strength * (t_max - t_min)``.
        solver: a solver name or instance; ``nfe``: network evaluations per trajectory; ``grid``:
            a name from :data:`GRIDS` or a decreasing tensor of times starting at the edit's start.
        seed: seed of the starting noise (and of a stochastic solver's draws, shared by both
            trajectories so that they agree outside the edit).
        tile, dilation, dense_fraction, unsupported, dense: :class:`SparseEngine` options.
        **solver_options: e.g. ``order=2``.

    The session converts ``model.net`` in place; :meth:`close` (or leaving a ``with`` block) undoes
    it. Memory: one cache per network evaluation (``report["cache_bytes"]``).
    """

    def __init__(self, model: Model, image: torch.Tensor, *, strength: float = 0.6, solver: str | Solver = "ddim",
                 nfe: int | None = 10, grid: str | torch.Tensor = "logsnr", seed: int = 0, tile: int = 4,
                 dilation=2, dense_fraction: float = 0.5, unsupported: str = "error", dense=(), **solver_options):
        if not isinstance(model, Model):
            raise TypeError(f"model: expected a fewstep.Model, got {type(model).__name__}")
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or not image.is_floating_point():
            got = f"shape {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"image: expected a floating (B, C, H, W) tensor, got {got}")
        if model.sample_shape is not None and tuple(image.shape[1:]) != tuple(model.sample_shape):
            raise ValueError(f"image: this model takes images of shape {tuple(model.sample_shape)}, "
                             f"got {tuple(image.shape[1:])}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an integer, got {seed!r}")
        self.model = model
        self.image = image
        self.strength = float(strength)
        self.seed = seed
        self.solver = solver if isinstance(solver, Solver) else get_solver(solver, **solver_options)
        if isinstance(solver, Solver) and solver_options:
            raise ValueError(f"options {sorted(solver_options)}: pass them to the solver instance instead")
        sch = model.schedule
        if isinstance(grid, str):
            if nfe is None:
                raise ValueError("nfe: required with a named grid")
            if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < self.solver.min_nfe():
                raise ValueError(f"nfe: {self.solver.name} needs an integer nfe >= {self.solver.min_nfe()}, got {nfe!r}")
            self.times = edit_grid(sch, self.strength, self.solver.num_points(nfe), grid)
        else:
            self.times = _grids.validate(grid, sch)
            if nfe is not None and self.solver.nfe_for_points(self.times.numel()) > nfe:
                raise ValueError(f"nfe: the grid's {self.times.numel()} points need more than nfe={nfe} evaluations")
        self.plan = self.solver.prepare(sch, self.times)
        if getattr(self.plan, "free_first", False):
            raise ValueError(f"solver: {self.solver.name} treats its first state as pure noise and cannot start an "
                             f"edit at an intermediate time; use ddim, dpm++, unipc, heun, ddpm, sa...")
        self.view = self.solver.view(self.plan)
        self.node = sch.node(float(self.times[0]))
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.noise = torch.randn(image.shape, generator=gen, dtype=image.dtype).to(image.device)
        self.engine = SparseEngine(model.net, tile=tile, dilation=dilation, dense_fraction=dense_fraction,
                                   unsupported=unsupported, dense=dense)
        self.original_image = None
        self.record_seconds = None
        self._closed = False
        self._record()

    # ---------------------------------------------------------------------------------- driving
    def _start(self, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return clean * self.node.alpha + noise * self.node.sigma

    def _solve(self, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, int]:
        """Drive the solver from ``x`` at ``times[0]``; evaluation ``k`` uses cache ``k``."""
        noise = None
        if self.solver.stochastic:
            noise = NoiseSource(x, torch.Generator(device="cpu").manual_seed(self.seed + 1), times=self.times,
                                schedule=self.model.schedule)
        run = self.solver.run(self.plan, x, noise)
        evaluations = 0
        self.macs, self.dense_macs = 0, 0
        try:
            msg = next(run)
            while True:
                if type(msg) is Evaluate:
                    with self.engine._in_mode(mode, evaluations):
                        preds = self.model.evaluate(msg.xs, msg.nodes, self.view, scaled=msg.scaled)
                    evaluations += 1
                    self.macs += self.engine.stats.macs
                    self.dense_macs += self.engine.stats.dense_macs
                    msg = run.send(preds)
                else:
                    msg = run.send(None)
        except StopIteration as stop:
            out = stop.value
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError(f"edit: the {mode} trajectory produced NaN or Inf")
        return out, evaluations

    def _record(self) -> None:
        t0 = time.perf_counter()
        with torch.no_grad():
            self.original_image, self.nfe = self._solve(self._start(self.image, self.noise), "full")
        self.record_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------------------------ edits
    def edit(self, edited: torch.Tensor | None = None, mask=None, *, seed: int | None = None, sparse: bool = True,
             threshold: float = 0.02) -> EditResult:
        """Apply one edit (see the module docstring) and return an :class:`EditResult`.

        Args:
            edited: the edited image (same shape as the original), or ``None`` to re-synthesise ``mask``.
            mask: boolean ``(H, W)`` edit region; default: where ``edited`` differs by more than ``threshold``.
            seed: seed of the fresh noise inside the mask (re-synthesis; default: the session seed + 2).
            sparse: ``False`` runs the edited trajectory densely (for comparison).
        """
        if self._closed:
            raise ValueError("session: closed; create a new EditSession")
        h, w = self.image.shape[-2:]
        if edited is not None:
            if not isinstance(edited, torch.Tensor) or edited.shape != self.image.shape:
                got = tuple(edited.shape) if isinstance(edited, torch.Tensor) else type(edited).__name__
                raise ValueError(f"edited: expected the original's shape {tuple(self.image.shape)}, got {got}")
            edited = edited.to(self.image.dtype)
            mask = difference_mask(self.image, edited, threshold) if mask is None else as_mask(mask)
            start_noise = self.noise
            clean = edited
        else:
            if mask is None:
                raise ValueError("mask: required when no edited image is given (the region to re-synthesise)")
            mask = as_mask(mask)
            clean = self.image
        if tuple(mask.shape) != (h, w):
            raise ValueError(f"mask: shape {tuple(mask.shape)} does not match the image's size {(h, w)}")
        if edited is None:
            gen = torch.Generator(device="cpu").manual_seed(self.seed + 2 if seed is None else seed)
            fresh = torch.randn(self.image.shape, generator=gen, dtype=self.image.dtype).to(self.image.device)
            start_noise = torch.where(mask.to(self.image.device), fresh, self.noise)
        x = self._start(clean, start_noise)
        self.engine.set_mask(mask)
        t0 = time.perf_counter()
        with torch.no_grad():
            out, evaluations = self._solve(x, "sparse" if sparse else "off")
        seconds = time.perf_counter() - t0
        report = {}
        if sparse:
            report = self.engine.report()
            report["macs"], report["dense_macs"] = self.macs, self.dense_macs  # the whole trajectory
        return EditResult(out, self.original_image, mask, self.times.tolist(), evaluations, seconds, sparse, report)

    def close(self) -> None:
        """Restore the network and free the caches."""
        if not self._closed:
            self.engine.restore()
            self._closed = True

    def __enter__(self) -> "EditSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort when a session is dropped unclosed
        try:
            self.close()
        except Exception:
            pass
