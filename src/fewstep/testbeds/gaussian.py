"""Gaussian and Gaussian-mixture targets with exact denoisers and reference flow maps."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..model import Model, _check_prediction
from ..schedules import Schedule, as_f64

__all__ = ["GaussianMixture", "Gaussian", "mixtures", "perturbed"]

F64 = torch.float64


class GaussianMixture:
    """``sum_k w_k N(mu_k, s_k^2 I)`` in ``R^d``.

    Args:
        means: ``(K, d)`` component means.
        weights: ``(K,)`` positive weights (normalised here).
        stds: ``(K,)`` positive isotropic standard deviations (or one number for all).

    Example::

        >>> gm = GaussianMixture([[1.0, 0.0], [-1.0, 0.0]], [0.5, 0.5], 0.1)
        >>> gm.dim, gm.num_components
        (2, 2)
    """

    def __init__(self, means, weights, stds):
        mu = torch.as_tensor(means, dtype=F64)
        if mu.dim() == 1:
            mu = mu[None]
        if mu.dim() != 2:
            raise ValueError(f"means: expected shape (K, d), got {tuple(mu.shape)}")
        k = mu.shape[0]
        w = torch.as_tensor(weights, dtype=F64).reshape(-1)
        if w.numel() != k or (w <= 0).any() or not torch.isfinite(w).all():
            raise ValueError(f"weights: expected {k} positive numbers, got {w.tolist()}")
        s = torch.as_tensor(stds, dtype=F64).reshape(-1)
        if s.numel() == 1:
            s = s.expand(k).clone()
        if s.numel() != k or (s <= 0).any() or not torch.isfinite(s).all():
            raise ValueError(f"stds: expected one or {k} positive numbers, got {s.tolist()}")
        self.means, self.weights, self.stds = mu, w / w.sum(), s
        self.dim = mu.shape[1]
        self.num_components = k

    # ------------------------------------------------------------------ exact posterior
    def posterior(self, x: torch.Tensor, alpha, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E[x0 | x], E[eps | x])`` for ``x = alpha x0 + sigma eps`` (float64, any shape ``(B, d)``).

        ``alpha`` and ``sigma`` are numbers or tensors of shape ``(B,)``. Both expectations are
        computed directly, so they stay finite at ``alpha = 0`` and at ``sigma = 0``.
        """
        x = x.to(F64)
        a = as_f64(alpha).reshape(-1, 1, 1)
        s = as_f64(sigma).reshape(-1, 1, 1)
        mu = self.means[None]  # (1, K, d)
        var = a * a * self.stds.reshape(1, -1, 1) ** 2 + s * s  # (B|1, K, 1)
        diff = x[:, None, :] - a * mu  # (B, K, d)
        logp = (
            torch.log(self.weights)[None]
            - 0.5 * self.dim * torch.log(var[..., 0])
            - 0.5 * (diff * diff).sum(-1) / var[..., 0]
        )
        r = torch.softmax(logp, dim=1)[..., None]  # (B, K, 1)
        x0 = (r * (mu + a * self.stds.reshape(1, -1, 1) ** 2 / var * diff)).sum(1)
        eps = (r * (s / var * diff)).sum(1)
        return x0, eps

    # ------------------------------------------------------------------ exact model
    def model(self, schedule: Schedule, prediction: str = "eps", *, dtype: torch.dtype | None = None,
              error: Callable | None = None) -> Model:
        """An exact :class:`fewstep.Model` of this target under ``schedule``, predicting ``prediction``.

        ``error(x, t, x0_hat) -> x0 error`` optionally perturbs the data prediction (robustness tests).
        """
        prediction = _check_prediction(prediction)

        def net(x, model_time):
            shape = x.shape
            flat = x.reshape(shape[0], -1)
            if flat.shape[1] != self.dim:
                raise ValueError(f"x: this testbed has dimension {self.dim}, got samples of size {flat.shape[1]}")
            t = schedule.t_of_model_time(model_time.detach().to(F64).cpu())
            a, s = schedule.alpha(t), schedule.sigma(t)
            x0, eps = self.posterior(flat.detach().cpu(), a, s)
            if error is not None:
                x0 = x0 + error(flat.detach().cpu().to(F64), t, x0)
                eps = (flat.detach().cpu().to(F64) - a[:, None] * x0) / s[:, None]
            out = _prediction_from(prediction, schedule, t, x0, eps)
            return out.reshape(shape).to(device=x.device, dtype=x.dtype)

        return Model(net, schedule=schedule, prediction=prediction, dtype=dtype, sample_shape=(self.dim,),
                     name=f"{type(self).__name__}[{prediction}]")

    def denoise(self, x: torch.Tensor, schedule: Schedule, t) -> torch.Tensor:
        """Exact data prediction at schedule time ``t`` (float64)."""
        t = as_f64(t)
        return self.posterior(x.reshape(x.shape[0], -1), schedule.alpha(t), schedule.sigma(t))[0].reshape(x.shape)

    # ------------------------------------------------------------------ reference flow map
    def reference(self, noise: torch.Tensor, schedule: Schedule, t_end=None, *, rtol: float = 1e-13,
                  atol: float = 1e-13) -> torch.Tensor:
        """End point of the probability-flow ODE from ``schedule.initial_scale * noise`` at ``t_max``.

        ``t_end=None`` integrates to zero noise (clean data); otherwise to schedule time ``t_end``.
        Float64; DOP853 at ``rtol = atol = 1e-13`` keeps the error below 1e-10 (checked by
        self-convergence in the tests).
        """
        x = noise.to(F64).reshape(noise.shape[0], -1) * schedule.initial_scale
        a0, s0 = float(schedule.alpha(schedule.t_max)), float(schedule.sigma(schedule.t_max))
        if t_end is None:
            a1, s1 = 1.0, 0.0
        else:
            a1, s1 = float(schedule.alpha(t_end)), float(schedule.sigma(t_end))
        y = self._flow_angle(x / math.hypot(a0, s0), math.atan2(s0, a0), math.atan2(s1, a1), rtol, atol)
        return (y * math.hypot(a1, s1)).reshape(noise.shape)

    def _flow_angle(self, y: torch.Tensor, th0: float, th1: float, rtol: float, atol: float) -> torch.Tensor:
        if th0 == th1:
            return y.clone()
        from scipy.integrate import solve_ivp

        shape = y.shape

        def rhs(th, flat):
            yt = torch.from_numpy(flat).reshape(shape)
            x0, eps = self.posterior(yt, math.cos(th), math.sin(th))
            return (math.cos(th) * eps - math.sin(th) * x0).reshape(-1).numpy()

        sol = solve_ivp(rhs, (th0, th1), y.reshape(-1).numpy().copy(), method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:  # pragma: no cover - scipy failure is not expected on these smooth ODEs
            raise RuntimeError(f"reference solve failed: {sol.message}")
        return torch.from_numpy(sol.y[:, -1]).reshape(shape)

    # ------------------------------------------------------------------ data
    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact samples of the target (float64, shape ``(n, d)``)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=F64, generator=generator)
        return self.means[comp] + self.stds[comp, None] * z

    def __repr__(self) -> str:
        return f"{type(self).__name__}(K={self.num_components}, d={self.dim})"


