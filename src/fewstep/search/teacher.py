"""Teacher trajectories for the search: a high-accuracy solve from the same noise, cached on disk.

The teacher is DPM-Solver++(3M) (Lu et al. 2022) on the ``logsnr`` grid of ``steps`` points, one
evaluation per point: ``fewstep.sample(model, noise, solver="dpm++", order=3, nfe=steps)``, with the
coefficients of :func:`fewstep.search.parameterisation.training_free_table`. On the bundled digits model 100 points agree with a
200-step RK4 reference to 3e-3 RMSE and 200 points to 7e-4, while RK4 in the angle variable with
the same 400 evaluations is off by 3e-2 (it spends too few steps at low noise).

It keeps the state *and* its derivative at every node, so the state at any time is a cubic Hermite
interpolant in the angle ``theta = atan2(sigma, alpha)`` of ``y = x / sqrt(alpha^2 + sigma^2)``, where
``dy/dtheta = cos(theta) eps_hat - sin(theta) x0_hat`` is smooth (pure noise included). The
interpolant is differentiable in the query time: the search compares the student's intermediate
states with the teacher's at the student's (moving) times, and the time gradient flows through the
teacher too (DS-Solver's released code rounds to the nearest teacher step instead, which blocks it).

The end point is the data prediction at ``t_min`` of the final state (what every fewstep solver's
final step to zero noise returns from an exact state there, and what ``fewstep bench`` uses as the
reference of bundled models), or, for the exact testbeds, their exact flow map to zero noise
(``exact_end``).

Trajectories are cached under ``cache_dir`` (default ``$FEWSTEP_CACHE`` or ``~/.cache/fewstep``),
keyed by a fingerprint of the model (its weights, or its outputs at fixed probes), the noise bytes,
the conditioning and the step count.

Example::

    >>> import torch
    >>> from fewstep import schedules, testbeds
    >>> from fewstep.search.teacher import solve
    >>> sch = schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000))
    >>> gm = testbeds.Gaussian(0.3, 0.5, dim=4)
    >>> noise = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> tr = solve(gm.model(sch), noise, steps=100)
    >>> err = (tr.at(torch.tensor(500.0, dtype=torch.float64)) - gm.reference(noise, sch, t_end=500.0)).abs().max()
    >>> bool(err < 1e-6)
    True
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..model import Model
from ..schedules import Schedule, as_f64

__all__ = ["Trajectory", "solve", "cached", "model_fingerprint", "default_cache_dir", "CACHE_VERSION"]

F64 = torch.float64
#: Bump when the teacher's numerics change: old cache files are then ignored.
CACHE_VERSION = 2


def default_cache_dir() -> Path:
    env = os.environ.get("FEWSTEP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fewstep"


def _theta(schedule: Schedule, t) -> torch.Tensor:
    t = as_f64(t)
    return torch.atan2(schedule.sigma(t), schedule.alpha(t))


@dataclass
class Trajectory:
    """A dense teacher trajectory for a batch of noise.

    ``ys[k]``, ``slopes[k]``: ``y = x / sqrt(alpha^2 + sigma^2)`` and ``dy/dtheta`` at ``thetas[k]``
    (decreasing: from ``t_max`` down to ``t_min``); ``end``: the clean end point. Shapes
    ``(nodes, batch, *shape)`` and ``(batch, *shape)``.
    """

    schedule: Schedule
    thetas: torch.Tensor
    ys: torch.Tensor
    slopes: torch.Tensor
    end: torch.Tensor

    @property
    def steps(self) -> int:
        return self.thetas.numel() - 1

    def subset(self, index) -> "Trajectory":
        """The trajectories of some samples (``index``: a slice or a tensor of indices)."""
        return Trajectory(self.schedule, self.thetas, self.ys[:, index], self.slopes[:, index], self.end[index])

    def at(self, t: torch.Tensor, dtype: torch.dtype = F64) -> torch.Tensor:
        """The teacher state at schedule time ``t`` (0-d float64 tensor, differentiable)."""
        sch = self.schedule
        t = as_f64(t)
        th = _theta(sch, t)
        # interval k with thetas[k] >= th >= thetas[k + 1] (thetas decrease)
        ascending = self.thetas.flip(0).contiguous()
        j = int(torch.searchsorted(ascending, th.detach().reshape(1), right=False)[0])
        k = min(max(self.steps - j, 0), self.steps - 1)
        h = float(self.thetas[k + 1] - self.thetas[k])
        s = (th - float(self.thetas[k])) / h
        s2, s3 = s * s, s * s * s
        h00, h10 = 2 * s3 - 3 * s2 + 1, s3 - 2 * s2 + s
        h01, h11 = -2 * s3 + 3 * s2, s3 - s2
        y0, y1 = self.ys[k].to(dtype), self.ys[k + 1].to(dtype)
        f0, f1 = self.slopes[k].to(dtype), self.slopes[k + 1].to(dtype)
        y = y0 * h00.to(dtype) + f0 * (h10 * h).to(dtype) + y1 * h01.to(dtype) + f1 * (h11 * h).to(dtype)
        radius = torch.sqrt(sch.alpha(t) ** 2 + sch.sigma(t) ** 2)
        return y * radius.to(dtype)


def _slice_cond(cond: Mapping | None, index: slice, batch: int) -> dict:
    out = {}
    for key, v in (cond or {}).items():
        out[key] = v[index] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch else v
    return out


def teacher_plan(schedule: Schedule, steps: int):
    """The teacher's step table: DPM-Solver++(3M) on the ``logsnr`` grid of ``steps`` points."""
    from .. import grids
    from .parameterisation import training_free_table

    with torch.no_grad():
        # view "x0" whatever the schedule: the exponential integrator is the accurate teacher everywhere
        return training_free_table(schedule, grids.make("logsnr", schedule, steps), 3, view="x0")


