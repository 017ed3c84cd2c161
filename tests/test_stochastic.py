"""Stochastic samplers: SA-Solver, DDPM, Euler–Maruyama, and the noise they draw.

Every test asserts numbers: convergence slopes, parity with diffusers, step-for-step identities,
batch invariance, Brownian coherence across NFE, exact coefficient integrals, error messages.
"""
import math

import numpy as np
import pytest
import torch

import fewstep
from fewstep import schedules, testbeds
from fewstep.noise import BrownianTree, NoiseSource, lambda_positions
from fewstep.solvers import get
from fewstep.solvers.base import Evaluate, StepDone
from fewstep.solvers.coefficients import lagrange_weights
from fewstep.solvers.sa import exp_moments, sa_orders, sa_step
from fewstep.solvers.sde import ddpm_step, em_step

F64 = torch.float64
DDPM_LINEAR = schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=F64))


def _drive(solver, schedule, model, times, x, noise):
    """Run a solver's generator by hand; return the states after each step and the result."""
    plan = solver.prepare(schedule, times)
    gen = solver.run(plan, x, noise)
    states, msg = [], next(gen)
    try:
        while True:
            if type(msg) is Evaluate:
                msg = gen.send(model.evaluate(msg.xs, msg.nodes, solver.view(plan)))
            else:
                states.append(msg.x)
                msg = gen.send(None)
    except StopIteration as stop:
        return states, stop.value


# ------------------------------------------------------------------------------ SA: ODE orders
@pytest.fixture(scope="module")
def gmm16_reference():
    gm = testbeds.mixtures()["gmm16"]
    sch = schedules.LinearVP()
    noise = torch.randn(16, gm.dim, dtype=F64, generator=torch.Generator().manual_seed(0))
    t_last = sch.t_min  # every named grid ends there
    target = gm.denoise(gm.reference(noise, sch, t_end=t_last), sch, t_last)
    return gm, sch, noise, target


@pytest.mark.parametrize(
    "p,c,rescale,order,slope_range",
    [(1, 0, False, 1, (0.8, 1.3)), (2, 0, False, 2, (1.8, 2.5)), (3, 0, False, 3, (2.7, 3.4)),
     (1, 2, False, 2, (1.6, 2.4)), (2, 2, True, 2, (1.8, 2.6)), (3, 4, False, 4, (3.5, 4.6)),
     # exact integration of the 2-point interpolant (fewstep's default) converges faster than order 2
     (2, 2, False, 2, (2.6, 3.4))],
)
def test_sa_tau0_converges_at_its_order(gmm16_reference, p, c, rescale, order, slope_range):
    gm, sch, noise, target = gmm16_reference
    model = gm.model(sch, prediction="eps")
    errors = []
    for nfe in (40, 80):
        x = fewstep.sample(model, noise, solver="sa", nfe=nfe, grid="logsnr", tau=0.0, predictor_order=p,
                           corrector_order=c, lower_order_final=False, order2_rescale=rescale)
        errors.append(float((x - target).pow(2).mean().sqrt()))
    slope = math.log2(errors[0] / errors[1])
    assert get("sa", predictor_order=p, corrector_order=c).order == order
    assert slope_range[0] < slope < slope_range[1], (errors, slope)


