"""Evaluation grids: decreasing schedule times for a number of points.

Named grids (all include both ends of the schedule's range, ``t_max`` first, ``t_min`` last):

* ``"uniform"``   – uniform in ``t``;
* ``"logsnr"``    – uniform in ``lambda = log(alpha/sigma)`` (DPM-Solver's ``logSNR``);
* ``"karras"``    – Karras et al. rho-spacing (rho = 7) of ``sigma/alpha``;
* ``"quadratic"`` – uniform in ``sqrt(t)`` (DDIM's and DPM-Solver's ``time_quadratic``).

Each name also has an ``-open`` variant (``"logsnr-open"``, ...): spaced for ``n + 1`` points with
``t_min`` dropped, so no evaluation is spent at the smallest noise level; the final step to zero noise
then starts from the last kept point (diffusers' ``final_sigmas_type="zero"`` spacings work this way).
Measured with ``fewstep bench accuracy --grids``, the open variants lower the error in most cells at
NFE 4-10.

A grid may also be an explicit decreasing 1-D tensor of schedule times.

Example::

    >>> from fewstep import grids, schedules
    >>> grids.make("logsnr", schedules.EDM(), 3)
    tensor([8.0000e+01, 4.0000e-01, 2.0000e-03], dtype=torch.float64)
"""
from __future__ import annotations

import copy
import math

import torch

from .schedules import Schedule, as_f64, finite_lambda_range

__all__ = ["NAMES", "make", "validate", "uniform", "logsnr", "karras", "quadratic"]

F64 = torch.float64


def _in_range(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    t = t.clamp(schedule.t_min, schedule.t_max)
    t[0], t[-1] = schedule.t_max, schedule.t_min  # exact ends despite rounding in the inverse
    return t


def uniform(schedule: Schedule, n: int) -> torch.Tensor:
    return torch.linspace(schedule.t_max, schedule.t_min, n, dtype=F64)


def quadratic(schedule: Schedule, n: int) -> torch.Tensor:
    return _in_range(schedule, torch.linspace(math.sqrt(schedule.t_max), math.sqrt(schedule.t_min), n, dtype=F64) ** 2)


def _lambda_spaced(schedule: Schedule, n: int, spacing) -> torch.Tensor:
    lam0, lam1, prepend = finite_lambda_range(schedule)
    m = n - 1 if prepend else n
    if m < 1:
        return torch.tensor([schedule.t_max], dtype=F64)
    lam = spacing(lam0, lam1, m)
    t = schedule.t_of_lambda(lam)
    if prepend:
        t = torch.cat([torch.tensor([schedule.t_max], dtype=F64), t])
    return _in_range(schedule, t)


def logsnr(schedule: Schedule, n: int) -> torch.Tensor:
    return _lambda_spaced(schedule, n, lambda a, b, m: torch.linspace(a, b, m, dtype=F64))


def karras(schedule: Schedule, n: int, rho: float = 7.0) -> torch.Tensor:
    def spacing(lam0, lam1, m):
        s_max, s_min = math.exp(-lam0), math.exp(-lam1)
        ramp = torch.linspace(0, 1, m, dtype=F64)
        s = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        return -torch.log(s)

    return _lambda_spaced(schedule, n, spacing)


_NAMED = {"uniform": uniform, "logsnr": logsnr, "karras": karras, "quadratic": quadratic}
NAMES = tuple(_NAMED)


def make(grid, schedule: Schedule, n: int, t_start: float | None = None) -> torch.Tensor:
    """A decreasing float64 grid of ``n`` schedule times (``grid`` a name from :data:`NAMES`).

    ``t_start`` (default ``t_max``) shortens the range, for sampling that starts from a partly noised
    state (SDEdit, img2img): the named spacing is then applied over ``[t_min, t_start]``.
    """
    if t_start is not None:
        t_start = float(t_start)
        if not (schedule.t_min < t_start <= schedule.t_max):
            raise ValueError(f"start: must lie in ({schedule.t_min:g}, {schedule.t_max:g}], got {t_start:g}")
        schedule = copy.copy(schedule)
        schedule.t_max = t_start
    if not isinstance(grid, str):
        raise TypeError(f"grid: expected a name or a tensor, got {type(grid).__name__}")
    if grid.endswith("-open") and grid[: -len("-open")] in _NAMED:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"grid: need at least 1 point, got {n!r}")
        return make(grid[: -len("-open")], schedule, n + 1, t_start)[:-1].clone()
    if grid not in _NAMED:
        raise ValueError(
            f"grid: unknown name {grid!r}; valid: {list(NAMES)} (each also as NAME-open) "
            f"or a decreasing 1-D tensor of times"
        )
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"grid: need at least 1 point, got {n!r}")
    if n == 1:
        return torch.tensor([schedule.t_max], dtype=F64)
    t = _NAMED[grid](schedule, n)
    validate(t, schedule)
    return t


def validate(times, schedule: Schedule, name: str = "grid") -> torch.Tensor:
    """Check an explicit grid: 1-D, finite, strictly decreasing, inside the schedule's range."""
    if not isinstance(times, torch.Tensor):
        try:
            times = torch.as_tensor(times, dtype=F64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name}: expected a 1-D tensor of times, got {type(times).__name__}") from e
    if times.is_complex() or not (times.is_floating_point() or times.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name}: expected a real tensor of times, got dtype {times.dtype}")
    t = as_f64(times).detach()
    if t.dim() != 1 or t.numel() < 1:
        raise ValueError(f"{name}: expected a non-empty 1-D tensor of times, got shape {tuple(times.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: times must be finite")
    if t.numel() > 1 and not (t[1:] < t[:-1]).all():
        raise ValueError(f"{name}: times must be strictly decreasing (noisy to clean), got {t.tolist()[:8]}...")
    schedule.check_times(t, name)
    return t