@torch.no_grad()
def solve(model: Model, noise: torch.Tensor, steps: int = 100, *, cond: Mapping | None = None,
          exact_end: Callable[[torch.Tensor], torch.Tensor] | None = None, chunk: int = 256,
          progress=None) -> Trajectory:
    """DPM-Solver++(3M) with ``steps`` evaluations per sample, keeping every node (see the module docstring).

    ``cond``: per-sample conditioning (tensors whose first dimension is the batch are split with it).
    ``exact_end(noise)``: an exact end point to use instead of the data prediction at ``t_min``.
    ``progress``: a tqdm bar to advance by one per evaluation of a chunk.
    """
    if not isinstance(steps, int) or steps < 8:
        raise ValueError(f"steps: expected an integer >= 8, got {steps!r}")
    sch = model.schedule
    table = teacher_plan(sch, steps)
    nodes = sch.nodes(table.times)
    a = table.a.tolist()
    w = table.weights.tolist()
    thetas = torch.tensor([math.atan2(n.sigma, n.alpha) for n in nodes], dtype=F64)
    store = torch.float32 if model.dtype == torch.float32 else F64
    batch = noise.shape[0]
    ys = torch.empty((steps, *noise.shape), dtype=store)
    slopes = torch.empty_like(ys)
    end = torch.empty(noise.shape, dtype=F64)
    for lo in range(0, batch, chunk):
        index = slice(lo, min(lo + chunk, batch))
        c = _slice_cond(cond, index, batch)
        x = noise[index].to(F64) * sch.initial_scale
        preds: list[torch.Tensor] = []
        for i, node in enumerate(nodes):
            x0 = model.evaluate([x], [node], "x0", c or None)[0].to(F64)  # the state stays float64
            preds.append(x0)
            r = math.hypot(node.alpha, node.sigma)
            th = float(thetas[i])
            eps = (x - node.alpha * x0) / node.sigma
            ys[i, index] = (x / r).to(store)
            slopes[i, index] = (math.cos(th) * eps - math.sin(th) * x0).to(store)
            new = x * a[i]
            for j in range(i, -1, -1):
                if w[i][j] != 0.0:
                    new = new + preds[j] * w[i][j]
            x = new
            if len(preds) > 3:
                preds[i - 3] = None  # DPM-Solver++(3M) reads three predictions at most
            if progress is not None:
                progress.update(1)
        end[index] = x
    if exact_end is not None:
        end = exact_end(noise).to(F64).reshape(noise.shape)
    return Trajectory(sch, thetas, ys, slopes, end)


