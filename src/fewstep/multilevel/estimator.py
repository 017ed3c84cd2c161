"""The randomised telescoping estimator of ML-EM and the checks a model family must pass.

With ``f_0 = 0`` and independent ``B_l ~ Bernoulli(p_l)`` (Jacot 2026; research note §1.2)::

    f_hat = sum_l (B_l / p_l) (f_l - f_{l-1})          E[f_hat] = f_k

Regrouped by network, ``f_hat = sum_j c_j f_j`` with ``c_j = B_j/p_j - B_{j+1}/p_{j+1}`` (``B_{k+1} = 0``):
each network is evaluated at most once per step, and only when ``c_j != 0``.

Example::

    >>> level_weights([True, False, True], [1.0, 0.5, 0.25])     # f_1 - 0 + 4 (f_3 - f_2)
    [1.0, -4.0, 4.0]
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..model import Model

__all__ = ["level_weights", "check_family", "check_schedules", "subset_model"]


def level_weights(fired: Sequence[bool], probs: Sequence[float]) -> list[float]:
    """Per-network weights ``c_j = B_j/p_j - B_{j+1}/p_{j+1}`` of one draw ``fired`` (``B``)."""
    k = len(probs)
    scaled = [(1.0 / probs[j]) if fired[j] else 0.0 for j in range(k)] + [0.0]
    return [scaled[j] - scaled[j + 1] for j in range(k)]


def check_family(family) -> list[Model]:
    """A list of at least two :class:`fewstep.Model`, cheap to expensive, with one prediction type
    and one sample shape (the schedule is checked against the grid by :func:`check_schedules`)."""
    if isinstance(family, Model) or not isinstance(family, (list, tuple)):
        raise TypeError(
            f"family: expected a list of fewstep.Model, cheapest first and finest last, got {type(family).__name__}"
        )
    family = list(family)
    if len(family) < 2:
        raise ValueError(f"family: needs at least 2 models (cheapest first, finest last), got {len(family)}")
    for j, m in enumerate(family):
        if not isinstance(m, Model):
            raise TypeError(f"family[{j}]: expected a fewstep.Model, got {type(m).__name__}")
    preds = {m.prediction for m in family}
    if len(preds) > 1:
        raise ValueError(f"family: all models must share one prediction type, got {[m.prediction for m in family]}")
    shapes = {m.sample_shape for m in family if m.sample_shape is not None}
    if len(shapes) > 1:
        raise ValueError(f"family: all models must share one sample shape, got {[m.sample_shape for m in family]}")
    return family


def check_schedules(family: Sequence[Model], schedule, times: torch.Tensor) -> None:
    """Every member's schedule gives the same ``alpha``, ``sigma`` and network time as ``schedule``
    at the grid's times (schedules have no equality; their values on the grid are what matters)."""
    ref = schedule.nodes(times)
    for j, m in enumerate(family):
        if m.schedule is schedule:
            continue
        for a, b in zip(ref, m.schedule.nodes(times)):
            for name in ("alpha", "sigma", "model_time"):
                va, vb = getattr(a, name), getattr(b, name)
                if not math.isclose(va, vb, rel_tol=1e-9, abs_tol=1e-12):
                    raise ValueError(
                        f"family[{j}]: its schedule differs from the sampled model's at t={a.t:g} "
                        f"({name} {vb:g} vs {va:g}); a family must share one schedule"
                    )


def subset_model(model: Model, rows: torch.Tensor, batch: int) -> Model:
    """``model`` restricted to the samples ``rows`` of a batch of ``batch``: conditioning tensors the
    model carries with one entry per sample are indexed with ``rows``; the model itself is returned
    when it carries none."""
    batched = {key: v for key, v in model.cond.items()
               if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch and batch > 1}
    if not batched:
        return model
    return model.with_cond(**{key: v.index_select(0, rows.to(v.device)) for key, v in batched.items()})
