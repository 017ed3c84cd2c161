"""The differentiable twin of ``run_multistep`` for a searched solver: the same update, with autograd.

:func:`rollout` evaluates the network through ``model.raw`` (so gradients reach the state *and*
the time the network receives) and applies the coefficients of
:func:`fewstep.search.parameterisation.step_table`, the function the ``searched`` solver uses at
inference. The search differentiates this; ``tests/test_search.py`` checks that it returns what
``fewstep.sample(..., solver="searched")`` returns.

Example::

    >>> import torch
    >>> from fewstep import schedules, testbeds
    >>> from fewstep.search import parameterisation as P, rollout as R
    >>> sch = schedules.EDM()
    >>> model = R.differentiable_testbed(testbeds.Gaussian(0.3, 0.5, dim=2), sch)
    >>> p = P.SolverParameters.from_grid(sch, torch.tensor([80.0, 1.0, 0.01]))
    >>> end, states = R.rollout(model, torch.zeros(1, 2, dtype=torch.float64), P.step_table(p, sch))
    >>> len(states), tuple(end.shape)
    (2, (1, 2))
"""
from __future__ import annotations

import torch

from ..model import Model, _check_prediction, _view_coefficients
from ..schedules import Schedule
from .parameterisation import StepTable

__all__ = ["differentiable_view", "rollout", "differentiable_testbed", "NotDifferentiable"]

F64 = torch.float64


class NotDifferentiable(ValueError):
    """The model's network does not pass gradients to its input (the search needs them)."""


def differentiable_view(model: Model, x: torch.Tensor, t: torch.Tensor, view: str, cond=None) -> torch.Tensor:
    """The model's ``view`` (``"x0"``/``"velocity"``/``"eps"``) at state ``x`` and 0-d float64 time ``t``,
    differentiable in both. Calls ``model.raw`` once and adds one to ``model.nfe``."""
    sch = model.schedule
    mt = sch.model_time(t)
    time_dtype = F64 if x.dtype == F64 else torch.float32
    mt = mt.to(time_dtype).expand(x.shape[0]).to(x.device)
    x_in = x if (model.dtype is None or x.dtype == model.dtype) else x.to(model.dtype)
    out = model.raw(x_in, mt, model.cond if cond is None else {**model.cond, **cond})
    out = model._check_output(out, x_in)
    model.nfe += 1
    model.calls += 1
    if x.requires_grad and not out.requires_grad:
        raise NotDifferentiable(
            "model: its network output does not depend on the input through autograd (a detached or "
            "non-torch network); the search backpropagates through the network -- for the testbeds use "
            "fewstep.search.rollout.differentiable_testbed(gm, schedule)"
        )
    out = out.to(x.dtype)
    alpha, sigma = sch.alpha(t), sch.sigma(t)
    dalpha, dsigma = sch.dalpha(t), sch.dsigma(t)
    cx, co = _view_coefficients(model.prediction, view, alpha, sigma, dalpha, dsigma)
    cx = torch.as_tensor(cx, dtype=F64).to(x.dtype)
    co = torch.as_tensor(co, dtype=F64).to(x.dtype)
    return out * co + x * cx


def rollout(model: Model, noise: torch.Tensor, table: StepTable, cond=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the searched update from standard normal ``noise``; returns ``(end, states)``.

    ``states[i]`` is the state after step ``i`` (at node ``i + 1``) for ``i < N - 1``; ``end`` the clean
    sample. Everything is differentiable in the table's tensors.
    """
    sch = model.schedule
    # a searched start below t_max begins from sigma(t_0) * noise (differentiable in the start)
    x = noise * (sch.initial_scale if table.start_sigma is None else table.start_sigma.to(noise.dtype))
    dtype = x.dtype
    a = table.a.to(dtype)
    w = table.weights.to(dtype)
    cw = table.corrector_weights.to(dtype) if table.corrector_weights is not None else None
    preds: list[torch.Tensor] = []
    states: list[torch.Tensor] = []
    n = table.nfe
    x_prev = x
    for i in range(n):
        # x is the state the network is evaluated at (the predictor's, for i >= 1)
        preds.append(differentiable_view(model, x, table.eval_times[i], table.view, cond))
        if cw is not None and i > 0:
            # the corrector: the state at node i again, from the one before, now with D_i
            x = x_prev * a[i - 1]
            for j in range(i + 1):
                x = x + preds[j] * cw[i, j]
            states[-1] = x
        new = x * a[i]
        for j in range(i + 1):
            new = new + preds[j] * w[i, j]
        x_prev, x = x, new
        if i < n - 1:
            states.append(x)
    return x, states


def differentiable_testbed(gm, schedule: Schedule, prediction: str = "eps", dtype: torch.dtype | None = F64) -> Model:
    """An exact testbed model (:class:`fewstep.testbeds.GaussianMixture`) whose network keeps autograd.

    ``gm.model(...)`` detaches its inputs (it is a reference, not a network); the search needs
    gradients through the denoiser with respect to the state and the time, which the closed-form
    posterior has.
    """
    from ..testbeds.gaussian import _prediction_from

    prediction = _check_prediction(prediction)

    def net(x, model_time):
        shape = x.shape
        flat = x.reshape(shape[0], -1).to(F64)
        t = schedule.t_of_model_time(model_time.to(F64))
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        x0, eps = gm.posterior(flat, alpha, sigma)
        out = _prediction_from(prediction, schedule, t, x0, eps)
        return out.reshape(shape).to(x.dtype)

    return Model(net, schedule=schedule, prediction=prediction, dtype=dtype, sample_shape=(gm.dim,),
                 name=f"{type(gm).__name__}[{prediction}]")