# ---------------------------------------------------------------------------------------- caching
def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(str((t.dtype, tuple(t.shape))).encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _hash_cond(h, cond: Mapping | None) -> None:
    for key in sorted(cond or {}):
        v = cond[key]
        h.update(key.encode())
        if isinstance(v, torch.Tensor):
            _hash_tensor(h, v)
        else:
            h.update(repr(v).encode())


def model_fingerprint(model: Model, sample_shape=None) -> str:
    """A hex digest identifying the model: weights of a ``torch.nn.Module`` network, otherwise its
    outputs at fixed probe points (rounded, so thread counts do not change it), plus its schedule,
    prediction type, guidance and conditioning."""
    h = hashlib.sha256()
    h.update(json.dumps([type(model).__name__, model.prediction, model.schedule.fingerprint(), str(model.dtype)],
                        sort_keys=True).encode())
    h.update(repr(getattr(model, "scale", None)).encode())
    _hash_cond(h, getattr(model, "cond", None))
    _hash_cond(h, getattr(model, "uncond", None))
    net = model.net
    if isinstance(net, torch.nn.Module):
        for name, t in sorted(net.state_dict().items()):
            h.update(name.encode())
            _hash_tensor(h, t)
    else:
        shape = model.sample_shape or sample_shape
        if shape is None:
            raise ValueError("sample_shape: needed to fingerprint a model whose network is not a torch.nn.Module")
        sch = model.schedule
        probe = torch.randn(2, *shape, generator=torch.Generator().manual_seed(12345), dtype=F64)
        nodes = sch.nodes(torch.tensor([sch.t_max, 0.5 * (sch.t_max + sch.t_min), sch.t_min], dtype=F64))
        nfe, calls = model.nfe, model.calls
        with torch.no_grad():
            for node in nodes:
                out = model.evaluate([probe * math.hypot(node.alpha, node.sigma)], [node], "x0")[0]
                _hash_tensor(h, torch.round(out.to(F64) * 1e5))
        model.nfe, model.calls = nfe, calls
    return h.hexdigest()


def cached(model: Model, noise: torch.Tensor, steps: int = 100, *, cond: Mapping | None = None,
           exact_end: Callable | None = None, exact_name: str = "", cache_dir=None, progress=None,
           use_cache: bool = True, chunk: int = 256) -> tuple[Trajectory, bool]:
    """:func:`solve`, read from / written to the cache; returns ``(trajectory, loaded_from_cache)``.

    ``exact_name`` names the exact end point (part of the key; required with ``exact_end``).
    """
    from safetensors.torch import load_file, save_file

    from ..bench.report import atomic_path

    h = hashlib.sha256()
    h.update(f"teacher-v{CACHE_VERSION}-dpmpp3m-logsnr-{steps}-{exact_name}".encode())
    h.update(model_fingerprint(model, tuple(noise.shape[1:])).encode())
    _hash_tensor(h, noise)
    _hash_cond(h, cond)
    key = h.hexdigest()[:24]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / "teacher" / f"{key}.safetensors"
    if use_cache and path.is_file():
        try:
            d = load_file(str(path))
            return Trajectory(model.schedule, d["thetas"], d["ys"], d["slopes"], d["end"]), True
        except Exception:  # a damaged cache file is recomputed, never trusted
            pass
    traj = solve(model, noise, steps, cond=cond, exact_end=exact_end, progress=progress, chunk=chunk)
    if use_cache:
        try:
            with atomic_path(path) as tmp:
                save_file({"thetas": traj.thetas, "ys": traj.ys.contiguous(), "slopes": traj.slopes.contiguous(),
                           "end": traj.end.contiguous()}, tmp, metadata={"key": key, "steps": str(steps)})
        except OSError:
            pass  # a read-only cache only costs time
    return traj, False
