"""Compute accounting for a model family: FLOPs per call, expected and realised cost of a level pattern.

Costs are floating point operations of one network call on ONE sample, as counted by
``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, 2 per multiply-add; norms
and pointwise activations are not counted). A guided model's call counts both halves.

The expected cost of one ML-EM step with independent level draws ``B_l ~ Bernoulli(p_l)`` counts
each *network* once: network ``j`` enters the estimate with weight ``c_j = B_j/p_j - B_{j+1}/p_{j+1}``
(see :mod:`fewstep.multilevel.estimator`) and is evaluated iff ``c_j != 0``. So a network shared by two
adjacent differences is paid once, and two adjacent levels that both fire with the same probability
cancel and cost nothing (all ``p = 1`` is exactly the finest model alone).

Example::

    >>> round(expected_step_cost([1.0, 0.5, 0.1], [1.0, 4.0, 16.0]), 12)   # 1 + 4 P(B2 or B3) + 16 * 0.1
    4.8
"""
from __future__ import annotations

import math
import weakref
from typing import Sequence

import torch

from ..model import Model

__all__ = ["measure_flops", "family_flops", "expected_step_cost", "expected_flops", "network_probabilities"]

_MEASURED: "weakref.WeakKeyDictionary[Model, dict]" = weakref.WeakKeyDictionary()


def _cond_batch(model: Model) -> int:
    """The batch size the model's own conditioning carries (1 when it carries none)."""
    sizes = {int(v.shape[0]) for v in model.cond.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    sizes.discard(1)
    if len(sizes) > 1:
        raise ValueError(f"model: its cond tensors have different batch sizes {sorted(sizes)}")
    return sizes.pop() if sizes else 1


def _device_of(model: Model) -> torch.device:
    net = model.net
    if isinstance(net, torch.nn.Module):
        for p in net.parameters():
            return p.device
    return torch.device("cpu")


def measure_flops(model: Model, sample_shape: Sequence[int] | None = None, *, dtype: torch.dtype | None = None,
                  device=None) -> float:
    """FLOPs of one call of ``model`` on one sample, counted with ``FlopCounterMode``.

    The network runs once on zeros at the middle of the schedule's time range, with a batch as large
    as the batch its own conditioning carries (so ``with_cond(label=...)`` and guided models work),
    and the count is divided by that batch. The input has ``dtype`` (default: the model's, else
    float32) on ``device`` (default: the network's parameters', else CPU). The model's NFE counters
    are left unchanged. Results are remembered per model object.

    Example::

        >>> import torch, fewstep
        >>> lin = torch.nn.Linear(8, 8, bias=False)
        >>> m = fewstep.Model(lambda x, t: lin(x), fewstep.schedules.LinearVP(), sample_shape=(8,))
        >>> measure_flops(m)          # one 8x8 matmul on one sample: 2 * 64
        128.0
    """
    from torch.utils.flop_counter import FlopCounterMode

    if not isinstance(model, Model):
        raise TypeError(f"model: expected a fewstep.Model, got {type(model).__name__}")
    shape = tuple(sample_shape) if sample_shape is not None else model.sample_shape
    if shape is None:
        raise ValueError(
            f"sample_shape: model {model.name!r} does not know its sample shape; pass sample_shape= (or costs=)"
        )
    dtype = model.dtype or dtype or torch.float32
    device = torch.device(device) if device is not None else _device_of(model)
    key = (shape, dtype, device)
    cached = _MEASURED.get(model)
    if cached is not None and key in cached:
        return cached[key]
    batch = _cond_batch(model)
    x = torch.zeros((batch, *shape), dtype=dtype, device=device)
    sch = model.schedule
    node = sch.node(0.5 * (float(sch.t_min) + float(sch.t_max)))
    nfe, calls = model.nfe, model.calls
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.evaluate([x], [node], "x0")
    finally:
        model.nfe, model.calls = nfe, calls
    flops = float(counter.get_total_flops()) / batch
    _MEASURED.setdefault(model, {})[key] = flops
    return flops


def family_flops(family: Sequence[Model], sample_shape: Sequence[int] | None = None, *, dtype=None,
                 device=None) -> list[float]:
    """:func:`measure_flops` of every member; raises if a member counts no FLOPs at all."""
    costs = [measure_flops(m, sample_shape, dtype=dtype, device=device) for m in family]
    for j, c in enumerate(costs):
        if not c > 0:
            raise ValueError(
                f"costs: FlopCounterMode counted no FLOPs for family[{j}] ({family[j].name}); "
                f"a network without matmuls or convolutions needs explicit costs=[...]"
            )
    return costs


def network_probabilities(probs: Sequence[float]) -> list[float]:
    """``P(network j is evaluated)`` in one step, for independent ``B_l ~ Bernoulli(p_l)``.

    Network ``j`` is needed iff ``c_j = B_j/p_j - B_{j+1}/p_{j+1} != 0`` (``B_{k+1} = 0``): it is
    needed when exactly one of the two fires, and when both fire unless ``p_j == p_{j+1}``.
    """
    k = len(probs)
    out = []
    for j in range(k):
        p = float(probs[j])
        if j + 1 == k:
            out.append(p)
            continue
        q = float(probs[j + 1])
        both = p * q if p != q else 0.0
        out.append(p * (1.0 - q) + (1.0 - p) * q + both)
    return out


def expected_step_cost(probs: Sequence[float], costs: Sequence[float]) -> float:
    """Expected FLOPs (per sample) of one step: ``sum_j P(network j needed) * cost_j``."""
    return math.fsum(pj * cj for pj, cj in zip(network_probabilities(probs), costs))


def expected_flops(table: Sequence[Sequence[float]], costs: Sequence[float]) -> float:
    """Expected FLOPs (per sample) of a whole run with probabilities ``table[step][level]``."""
    return math.fsum(expected_step_cost(row, costs) for row in table)
