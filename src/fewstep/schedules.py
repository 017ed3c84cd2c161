"""Continuous-time views of noise processes ``x_t = alpha(t) * x0 + sigma(t) * eps``.

Every schedule exposes, in float64:

* ``alpha(t)``, ``sigma(t)`` and their time derivatives ``dalpha(t)``, ``dsigma(t)``;
* ``lambda_(t) = log(alpha / sigma)`` (half log-SNR) and its inverse ``t_of_lambda``;
* the range ``[t_min, t_max]`` and ``model_time(t)``: what the user's network receives as time;
* ``initial_scale``: the factor that turns standard normal noise into the state at ``t_max``.

Schedule time ``t`` runs from clean (small t) to noisy (large t). For :class:`DiscreteVP` the schedule
time *is* the (float) timestep index in ``[0, N-1]``, so grids are written in the units people
already use with diffusers.

Example::

    >>> import torch
    >>> from fewstep import schedules
    >>> sch = schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000))
    >>> round(float(sch.alpha(999.0)), 5)
    0.00635
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "Node",
    "Schedule",
    "DiscreteVP",
    "LinearVP",
    "CosineVP",
    "EDM",
    "RectifiedFlow",
    "ZERO_NOISE",
]

F64 = torch.float64


class Node(NamedTuple):
    """One evaluation time with every schedule quantity a solver step needs, as Python floats.

    Solvers precompute nodes once per grid so the step loop does no schedule maths.
    """

    t: float
    alpha: float
    sigma: float
    lam: float
    model_time: float
    dalpha: float
    dsigma: float


#: The end point of every sampling run: clean data (alpha = 1, sigma = 0, lambda = +inf).
#: It is never evaluated, only used for the coefficients of the final step.
ZERO_NOISE = Node(t=0.0, alpha=1.0, sigma=0.0, lam=math.inf, model_time=math.nan, dalpha=0.0, dsigma=0.0)


def as_f64(t) -> torch.Tensor:
    """Convert a Python number, sequence or tensor to a float64 CPU tensor (keeps autograd)."""
    if isinstance(t, torch.Tensor):
        return t.to(dtype=F64, device="cpu") if (t.dtype != F64 or t.device.type != "cpu") else t
    return torch.as_tensor(t, dtype=F64)


class Schedule:
    """Base class. Subclasses define ``alpha``/``sigma`` (or ``log_alpha`` for VP), the range and
    the inverse of ``lambda_``. All methods take float64 tensors or Python numbers."""

    t_min: float
    t_max: float

    # ---- to be provided by subclasses -------------------------------------------------------
    def alpha(self, t) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sigma(self, t) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def t_of_lambda(self, lam) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- shared -------------------------------------------------------------------------------
    def lambda_(self, t) -> torch.Tensor:
        """Half log-SNR ``log(alpha/sigma)``; decreasing in ``t``."""
        t = as_f64(t)
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def dalpha(self, t) -> torch.Tensor:
        """d alpha / dt (autograd by default; subclasses override with closed forms)."""
        return _derivative(self.alpha, t)

    def dsigma(self, t) -> torch.Tensor:
        """d sigma / dt."""
        return _derivative(self.sigma, t)

    def model_time(self, t) -> torch.Tensor:
        """What the network receives as its time argument (identity unless a subclass says otherwise)."""
        return as_f64(t) * self.time_scale

    def t_of_model_time(self, model_time) -> torch.Tensor:
        """Inverse of :meth:`model_time`."""
        return as_f64(model_time) / self.time_scale

    time_scale: float = 1.0

    @property
    def initial_scale(self) -> float:
        """Multiplier turning standard normal noise into the state at ``t_max``.

        Variance-preserving schedules start from the noise itself (as diffusers does: the marginal of
        unit-variance data has unit variance); the others from ``sigma(t_max) * noise``.
        """
        return float(self.sigma(self.t_max))

    def nodes(self, times) -> list[Node]:
        """Precompute :class:`Node` objects (Python floats) for a 1-D sequence of times."""
        t = as_f64(times).detach().reshape(-1)
        cols = [
            t,
            self.alpha(t),
            self.sigma(t),
            self.lambda_(t),
            self.model_time(t),
            self.dalpha(t),
            self.dsigma(t),
        ]
        rows = torch.stack([c.detach().to(F64).reshape(-1) for c in cols], dim=1).tolist()
        return [Node(*row) for row in rows]

    def node(self, t) -> Node:
        return self.nodes([float(t)])[0]

    def check_times(self, times: torch.Tensor, name: str = "grid") -> None:
        """Raise ``ValueError`` if ``times`` leave ``[t_min, t_max]`` (a 1e-9 relative slack)."""
        lo, hi = float(times.min()), float(times.max())
        slack = 1e-9 * max(1.0, abs(self.t_max))
        if lo < self.t_min - slack or hi > self.t_max + slack:
            raise ValueError(
                f"{name}: times must lie in this schedule's range [{self.t_min:g}, {self.t_max:g}] "
                f"({type(self).__name__}); got values in [{lo:g}, {hi:g}]"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t_min={self.t_min:g}, t_max={self.t_max:g})"

    def fingerprint(self) -> dict:
        """A small description used to check that saved solvers match a model's schedule."""
        t = torch.linspace(self.t_min, self.t_max, 9, dtype=F64)
        return {
            "kind": type(self).__name__,
            "t_min": self.t_min,
            "t_max": self.t_max,
            "lambda": [round(float(v), 6) for v in self.lambda_(t)],
        }


