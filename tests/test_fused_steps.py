"""The corrector folded into the next predictor (MultistepPlan.fused): the same numbers as applying
predictor and corrector one after the other, in one linear combination per step."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

import fewstep
from fewstep import grids, schedules, testbeds
from fewstep.search import fileformat, parameterisation as P
from fewstep.solvers import base

F64 = torch.float64


def linear_vp():
    return schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=F64))


def run_plan(plan, model, x, fused: bool):
    """Drive run_multistep by hand, with the fused path on or off."""
    saved = plan._fused
    plan._fused = None if fused else (None,)  # (None,): "fusion does not apply" -> the two-combination path
    try:
        run = base.run_multistep(plan, x, None)
        msg = next(run)
        while True:
            if isinstance(msg, base.Evaluate):
                msg = run.send(model.evaluate(msg.xs, msg.nodes, plan.view, None, scaled=msg.scaled))
            else:
                msg = run.send(None)
    except StopIteration as stop:
        return stop.value
    finally:
        plan._fused = saved


def terms_per_step(plan, fused: bool) -> float:
    """Tensors combined per step: what the step loop costs in tensor operations."""
    if fused:
        steps, _ = plan.fused()
        return sum(len(s.terms(0, 0, [0] * 8, 0)) for s in steps) / len(steps)
    n = len(plan.nodes)
    total = sum(len(p.terms(0, 0, [0] * 8, 0)) for p in plan.predictors)
    total += sum(len(c.terms(0, 0, [0] * 8, 0)) for c in (plan.correctors or []) if c is not None)
    return total / n


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("grid", ["logsnr", "quadratic-open", "uniform"])
def test_fused_unipc_equals_predictor_then_corrector(variant, order, grid):
    sch = linear_vp()
    gm = testbeds.mixtures()["gmm16"]
    model = gm.model(sch, prediction="eps")
    noise = torch.randn(64, 16, dtype=F64, generator=torch.Generator().manual_seed(11))
    solver = fewstep.solvers.get("unipc", order=order, variant=variant)
    plan = solver.prepare(sch, grids.make(grid, sch, 8))
    assert plan.fused() is not None
    fused = run_plan(plan, model, noise, fused=True)
    plain = run_plan(plan, model, noise, fused=False)
    scale = float(plain.abs().max())
    assert float((fused - plain).abs().max()) <= 1e-12 * scale
    # and fewstep.sample runs the fused plan
    assert float((fewstep.sample(model, noise, solver=solver, nfe=8, grid=grid) - fused).abs().max()) <= 1e-12 * scale
    # one combination per step: at most (order + 2) tensors instead of two combinations
    assert terms_per_step(plan, True) <= order + 2
    if order >= 2:
        assert terms_per_step(plan, True) < terms_per_step(plan, False) - 2


@pytest.mark.parametrize("name,options", [("sa", {"order": 2}), ("heun", {}), ("fv", {"order": 2})])
def test_plans_that_cannot_fuse_keep_their_path(name, options):
    """Stochastic (SA-Solver), re-evaluating (Heun) and free-first (forward value) plans are not fused."""
    sch = linear_vp()
    plan = fewstep.solvers.get(name, **options).prepare(sch, grids.make("logsnr", sch, 8))
    assert plan.fused() is None


@pytest.mark.parametrize("name,options", [("dpm++", {"order": 3}), ("ddim", {}), ("deis", {"order": 3}),
                                          ("ipndm", {"order": 4})])
def test_plans_without_corrector_run_their_predictors_through_the_short_loop(name, options):
    """A plan without correctors 'fuses' to its own predictors, and the short loop gives exactly the
    bits of the general loop (the same tensor operations in the same order)."""
    sch = linear_vp()
    plan = fewstep.solvers.get(name, **options).prepare(sch, grids.make("logsnr", sch, 8))
    steps, _ = plan.fused()
    assert steps == plan.predictors
    gm = testbeds.mixtures()["gmm16"]
    model = gm.model(sch, prediction="eps", dtype=torch.float32)
    noise = torch.randn(16, 16, generator=torch.Generator().manual_seed(4))
    assert torch.equal(run_plan(plan, model, noise, True), run_plan(plan, model, noise, False))


def test_a_searched_corrector_is_fused_too():
    """A searched solver with a searched corrector (deterministic) runs fused, with the same result
    as predictor then corrector."""
    sch = linear_vp()
    g = torch.Generator().manual_seed(3)
    params = P.SolverParameters("x0", 2, torch.randn(6, generator=g, dtype=F64),
                                0.3 * torch.randn(6, 6, generator=g, dtype=F64),
                                corrector=0.3 * torch.randn(6, 6, generator=g, dtype=F64))
    path = os.path.join(tempfile.mkdtemp(), "c.safetensors")
    fileformat.save(path, params, sch, prediction="eps", model="test")
    plan = fewstep.solvers.get("searched", path=path).prepare(sch, P.step_table(params, sch).times)
    assert plan.fused() is not None
    gm = testbeds.mixtures()["gmm2d"]
    noise = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    model = gm.model(sch, prediction="eps")
    a, b = run_plan(plan, model, noise, True), run_plan(plan, model, noise, False)
    assert float((a - b).abs().max()) <= 1e-11 * float(b.abs().max())
