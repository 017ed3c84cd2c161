"""The corrector folded into the next predictor (MultistepPlan.fused): the same numbers as applying
predictor and corrector one after the other (``fuse=False``), in one linear combination per step,
for deterministic (UniPC, forward value, searched) and stochastic (SA-Solver) plans alike."""
from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

import fewstep
from fewstep import grids, schedules, testbeds
from fewstep.noise import NoiseSource
from fewstep.search import fileformat, parameterisation as P
from fewstep.solvers import base

F64 = torch.float64


def linear_vp():
    return schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=F64))


def unfused(plan):
    """The same plan run as written: every predictor and corrector its own combination."""
    return dataclasses.replace(plan, fuse=False)


def run_plan(plan, model, x, seed=None, solver=None):
    """Drive run_multistep (or ``solver.run``) by hand; ``seed`` gives a stochastic plan its draws
    (a fixed generator)."""
    noise = None if seed is None else NoiseSource(x, torch.Generator().manual_seed(seed))
    run = base.run_multistep(plan, x, noise) if solver is None else solver.run(plan, x, noise)
    msg = next(run)
    try:
        while True:
            if isinstance(msg, base.Evaluate):
                msg = run.send(model.evaluate(msg.xs, msg.nodes, plan.view, None, scaled=msg.scaled))
            else:
                msg = run.send(None)
    except StopIteration as stop:
        return stop.value


def terms_per_step(plan) -> float:
    """Tensors combined per step, counted through the plan: what the step loop costs in tensor
    operations (a combination of m tensors is m operations)."""
    def count(step):
        return len(step.terms(0, 0, [0] * 16, 0, None, 0))

    fused = plan.fused()
    if fused is not None:
        steps, _ = fused
        return sum(count(s) for s in steps) / len(steps)
    total = sum(count(p) for p in plan.predictors)
    total += sum(count(c) for i, c in enumerate(plan.correctors or []) if c is not None and i > 0)
    return total / len(plan.nodes)


def rel_diff(a, b) -> float:
    return float((a - b).abs().max()) / float(b.abs().max())


@pytest.fixture(scope="module")
def gmm16():
    sch = linear_vp()
    gm = testbeds.mixtures()["gmm16"]
    noise = torch.randn(64, 16, dtype=F64, generator=torch.Generator().manual_seed(11))
    return sch, gm.model(sch, prediction="eps"), noise


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("grid", ["logsnr", "quadratic-open", "uniform"])
def test_fused_unipc_equals_predictor_then_corrector(gmm16, variant, order, grid):
    sch, model, noise = gmm16
    solver = fewstep.solvers.get("unipc", order=order, variant=variant)
    plan = solver.prepare(sch, grids.make(grid, sch, 8))
    assert plan.fused() is not None and unfused(plan).fused() is None
    fused = run_plan(plan, model, noise)
    plain = run_plan(unfused(plan), model, noise)
    assert rel_diff(fused, plain) <= 1e-12
    # and fewstep.sample runs the fused plan
    assert rel_diff(fewstep.sample(model, noise, solver=solver, nfe=8, grid=grid), fused) <= 1e-12
    # one combination per step: order + 2 tensors (x_tilde and order + 1 predictions), at most; the
    # two combinations of a full-order step took 2 order + 3: order + 1 fewer on 6 of the 8 steps
    assert terms_per_step(plan) <= order + 2
    assert terms_per_step(unfused(plan)) - terms_per_step(plan) >= (order + 1) * 6 / 8


def test_unipc_tensor_operations_per_step_are_counted_exactly(gmm16):
    """UniPC-2 on 10 points: as written, a full step combines 3 tensors (predictor) and 4
    (corrector); fused, 4 in one combination (the warm-up steps and the final step use fewer)."""
    sch, _, _ = gmm16
    plan = fewstep.solvers.get("unipc", order=2).prepare(sch, grids.make("logsnr", sch, 10))
    steps, history = plan.fused()
    assert [len(s.terms(0, 0, [0] * 8, 0)) for s in steps] == [2, 3] + [4] * 7 + [1]
    assert history == 3
    as_written = [len(p.terms(0, 0, [0] * 8, 0)) + (len(c.terms(0, 0, [0] * 8, 0)) if i and c else 0)
                  for i, (p, c) in enumerate(zip(plan.predictors, plan.correctors))]
    assert as_written == [2, 3 + 3] + [3 + 4] * 7 + [1 + 4]


@pytest.mark.parametrize("options", [{"order": 1}, {"order": 2}, {"order": 3},
                                     {"predictor_order": 3, "corrector_order": 4},
                                     {"order": 2, "order2_rescale": True},
                                     {"order": 2, "tau": 0.0},
                                     {"order": 2, "brownian": True}])