def test_sa_tau0_is_deterministic_and_matches_gaussian_flow():
    gm = testbeds.Gaussian(mean=0.3, std=0.5, dim=4)
    sch = schedules.EDM()
    noise = torch.randn(8, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    model = gm.model(sch, prediction="x0")
    a = fewstep.sample(model, noise, solver="sa", nfe=30, tau=0.0, generator=torch.Generator().manual_seed(1))
    b = fewstep.sample(model, noise, solver="sa", nfe=30, tau=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    t_last = sch.t_min
    target = gm.denoise(gm.reference(noise, sch, t_end=t_last), sch, t_last)
    assert float((a - target).abs().max()) < 1e-2  # measured 6.3e-3


def test_sa_order1_tau1_equals_ddpm_step_for_step():
    gm = testbeds.mixtures()["gmm2d"]
    for sch in (DDPM_LINEAR, schedules.RectifiedFlow()):
        model = gm.model(sch, prediction="x0")
        noise = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
        runs = []
        for solver, kw in (("sa", dict(predictor_order=1, corrector_order=0, tau=1.0)), ("ddpm", {})):
            states = []
            out = fewstep.sample(model, noise, solver=solver, nfe=12, generator=torch.Generator().manual_seed(4),
                                 callback=lambda d: states.append(d["x"]), **kw)
            runs.append((states, out))
        (sa_states, sa_out), (ddpm_states, ddpm_out) = runs
        assert len(sa_states) == len(ddpm_states) == 12
        for u, v in zip(sa_states, ddpm_states):
            assert float((u - v).abs().max()) < 1e-12
        assert float((sa_out - ddpm_out).abs().max()) < 1e-12


# ------------------------------------------------------------------------- SA: diffusers parity
@pytest.mark.parametrize(
    "p,c,tau,steps,dtype",
    [(2, 2, None, 10, torch.float32), (3, 4, 1.0, 12, torch.float64), (4, 4, 0.5, 15, torch.float32),
     (1, 1, 1.0, 8, torch.float64)],
)
def test_sa_matches_diffusers_sasolver(p, c, tau, steps, dtype):
    from fewstep.bench.peers import make_scheduler

    gm = testbeds.mixtures()["gmm16"]
    model = gm.model(DDPM_LINEAR, prediction="eps")
    noise = torch.randn(32, gm.dim, dtype=dtype, generator=torch.Generator().manual_seed(1))
    # diffusers: one randn of the sample's shape per step() from the generator
    extra = {} if tau is None else {"tau_func": lambda t: tau}
    scheduler = make_scheduler("SASolverScheduler", model, predictor_order=p, corrector_order=c, **extra)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(5)
    x, theirs = noise.clone(), []
    for t in scheduler.timesteps:
        out = model.raw(x, torch.full((x.shape[0],), float(t), dtype=dtype), {})
        x = scheduler.step(out, t, x, generator=g).prev_sample
        theirs.append(x)
    # fewstep: the same draws in the same order; the grid is diffusers' timesteps and its end t = 0
    g = torch.Generator().manual_seed(5)
    draws = [torch.randn(noise.shape, generator=g, dtype=dtype) for _ in range(steps)]
    times = torch.tensor([float(t) for t in scheduler.timesteps] + [0.0], dtype=F64)
    solver = get("sa", predictor_order=p, corrector_order=c, tau=tau, order2_rescale=True, lower_order_final=True)
    ours, _ = _drive(solver, DDPM_LINEAR, model, times, noise.clone(), lambda i: draws[i])
    # diffusers' k-th step() returns the predicted sample at its next timestep: our StepDone k
    for k, (u, v) in enumerate(zip(ours, theirs)):
        rel = float((u - v).norm() / v.norm())
        assert rel < 1e-4, (k, rel)
    assert len(theirs) == steps


# ------------------------------------------------------------------------------- other samplers
@pytest.mark.parametrize("schedule", [DDPM_LINEAR, schedules.EDM(), schedules.RectifiedFlow(t_max=0.999)])
def test_em_step_is_first_order_consistent_with_exact_ancestral_step(schedule):
    """Euler–Maruyama and the exact posterior step differ by O(h^2) in every coefficient."""
    nodes = schedule.nodes(schedule.t_of_lambda(torch.tensor([0.3, 0.3 + 0.02, 0.3 + 0.01], dtype=F64)))
    s, t_big, t_small = nodes
    gaps = []
    for t in (t_big, t_small):
        h = t.lam - s.lam
        em, exact = em_step(s, t), ddpm_step(s, t)
        gaps.append((abs(em.a - exact.a), abs(em.d[0] - exact.d[0]), abs(em.noise**2 - exact.noise**2), h))
    for k in range(3):
        assert 1.8 < math.log2(gaps[0][k] / gaps[1][k]) < 2.2, gaps


def _gaussian_moment_errors(solver, nfe, **kw):
    gm = testbeds.Gaussian(mean=0.3, std=0.5, dim=8)
    noise = torch.randn(20000, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
    x = fewstep.sample(gm.model(schedules.LinearVP()), noise, solver=solver, nfe=nfe,
                       generator=torch.Generator().manual_seed(1), **kw)
    return float(x.mean()) - 0.3, float(x.std()) - 0.5


def test_ddpm_and_em_are_weakly_first_order_on_a_gaussian():
    # measured std errors: ddpm -0.045, -0.024, -0.012 at NFE 50, 100, 200; em +0.0103, +0.0044 at 50, 100
    ddpm = [_gaussian_moment_errors("ddpm", n) for n in (50, 100, 200)]
    for (_, e1), (_, e2) in zip(ddpm, ddpm[1:]):
        assert 1.6 < e1 / e2 < 2.5, ddpm
    em = [_gaussian_moment_errors("em", n) for n in (50, 100)]
    assert 1.6 < em[0][1] / em[1][1] < 3.0, em
    assert all(abs(m) < 0.015 for m, _ in ddpm + em)


@pytest.mark.parametrize("nfe,kw", [(50, {}), (100, {"tau": 1.0})])
def test_sa_samples_a_gaussian_accurately(nfe, kw):
    mean_err, std_err = _gaussian_moment_errors("sa", nfe, **kw)
    assert abs(mean_err) < 0.005 and abs(std_err) < 0.004  # measured |errors| <= 0.0011


def test_ddpm_eta0_is_ddim():
    gm = testbeds.mixtures()["gmm2d"]
    model = gm.model(DDPM_LINEAR)
    noise = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    a = fewstep.sample(model, noise, solver="ddpm", nfe=10, eta=0.0)
    b = fewstep.sample(model, noise, solver="ddim", nfe=10)
    assert float((a - b).abs().max()) < 1e-12


# --------------------------------------------------------------------------- noise: invariance
@pytest.mark.parametrize("solver,kw", [("sa", {}), ("sa", {"tau": 1.0, "order": 3}), ("ddpm", {}), ("em", {}),
                                       ("sa", {"brownian": True}), ("em", {"brownian": True})])
def test_batch_invariance_with_per_sample_generators(solver, kw):
    gm = testbeds.mixtures()["gmm16"]
    model = gm.model(DDPM_LINEAR)
    noise = torch.randn(8, gm.dim, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(100 + i) for i in range(8)]
    batch = fewstep.sample(model, noise, solver=solver, nfe=10, generator=gens, **kw)
    for i in (0, 5, 7):
        alone = fewstep.sample(model, noise[i:i + 1], solver=solver, nfe=10,
                               generator=[torch.Generator().manual_seed(100 + i)], **kw)
        assert float((batch[i:i + 1] - alone).abs().max()) < 1e-5


@pytest.mark.parametrize("solver,kw", [("ddpm", {}), ("sa", {"tau": 1.0}), ("em", {})])
def test_brownian_noise_keeps_nfe20_and_nfe40_close(solver, kw):
    gm = testbeds.mixtures()["gmm16"]
    model = gm.model(DDPM_LINEAR)
    noise = torch.randn(64, gm.dim, dtype=F64, generator=torch.Generator().manual_seed(0))
    gap = {}
    for brownian in (False, True):
        xs = [fewstep.sample(model, noise, solver=solver, nfe=n, generator=torch.Generator().manual_seed(3),
                             brownian=brownian, **kw) for n in (20, 40)]
        gap[brownian] = float((xs[0] - xs[1]).pow(2).mean().sqrt())
    # measured ratios 0.39-0.47; independent draws per step decorrelate the two runs
    assert gap[True] < 0.6 * gap[False], gap


def test_brownian_tree_is_a_brownian_motion():
    tree = BrownianTree(seed=11, shape=(40000,), dtype=F64)
    points = [0.0, 0.1, 0.37, 0.5, 0.93, 1.0]
    values = [tree.value(u) for u in points]
    increments = [(values[k + 1] - values[k]) / math.sqrt(points[k + 1] - points[k]) for k in range(len(points) - 1)]
    for z in increments:
        assert abs(float(z.mean())) < 0.02
        assert abs(float(z.var()) - 1.0) < 0.03
    for z1, z2 in zip(increments, increments[1:]):
        assert abs(float((z1 * z2).mean())) < 0.02  # independent increments
    # a value depends only on the seed and the point, not on the order of queries
    fresh = BrownianTree(seed=11, shape=(40000,), dtype=F64)
    assert torch.equal(fresh.value(0.37), values[2])
    assert torch.equal(fresh.value(0.1), values[1])


def test_noise_source_brownian_positions_and_errors():
    sch = DDPM_LINEAR
    times = fewstep.grids.make("logsnr", sch, 5)
    pos = lambda_positions(sch, times)
    assert pos[0] == 0.0 and pos[-1] == 1.0 and pos[-2] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(pos[:-2], pos[1:-1]))
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="one generator per sample"):
        NoiseSource(x, [torch.Generator()] * 2)
    with pytest.raises(TypeError, match="generator"):
        NoiseSource(x, "seed")
    with pytest.raises(ValueError, match="brownian: needs"):
        NoiseSource(x, brownian=True)
    z = NoiseSource(x, torch.Generator().manual_seed(0), times=times, schedule=sch, brownian=True)(1)
    assert z.shape == (3, 2)


# --------------------------------------------------------------------------------- coefficients
@pytest.mark.parametrize("a,h", [(1.0, 1e-3), (2.0, 0.3), (1.25, 1.7), (2.0, 6.0)])
def test_sa_weights_match_gauss_legendre_integrals(a, h):
    s, t = DDPM_LINEAR.nodes(DDPM_LINEAR.t_of_lambda(torch.tensor([-1.0, -1.0 + h], dtype=F64)))
    tau = math.sqrt(a - 1.0)
    past = [s] + list(DDPM_LINEAR.nodes(DDPM_LINEAR.t_of_lambda(torch.tensor([-1.0 - 0.7 * h * k for k in (1, 2, 3)],
                                                                             dtype=F64))))
    for m in (1, 2, 3, 4):
        step = sa_step(s, t, tau, past[:m], corrector=False, rescale=False)
        lam = [p.lam for p in past[:m]]
        ref = a * t.alpha * lagrange_weights(lam, s.lam, t.lam, kernel=lambda u: np.exp(a * (u - t.lam)))
        assert np.allclose(step.d, ref, rtol=1e-10, atol=1e-14 * t.alpha), (m, step.d, ref)
        assert step.a == pytest.approx(t.sigma / s.sigma * math.exp(-(a - 1) * h), rel=1e-14)
        assert step.noise == pytest.approx(t.sigma * math.sqrt(1 - math.exp(-2 * (a - 1) * h)), rel=1e-12)
    assert exp_moments(a, math.inf, 2) == pytest.approx([1 / a, -1 / a**2, 2 / a**3])


def test_sa_orders_follow_diffusers_warmup_and_final_rules():
    grid = DDPM_LINEAR.nodes(fewstep.grids.make("logsnr", DDPM_LINEAR, 6))
    pred, corr = sa_orders(grid, 3, 4, lower_order_final=True)
    assert pred == [1, 2, 3, 2, 1, 1]
    assert corr == [0, 2, 3, 4, 3, 0]
    pred, corr = sa_orders(grid, 3, 4, lower_order_final=False)
    assert pred == [1, 2, 3, 3, 3, 1]
    assert corr == [0, 2, 3, 4, 4, 0]
    flow = schedules.RectifiedFlow()
    pred, corr = sa_orders(flow.nodes(fewstep.grids.make("logsnr", flow, 5)), 2, 2, lower_order_final=False)
    assert pred == [1, 1, 2, 2, 1] and corr == [0, 1, 2, 2, 0]  # the pure-noise node is never interpolated


def test_sa_on_a_flow_from_pure_noise_converges():
    gm = testbeds.Gaussian(mean=0.3, std=0.5, dim=3)
    sch = schedules.RectifiedFlow()
    noise = torch.randn(8, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    target = gm.denoise(gm.reference(noise, sch, t_end=sch.t_min), sch, sch.t_min)
    err = [float((fewstep.sample(gm.model(sch, prediction="flow"), noise, solver="sa", nfe=n, tau=0.0) - target).abs().max())
           for n in (20, 40)]
    assert err[1] < 0.3 * err[0] and err[1] < 5e-3


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "solver,kw,match",
    [
        ("sa", {"predictor_order": 5}, "predictor_order"),
        ("sa", {"corrector_order": -1}, "corrector_order"),
        ("sa", {"order": 5}, "order"),
        ("sa", {"tau": -1.0}, "tau"),
        ("sa", {"tau": "high"}, "tau"),
        ("sa", {"tau": (1.0, 800.0, 200.0)}, "tau"),
        ("sa", {"lower_order_final": "yes"}, "lower_order_final"),
        ("sa", {"brownian": 1}, "brownian"),
        ("ddpm", {"eta": 1.5}, "eta"),
        ("em", {"order": 2}, "valid options"),
    ],
)
def test_bad_options_raise_value_error_naming_them(solver, kw, match):
    with pytest.raises(ValueError, match=match):
        get(solver, **kw)


def test_bad_tau_callable_is_named_at_prepare():
    gm = testbeds.mixtures()["gmm2d"]
    noise = torch.randn(2, 2)
    with pytest.raises(ValueError, match=r"tau: must give a finite number >= 0, got -1.0 at t="):
        fewstep.sample(gm.model(DDPM_LINEAR), noise, solver="sa", nfe=5, tau=lambda t: -1.0)


def test_tau_forms_agree():
    """A constant, a callable, a window tuple and the DiscreteVP default give the plans they should."""
    times = fewstep.grids.make("uniform", DDPM_LINEAR, 11)  # 999, 899.1, ..., 0
    window = get("sa", tau=(1.0, 200.0, 800.0)).prepare(DDPM_LINEAR, times)
    default = get("sa").prepare(DDPM_LINEAR, times)
    func = get("sa", tau=lambda t: 1.0 if 200 <= t <= 800 else 0.0).prepare(DDPM_LINEAR, times)
    noisy = [p.noise > 0 for p in default.predictors]
    assert noisy == [200 <= float(t) <= 800 for t in times]
    for plan in (window, func):
        assert [p.noise for p in plan.predictors] == [p.noise for p in default.predictors]
    const = get("sa", tau=0.0).prepare(DDPM_LINEAR, times)
    assert all(p.noise == 0.0 for p in const.predictors)
    with pytest.raises(ValueError, match="noise: sa draws noise"):
        get("sa").run(default, torch.zeros(1, 2), None)