def _prediction_from(prediction: str, schedule: Schedule, t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor):
    a, s = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return a * eps - s * x0
    da, ds = schedule.dalpha(t)[:, None], schedule.dsigma(t)[:, None]
    return da * x0 + ds * eps


class Gaussian(GaussianMixture):
    """``N(mean, std^2 I)`` in ``R^dim``: the flow map is closed form.

    Along the probability-flow ODE, ``x_t - alpha_t mean`` is ``sqrt(alpha_t^2 std^2 + sigma_t^2)``
    times a constant vector, so the reference needs no ODE solve.
    """

    def __init__(self, mean: float | Sequence[float] = 0.0, std: float = 1.0, dim: int | None = None):
        mu = torch.as_tensor(mean, dtype=F64).reshape(-1)
        if dim is not None:
            if mu.numel() == 1:
                mu = mu.expand(dim).clone()
            elif mu.numel() != dim:
                raise ValueError(f"mean: expected {dim} entries (dim), got {mu.numel()}")
        super().__init__(mu[None], [1.0], [float(std)])

    def reference(self, noise, schedule, t_end=None, **_):
        x = noise.to(F64).reshape(noise.shape[0], -1) * schedule.initial_scale
        mu, s2 = self.means[0], float(self.stds[0]) ** 2
        a0, s0 = float(schedule.alpha(schedule.t_max)), float(schedule.sigma(schedule.t_max))
        if t_end is None:
            a1, s1 = 1.0, 0.0
        else:
            a1, s1 = float(schedule.alpha(t_end)), float(schedule.sigma(t_end))
        scale = math.sqrt(a1 * a1 * s2 + s1 * s1) / math.sqrt(a0 * a0 * s2 + s0 * s0)
        return (a1 * mu + scale * (x - a0 * mu)).reshape(noise.shape)


def mixtures() -> dict[str, GaussianMixture]:
    """The fixed Gaussian-mixture testbeds used by the tests and ``fewstep bench``.

    * ``gmm2d``: 8 components on a ring in 2-D, narrow (std 0.05) – strongly curved trajectories.
    * ``gmm16``: 8 components in 16-D with random means and mixed widths.
    * ``gmm64``: 16 components in 64-D, unequal weights – closer to image-like dimensions.
    """
    g = torch.Generator().manual_seed(1234)
    ring = torch.tensor([[math.cos(2 * math.pi * k / 8), math.sin(2 * math.pi * k / 8)] for k in range(8)])
    out = {
        "gmm2d": GaussianMixture(ring, torch.ones(8), 0.05),
        "gmm16": GaussianMixture(torch.randn(8, 16, generator=g, dtype=F64) * 0.5,
                                 torch.rand(8, generator=g, dtype=F64) + 0.5,
                                 torch.rand(8, generator=g, dtype=F64) * 0.15 + 0.05),
        "gmm64": GaussianMixture(torch.randn(16, 64, generator=g, dtype=F64) * 0.3,
                                 torch.rand(16, generator=g, dtype=F64) * 2 + 0.2,
                                 torch.rand(16, generator=g, dtype=F64) * 0.2 + 0.1),
    }
    return out


def perturbed(gm: GaussianMixture, delta: float, seed: int = 0) -> Callable:
    """A smooth data-prediction error of relative size ``delta`` (for robustness tests).

    ``error(x, t, x0) = delta * |x0| * tanh(W x / sqrt(d)) / sqrt(d)`` with a fixed random ``W``:
    smooth in ``x``, Lipschitz, and scaling linearly with ``delta``.
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(gm.dim, gm.dim, generator=g, dtype=F64)
    d = gm.dim

    def error(x, t, x0):
        scale = x0.norm(dim=1, keepdim=True) / math.sqrt(d)
        return delta * scale * torch.tanh(x @ w.T / math.sqrt(d))

    return error