def test_fused_sa_solver_equals_predictor_then_corrector(gmm16, options):
    """SA-Solver with its draws from a fixed generator: the folded corrector reuses the predictor's
    draw (its weight on z_{i-1} cancels exactly), and the result is that of the two combinations."""
    sch, model, noise = gmm16
    solver = fewstep.solvers.get("sa", **options)
    plan = solver.prepare(sch, grids.make("logsnr", sch, 10))
    assert plan.fused() is not None
    steps, _ = plan.fused()
    assert all(s.noise_prev == 0.0 for s in steps)
    assert sum(s.noise != 0.0 for s in steps) == sum(p.noise != 0.0 for p in plan.predictors)
    fused = run_plan(plan, model, noise, seed=5, solver=solver)
    plain = run_plan(unfused(plan), model, noise, seed=5, solver=solver)
    assert rel_diff(fused, plain) <= 1e-12
    # fewstep.sample with the same generator gives the same numbers
    sampled = fewstep.sample(model, noise, solver=solver, nfe=10, grid="logsnr",
                             generator=torch.Generator().manual_seed(5))
    assert rel_diff(sampled, fused) <= 1e-12
    if options.get("tau") != 0.0:
        # the draws matter: another seed moves the result by far more than the tolerance
        assert rel_diff(run_plan(plan, model, noise, seed=6, solver=solver), fused) > 1e-3
    assert terms_per_step(plan) < terms_per_step(unfused(plan)) - 1.0


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("schedule", ["vp", "flow"])
def test_fused_forward_value_equals_predictor_then_corrector(order, schedule):
    """Forward value: a free first prediction and a corrector that weights x_tilde (``at``)."""
    sch = linear_vp() if schedule == "vp" else schedules.RectifiedFlow()
    gm = testbeds.mixtures()["gmm16"]
    model = gm.model(sch, prediction="eps" if schedule == "vp" else "flow")
    noise = torch.randn(32, 16, dtype=F64, generator=torch.Generator().manual_seed(3))
    solver = fewstep.solvers.get("fv", order=order)
    times = grids.make("logsnr" if schedule == "vp" else "uniform", sch, solver.num_points(8))
    if schedule == "flow":
        times = times.clamp(max=0.999)  # a flow's eps view needs alpha > 0 at the first evaluation
    plan = solver.prepare(sch, times)
    assert plan.free_first and plan.fused() is not None
    x = noise * sch.initial_scale
    fused = run_plan(plan, model, x)
    plain = run_plan(unfused(plan), model, x)
    assert rel_diff(fused, plain) <= 1e-12
    assert terms_per_step(plan) < terms_per_step(unfused(plan))


@pytest.mark.parametrize("name,options", [("dpm++", {"order": 2}), ("dpm++", {"order": 3}), ("ddim", {}),
                                          ("deis", {"order": 3}), ("ipndm", {"order": 4}),
                                          ("ddpm", {}), ("em", {})])
def test_plans_without_corrector_run_their_predictors_through_the_short_loop(name, options):
    """A plan without correctors 'fuses' to its own predictors, and the short loop gives exactly the
    bits of the general loop (the same tensor operations in the same order, the same draws)."""
    sch = linear_vp()
    solver = fewstep.solvers.get(name, **options)
    plan = solver.prepare(sch, grids.make("logsnr", sch, 8))
    steps, _ = plan.fused()
    assert steps == plan.predictors
    gm = testbeds.mixtures()["gmm16"]
    model = gm.model(sch, prediction="eps", dtype=torch.float32)
    noise = torch.randn(16, 16, generator=torch.Generator().manual_seed(4))
    seed = 9 if solver.stochastic else None
    assert torch.equal(run_plan(plan, model, noise, seed), run_plan(unfused(plan), model, noise, seed))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_short_loop_gives_the_general_loops_bits_in_every_dtype(dtype):
    """The short loop scales by a 0-dim tensor made once per plan where lincomb passes a Python
    float: the same bits, in half, bfloat16, single and double precision states."""
    sch = linear_vp()
    plan = fewstep.solvers.get("dpm++", order=2).prepare(sch, grids.make("logsnr", sch, 8))
    model = testbeds.mixtures()["gmm16"].model(sch, prediction="eps", dtype=torch.float32)
    noise = torch.randn(16, 16, generator=torch.Generator().manual_seed(4)).to(dtype)
    fused, plain = run_plan(plan, model, noise), run_plan(unfused(plan), model, noise)
    assert fused.dtype == dtype and torch.equal(fused, plain)