def _derivative(fn, t) -> torch.Tensor:
    t = as_f64(t).detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = fn(t)
        (g,) = torch.autograd.grad(y.sum(), t)
    return g.detach()


class _VP(Schedule):
    """Variance preserving: ``sigma = sqrt(1 - alpha^2)``; subclasses define ``log_alpha``."""

    def log_alpha(self, t) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def t_of_log_alpha(self, log_alpha) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def alpha(self, t):
        return torch.exp(self.log_alpha(as_f64(t)))

    def sigma(self, t):
        # sqrt(1 - alpha^2) without cancellation near alpha -> 1
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(as_f64(t))))

    def lambda_(self, t):
        la = self.log_alpha(as_f64(t))
        return la - 0.5 * torch.log(-torch.expm1(2.0 * la))

    def t_of_lambda(self, lam):
        lam = as_f64(lam)
        # alpha^2 = 1 / (1 + exp(-2 lambda))
        return self.t_of_log_alpha(-0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam))

    @property
    def initial_scale(self) -> float:
        return 1.0


class DiscreteVP(_VP):
    """A DDPM/Stable-Diffusion style table of ``alphas_cumprod`` made continuous.

    ``t`` is the float timestep index in ``[0, N-1]``; ``log(alpha)`` is interpolated piecewise
    linearly in ``t`` (as DPM-Solver does), so integer times reproduce the table exactly and the
    network receives ``model_time(t) = t``.

    Example::

        >>> sch = DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000))
        >>> sch.t_min, sch.t_max
        (0.0, 999.0)
    """

    def __init__(self, alphas_cumprod):
        ac = as_f64(alphas_cumprod).detach().reshape(-1)
        if ac.numel() < 2:
            raise ValueError(f"alphas_cumprod: need at least 2 entries, got {ac.numel()}")
        if not torch.isfinite(ac).all() or (ac <= 0).any() or (ac > 1).any():
            raise ValueError("alphas_cumprod: every value must lie in (0, 1]")
        if not (ac[1:] < ac[:-1]).all():
            raise ValueError("alphas_cumprod: must be strictly decreasing (noise grows with the timestep)")
        self.alphas_cumprod = ac
        self._log_alpha = 0.5 * torch.log(ac)
        self.num_train_timesteps = ac.numel()
        self.t_min = 0.0
        self.t_max = float(ac.numel() - 1)

    @classmethod
    def from_betas(cls, betas) -> "DiscreteVP":
        """Build from a beta table (diffusers' ``linear``: ``torch.linspace(1e-4, 0.02, 1000)``)."""
        b = as_f64(betas).detach().reshape(-1)
        if not torch.isfinite(b).all() or (b <= 0).any() or (b >= 1).any():
            raise ValueError("betas: every value must lie in the open interval (0, 1)")
        return cls(torch.cumprod(1.0 - b, dim=0))

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, n: int = 1000) -> "DiscreteVP":
        """Stable Diffusion's ``scaled_linear`` betas."""
        return cls.from_betas(torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=F64) ** 2)

    def log_alpha(self, t):
        t = as_f64(t)
        n = self._log_alpha.numel()
        idx = torch.clamp(torch.floor(t.detach()), 0, n - 2).long()
        w = t - idx.to(F64)
        return self._log_alpha[idx] * (1.0 - w) + self._log_alpha[idx + 1] * w

    def dalpha(self, t):
        t = as_f64(t).detach()
        n = self._log_alpha.numel()
        idx = torch.clamp(torch.floor(t), 0, n - 2).long()
        slope = self._log_alpha[idx + 1] - self._log_alpha[idx]
        return self.alpha(t) * slope

    def dsigma(self, t):
        t = as_f64(t).detach()
        a, s = self.alpha(t), self.sigma(t)
        return -a * self.dalpha(t) / s

    def t_of_log_alpha(self, log_alpha):
        la = as_f64(log_alpha)
        table = self._log_alpha  # decreasing in t
        flipped = table.flip(0)  # increasing
        n = table.numel()
        # position j in the increasing table with flipped[j] <= la < flipped[j+1]
        j = torch.clamp(torch.searchsorted(flipped, la.detach().contiguous(), right=True) - 1, 0, n - 2)
        lo, hi = flipped[j], flipped[j + 1]
        frac = (la - lo) / (hi - lo)
        # flipped index j corresponds to t = n-1-j; moving towards hi decreases t
        return (n - 1 - j).to(F64) - frac

    def fingerprint(self) -> dict:
        d = super().fingerprint()
        d["num_train_timesteps"] = self.num_train_timesteps
        return d

    def __repr__(self) -> str:
        return f"DiscreteVP(N={self.num_train_timesteps})"


