"""Multilevel sampling over a family of models (ML-EM, Jacot 2026): costs, estimator, pilot, rule, gamma.

The solver itself is ``fewstep.sample(finest, noise, solver="mlem", family=[m_1, ..., m_k], nfe=N)``
(:mod:`fewstep.solvers.mlem`); this package holds what it is built from and what a user needs to plan
a run:

* :func:`measure_flops` / :func:`family_flops` – FLOPs per call with ``FlopCounterMode``;
  :func:`expected_flops` – the expected cost of a probability table, each network paid once per step.
* :func:`level_weights` – the telescoping estimator's per-network weights for one Bernoulli draw.
* :func:`calibrate` – a pilot run that measures ``V_l(t)`` and returns the rule's probabilities.
* :func:`optimal_probabilities` – ``p_l ∝ w sqrt(V_l / C_l)`` scaled to a FLOP budget.
* :func:`estimate_gamma` – the family's exponent (error ∝ cost^(-1/gamma)).
* :class:`MLEMStats` – what a run did (per-level calls, FLOPs expected and realised).

Example::

    >>> from fewstep import multilevel
    >>> round(multilevel.estimate_gamma([1, 4, 16], [0.3, 0.1, 0.033]).gamma, 2)
    1.26
"""
from .cost import expected_flops, expected_step_cost, family_flops, measure_flops, network_probabilities
from .estimator import check_family, level_weights, subset_model
from .gamma import GammaFit, estimate_gamma, level_errors
from .pilot import Calibration, LevelVariances, calibrate, pilot_run
from .probabilities import optimal_probabilities
from .stats import MLEMStats

__all__ = [
    "measure_flops",
    "family_flops",
    "expected_flops",
    "expected_step_cost",
    "network_probabilities",
    "level_weights",
    "check_family",
    "subset_model",
    "calibrate",
    "Calibration",
    "LevelVariances",
    "pilot_run",
    "optimal_probabilities",
    "estimate_gamma",
    "level_errors",
    "GammaFit",
    "MLEMStats",
]