def test_a_plan_made_under_inference_mode_runs_with_autograd_later(gmm16):
    """A plan (its fused table included) made under inference_mode must still
    serve a differentiable run (a gradient with respect to the initial noise)."""
    sch, model, noise = gmm16
    with torch.inference_mode():
        plan = fewstep.solvers.get("unipc", order=2).prepare(sch, grids.make("logsnr", sch, 6))
    x = noise[:4].clone().requires_grad_(True)
    run_plan(plan, model, x).sum().backward()
    with torch.no_grad():
        plain = run_plan(unfused(plan), model, noise[:4])
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().max()) > 0.0
    assert rel_diff(run_plan(plan, model, noise[:4]).detach(), plain) <= 1e-12


def test_heun_re_evaluates_so_it_keeps_the_two_combination_loop(gmm16):
    """PECE (Heun) evaluates at the corrected state, which the fused loop never forms: not fused,
    and its result is the general loop's to the bit."""
    sch, model, noise = gmm16
    plan = fewstep.solvers.get("heun").prepare(sch, grids.make("logsnr", sch, 5))
    assert any(plan.reevaluate) and plan.fused() is None
    assert torch.equal(run_plan(plan, model, noise), run_plan(unfused(plan), model, noise))


def test_a_corrector_with_its_own_draw_folds_the_previous_draw_in(gmm16):
    """A corrector whose noise weight differs from its predictor's leaves a z_{i-1} term in the fused
    step (SA-Solver's cancels): the fused loop keeps the previous draw and matches the two-step loop."""
    sch, model, noise = gmm16
    plan = fewstep.solvers.get("sa", order=2).prepare(sch, grids.make("logsnr", sch, 8))
    correctors = [None if c is None else dataclasses.replace(c, noise=0.7 * c.noise, a=0.9 * c.a)
                  for c in plan.correctors]
    changed = dataclasses.replace(plan, correctors=correctors)
    steps, _ = changed.fused()
    assert sum(s.noise_prev != 0.0 for s in steps) == sum(c is not None and c.noise != 0.0 for c in correctors[1:])
    fused = run_plan(changed, model, noise, seed=2)
    plain = run_plan(unfused(changed), model, noise, seed=2)
    assert rel_diff(fused, plain) <= 1e-12
    assert rel_diff(fused, run_plan(plan, model, noise, seed=2)) > 1e-3  # the change did change the result


def test_a_zero_state_weight_before_a_corrector_is_not_fused(gmm16):
    """The fold divides by predictor i-1's weight on x: where that is zero the plan runs as written."""
    sch, model, noise = gmm16
    plan = fewstep.solvers.get("unipc", order=2).prepare(sch, grids.make("logsnr", sch, 6))
    predictors = list(plan.predictors)
    predictors[2] = dataclasses.replace(predictors[2], a=0.0)
    changed = dataclasses.replace(plan, predictors=predictors)
    assert changed.fused() is None
    assert torch.equal(run_plan(changed, model, noise), run_plan(unfused(changed), model, noise))


def test_the_fold_is_made_once_with_the_plan(gmm16):
    """The fold is planning: a plan is made with its loop table, and fewstep.sample's cached plan
    keeps that same table call after call."""
    sch, model, noise = gmm16
    solver = fewstep.solvers.get("unipc", order=3)
    assert solver.prepare(sch, grids.make("logsnr", sch, 6))._fused is not None
    fewstep.sample(model, noise, solver=solver, nfe=6)
    plan, _ = importlib.import_module("fewstep.sample").plan_for(model, solver, 6, None)  # the cached plan
    table = plan._fused_run()[2]
    fewstep.sample(model, noise, solver=solver, nfe=6)
    assert importlib.import_module("fewstep.sample").plan_for(model, solver, 6, None)[0]._fused_run()[2] is table


def test_a_searched_corrector_is_fused_too(tmp_path):
    """A searched solver with a searched corrector (deterministic) runs fused, with the same result
    as predictor then corrector."""
    sch = linear_vp()
    g = torch.Generator().manual_seed(3)
    params = P.SolverParameters("x0", 2, torch.randn(6, generator=g, dtype=F64),
                                0.3 * torch.randn(6, 6, generator=g, dtype=F64),
                                corrector=0.3 * torch.randn(6, 6, generator=g, dtype=F64))
    path = str(tmp_path / "c.safetensors")
    fileformat.save(path, params, sch, prediction="eps", model="test")
    plan = fewstep.solvers.get("searched", path=path).prepare(sch, P.step_table(params, sch).times)
    assert plan.fused() is not None
    gm = testbeds.mixtures()["gmm2d"]
    noise = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    model = gm.model(sch, prediction="eps")
    a, b = run_plan(plan, model, noise), run_plan(unfused(plan), model, noise)
    assert rel_diff(a, b) <= 1e-11