class LinearVP(_VP):
    """Continuous VP with linear beta(t) = beta_min + t (beta_max - beta_min) on ``t`` in (0, 1] (score-SDE)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0,
                 time_scale: float = 1.0):
        if not (0 < beta_min < beta_max):
            raise ValueError(f"beta_min, beta_max: need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        if not (0 < t_min < t_max <= 1):
            raise ValueError(f"t_min, t_max: need 0 < t_min < t_max <= 1, got {t_min}, {t_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.t_min, self.t_max, self.time_scale = float(t_min), float(t_max), float(time_scale)

    def log_alpha(self, t):
        t = as_f64(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def t_of_log_alpha(self, log_alpha):
        la = as_f64(log_alpha)
        a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
        # a t^2 + b t + la = 0, stable root
        return -2.0 * la / (b + torch.sqrt(b * b - 4.0 * a * la))

    def dalpha(self, t):
        t = as_f64(t).detach()
        return self.alpha(t) * (-0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min)

    def dsigma(self, t):
        t = as_f64(t).detach()
        return -self.alpha(t) * self.dalpha(t) / self.sigma(t)


class CosineVP(_VP):
    """The iDDPM cosine schedule, ``alpha^2 = f(t)/f(0)`` with ``f(t) = cos((t+s)/(1+s) pi/2)^2``."""

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946, time_scale: float = 1.0):
        if not (0 < t_min < t_max < 1):
            raise ValueError(f"t_min, t_max: need 0 < t_min < t_max < 1, got {t_min}, {t_max}")
        self.s = float(s)
        self.t_min, self.t_max, self.time_scale = float(t_min), float(t_max), float(time_scale)
        self._log_alpha0 = math.log(math.cos(self.s / (1 + self.s) * math.pi / 2))

    def log_alpha(self, t):
        t = as_f64(t)
        return torch.log(torch.cos((t + self.s) / (1 + self.s) * math.pi / 2)) - self._log_alpha0

    def t_of_log_alpha(self, log_alpha):
        la = as_f64(log_alpha)
        return 2 * (1 + self.s) / math.pi * torch.arccos(torch.exp(la + self._log_alpha0)) - self.s

    def dalpha(self, t):
        t = as_f64(t).detach()
        u = (t + self.s) / (1 + self.s) * math.pi / 2
        return -self.alpha(t) * torch.tan(u) * math.pi / (2 * (1 + self.s))

    def dsigma(self, t):
        t = as_f64(t).detach()
        return -self.alpha(t) * self.dalpha(t) / self.sigma(t)


class EDM(Schedule):
    """Variance exploding (Karras et al. 2022): ``alpha = 1``, ``sigma = t``; the network gets sigma."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not (0 < sigma_min < sigma_max):
            raise ValueError(f"sigma_min, sigma_max: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)

    def alpha(self, t):
        return torch.ones_like(as_f64(t))

    def sigma(self, t):
        return as_f64(t) * 1.0

    def lambda_(self, t):
        return -torch.log(as_f64(t))

    def t_of_lambda(self, lam):
        return torch.exp(-as_f64(lam))

    def dalpha(self, t):
        return torch.zeros_like(as_f64(t))

    def dsigma(self, t):
        return torch.ones_like(as_f64(t))


class RectifiedFlow(Schedule):
    """Rectified flow / flow matching: ``alpha = 1 - t``, ``sigma = t``; the network gets ``t``
    (times ``time_scale``; SD3-style models use 1000)."""

    def __init__(self, t_min: float = 1e-3, t_max: float = 1.0, time_scale: float = 1.0):
        if not (0 < t_min < t_max <= 1):
            raise ValueError(f"t_min, t_max: need 0 < t_min < t_max <= 1, got {t_min}, {t_max}")
        self.t_min, self.t_max, self.time_scale = float(t_min), float(t_max), float(time_scale)

    def alpha(self, t):
        return 1.0 - as_f64(t)

    def sigma(self, t):
        return as_f64(t) * 1.0

    def t_of_lambda(self, lam):
        return torch.sigmoid(-as_f64(lam))

    def dalpha(self, t):
        return -torch.ones_like(as_f64(t))

    def dsigma(self, t):
        return torch.ones_like(as_f64(t))


def finite_lambda_range(schedule: Schedule) -> tuple[float, float, bool]:
    """``(lambda_start, lambda_end, prepend_t_max)`` for grids defined in log-SNR.

    When ``lambda(t_max)`` is ``-inf`` (a flow starting from pure noise), log-SNR grids start one
    point at ``t_max`` itself and space the rest from the mirror image of ``lambda(t_min)``.
    """
    lam_end = float(schedule.lambda_(schedule.t_min))
    lam_start = float(schedule.lambda_(schedule.t_max))
    if math.isfinite(lam_start):
        return lam_start, lam_end, False
    return min(-lam_end, lam_end - 1.0), lam_end, True


SCHEDULES: dict[str, type] = {
    "discrete": DiscreteVP,
    "linear_vp": LinearVP,
    "cosine_vp": CosineVP,
    "edm": EDM,
    "rectified_flow": RectifiedFlow,
}


def make(kind: str, **kwargs) -> Schedule:
    """Build a schedule by name (``discrete`` takes ``betas`` or ``alphas_cumprod``)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule: unknown kind {kind!r}; valid: {sorted(SCHEDULES)}")
    if kind == "discrete":
        if "betas" in kwargs:
            return DiscreteVP.from_betas(kwargs.pop("betas"))
        return DiscreteVP(kwargs.pop("alphas_cumprod"))
    return SCHEDULES[kind](**kwargs)

