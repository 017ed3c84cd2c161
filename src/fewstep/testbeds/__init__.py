"""Targets with exact denoisers and exact probability-flow end points.

* :class:`GaussianMixture` – isotropic components; exact posterior mean for any ``(alpha, sigma)``.
* :class:`Gaussian` – one component, whose flow map is closed form.
* :func:`mixtures` – the fixed mixtures used by tests and ``fewstep bench``.

Every testbed gives an exact :class:`fewstep.Model` for any schedule and prediction type, and
``reference(noise, schedule)`` – the end point of the probability-flow ODE started from
``schedule.initial_scale * noise`` at ``t_max`` – in float64.

The reference is schedule-free: the ODE is invariant under ``x -> x / sqrt(alpha^2 + sigma^2)`` and
changes of time, so it is solved once in the angle ``theta = atan2(sigma, alpha)`` where
``dy/dtheta = cos(theta) eps_hat - sin(theta) x0_hat`` is smooth on the whole closed interval
``[0, pi/2]`` (pure noise included).
"""
from .gaussian import Gaussian, GaussianMixture, mixtures, perturbed

__all__ = ["Gaussian", "GaussianMixture", "mixtures", "perturbed"]
