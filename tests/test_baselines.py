"""Baseline solvers (dpm++, unipc, deis, ipndm, heun): parity with diffusers and with the reference
algorithms, measured orders of convergence, order rules, and option validation."""
import math

import pytest
import torch

import fewstep
from fewstep import grids, schedules, testbeds
from fewstep.bench.peers import make_scheduler, run_scheduler
from fewstep.solvers.multistep import phi

F64 = torch.float64


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------ diffusers parity
@pytest.fixture(scope="module")
def vp():
    """diffusers' "linear" betas, the 16-D mixture as an eps network, float64 noise."""
    sch = schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000))
    model = testbeds.mixtures()["gmm16"].model(sch, "eps")
    noise = torch.randn(16, 16, dtype=F64, generator=torch.Generator().manual_seed(0))
    return sch, model, noise


def diffusers_states(scheduler, model, noise, steps, float64_sigmas=None):
    """Run a diffusers scheduler and keep every state (run_scheduler keeps only the last).

    ``float64_sigmas="zero"|"sigma_min"`` replaces diffusers' float32 sigma table by the exact one, to
    separate our arithmetic from diffusers' float32 rounding.
    """
    scheduler.set_timesteps(steps)
    if float64_sigmas is not None:
        ac = model.schedule.alphas_cumprod
        sig = ((1 - ac) / ac).sqrt()
        last = torch.zeros(1, dtype=F64) if float64_sigmas == "zero" else sig[:1]
        scheduler.sigmas = torch.cat([sig[scheduler.timesteps], last])
    x = noise * scheduler.init_noise_sigma
    states = [x]
    for t in scheduler.timesteps:
        out = model.raw(x, torch.full((x.shape[0],), float(t), dtype=F64), model.cond)
        x = scheduler.step(out, t, x).prev_sample
        states.append(x)
    return states


# explicit, non-uniform integer timesteps: past step ratios r != 1 exercise every multistep weight
CUSTOM = [999, 961, 900, 820, 700, 560, 420, 300, 200, 120, 60, 25, 8]


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("timesteps", ["linspace10", "linspace20", "custom13"])
def test_dpmpp_matches_diffusers(vp, order, timesteps):
    sch, model, noise = vp
    scheduler = make_scheduler("DPMSolverMultistepScheduler", model, solver_order=order,
                               algorithm_type="dpmsolver++", solver_type="midpoint", final_sigmas_type="zero")
    if timesteps == "custom13":
        ts = CUSTOM
    else:
        scheduler.set_timesteps(int(timesteps[8:]))
        ts = scheduler.timesteps.tolist()
    theirs = run_scheduler(scheduler, model, noise, timesteps=ts)
    ours = fewstep.sample(model, noise, solver="dpm++", grid=torch.tensor(ts, dtype=F64), order=order)
    # diffusers steps in float32 (it upcasts the sample), which bounds the agreement (measured 2e-7..7e-7)
    assert rel(ours, theirs) <= 1e-5


@pytest.mark.parametrize("corrector", [True, False])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [10, 20])
def test_unipc_bh2_matches_diffusers(vp, order, steps, corrector):
    sch, model, noise = vp
    off = {} if corrector else {"disable_corrector": list(range(steps))}
    scheduler = make_scheduler("UniPCMultistepScheduler", model, solver_order=order, solver_type="bh2",
                               final_sigmas_type="zero", **off)
    theirs = run_scheduler(scheduler, model, noise, num_inference_steps=steps)
    grid = scheduler.timesteps.to(F64)
    ours = fewstep.sample(model, noise, solver="unipc", grid=grid, order=order, variant="bh2", corrector=corrector)
    assert rel(ours, theirs) <= 1e-5


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_is_diffusers_to_rounding_with_exact_sigmas(vp, variant, order):
    """With diffusers' sigma table in float64 the two agree to 1e-12 at every step."""
    sch, model, noise = vp
    scheduler = make_scheduler("UniPCMultistepScheduler", model, solver_order=order, solver_type=variant,
                               final_sigmas_type="zero")
    states = diffusers_states(scheduler, model, noise, 10, float64_sigmas="zero")
    ours = []
    out = fewstep.sample(model, noise, solver="unipc", grid=scheduler.timesteps.to(F64), order=order,
                         variant=variant, callback=lambda d: ours.append(d["x"]))
    for k in range(len(ours) - 1):  # states entering each step (before its corrector)
        assert rel(ours[k], states[k + 1]) <= 1e-12, k
    # the final step returns the last data prediction; diffusers' bh1 returns NaN there
    # (B(h) = -h = -inf times a zero residual), so compare with the x0 view instead
    t_last = float(scheduler.timesteps[-1])
    assert rel(out, model.x0(states[-2], t_last)) <= 1e-12
    if variant == "bh2":
        assert rel(out, states[-1]) <= 1e-12


def test_unipc_bh1_matches_diffusers_until_its_nan_final_step(vp):
    sch, model, noise = vp
    scheduler = make_scheduler("UniPCMultistepScheduler", model, solver_order=3, solver_type="bh1",
                               final_sigmas_type="zero")
    states = diffusers_states(scheduler, model, noise, 20)
    ours = []
    out = fewstep.sample(model, noise, solver="unipc", grid=scheduler.timesteps.to(F64), order=3, variant="bh1",
                         callback=lambda d: ours.append(d["x"]))
    assert rel(ours[-2], states[-2]) <= 1e-5
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_matches_diffusers(vp, order):
    """diffusers' DEIS ends at sigma_min (no final_sigmas_type): run ours on its timesteps plus t = 0
    and compare the state at t = 0, before our final denoising step. 20 steps, so that neither side
    lowers the order of its last steps."""
    sch, model, noise = vp
    scheduler = make_scheduler("DEISMultistepScheduler", model, solver_order=order)
    exact = diffusers_states(scheduler, model, noise, 20, float64_sigmas="sigma_min")
    shipped = diffusers_states(make_scheduler("DEISMultistepScheduler", model, solver_order=order), model, noise, 20)
    grid = torch.cat([scheduler.timesteps.to(F64), torch.zeros(1, dtype=F64)])
    ours = []
    fewstep.sample(model, noise, solver="deis", grid=grid, order=order, callback=lambda d: ours.append(d["x"]))
    assert rel(ours[-2], exact[-1]) <= 1e-12
    # diffusers' third-order weights cancel in float32 (measured 1.7e-5); lower orders agree to 1e-6
    assert rel(ours[-2], shipped[-1]) <= (1e-4 if order == 3 else 1e-5)


def test_unip2_without_corrector_is_dpmpp_2m(vp):
    sch, model, noise = vp
    grid = torch.tensor(CUSTOM, dtype=F64)
    a = fewstep.sample(model, noise, solver="unipc", grid=grid, order=2, corrector=False)
    b = fewstep.sample(model, noise, solver="dpmpp", grid=grid, order=2)
    assert rel(a, b) <= 1e-13


# ------------------------------------------------------------- reference algorithms (k-diffusion)
@pytest.fixture(scope="module")
def edm():
    sch = schedules.EDM()
    model = testbeds.mixtures()["gmm16"].model(sch, "x0")
    noise = torch.randn(8, 16, dtype=F64, generator=torch.Generator().manual_seed(1))
    return sch, model, noise


def karras_heun(model, x, sigmas):
    """Karras et al. 2022, Algorithm 1 (alpha = 1), the final step to sigma = 0 being Euler."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - model.x0(x, s)) / s
        x_euler = x + (s_next - s) * d
        if s_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - model.x0(x_euler, s_next)) / s_next
            x = x + (s_next - s) * (d + d_next) / 2
    return x


def kdiffusion_ipndm(model, x, sigmas, max_order=4):
    """k-diffusion's ``sample_ipndm``: fixed Adams-Bashforth weights, a denoising final step."""
    weights = {1: [1], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    buffer = []
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model.x0(x, s)
        d = (x - denoised) / s
        buffer.insert(0, d)
        if s_next == 0:
            return denoised
        order = min(max_order, i + 1)
        x = x + (s_next - s) * sum(w * b for w, b in zip(weights[order], buffer))
    return x


def test_heun_is_karras_algorithm_1(edm):
    sch, model, noise = edm
    grid = grids.karras(sch, 9)
    model.reset_counters()
    ours, info = fewstep.sample(model, noise, solver="heun", grid=grid, return_info=True)
    assert info.nfe == 2 * 9 - 1
    ref = karras_heun(model, noise * sch.initial_scale, grid.tolist() + [0.0])
    assert rel(ours, ref) <= 1e-12


@pytest.mark.parametrize("nfe, points", [(1, 1), (2, 1), (3, 2), (10, 5), (19, 10)])
def test_heun_spends_two_evaluations_per_step_within_budget(edm, nfe, points):
    sch, model, noise = edm
    solver = fewstep.solvers.get("heun")
    assert solver.num_points(nfe) == points and solver.nfe_for_points(points) == 2 * points - 1
    assert solver.evals_per_step() == "2"
    _, info = fewstep.sample(model, noise, solver="heun", nfe=nfe, return_info=True)
    assert info.nfe == 2 * points - 1 <= nfe
    assert len(info.grid) == points


def test_ipndm_fixed_weights_are_kdiffusion(edm):
    sch, model, noise = edm
    grid = grids.karras(sch, 10)
    ours = fewstep.sample(model, noise, solver="ipndm", grid=grid, variable_step=False)
    ref = kdiffusion_ipndm(model, noise * sch.initial_scale, grid.tolist() + [0.0])
    assert rel(ours, ref) <= 1e-12


def test_ipndm_variable_weights_reduce_to_fixed_ones_on_a_uniform_grid(edm):
    """On a grid uniform in sigma/alpha the exact Lagrange integrals are the classic AB weights."""
    sch, model, noise = edm
    grid = torch.linspace(80.0, 2.0, 12, dtype=F64)
    a = fewstep.sample(model, noise, solver="ipndm", grid=grid, variable_step=True)
    b = fewstep.sample(model, noise, solver="ipndm", grid=grid, variable_step=False)
    assert rel(a, b) <= 1e-12
    # and they differ on a non-uniform grid
    k = grids.karras(sch, 12)
    assert rel(fewstep.sample(model, noise, solver="ipndm", grid=k),
               fewstep.sample(model, noise, solver="ipndm", grid=k, variable_step=False)) > 1e-4


# ----------------------------------------------------------------------------- orders of convergence
# (solver, options, theoretical global order). Notes, see docs/algorithms/baselines.md:
# * dpm++ order 3 with the published/diffusers weights is second order (its D2 weight is half the
#   Taylor one); third_order="taylor" is third order.
# * UniPC-p with UniC is order p + 1 for p = 1, 2; for p = 3 it is 3: as diffusers, the step before
#   the final jump is UniP-2 (lower_order_final) and the output is the data prediction evaluated at
#   that uncorrected point, so UniC's extra order never reaches the output.
# * every multistep method here starts with a first-order step (local error C h^2), so as h -> 0 all
#   of them end at global order 2; starting at high noise makes C tiny, and 96-192 points are still
#   far from that floor.
ORDER_CASES = [
    ("ddim", {}, 1),
    ("heun", {}, 2),
    ("dpm++", {"order": 1}, 1),
    ("dpm++", {"order": 2}, 2),
    ("dpm++", {"order": 3}, 2),
    ("dpm++", {"order": 3, "third_order": "taylor"}, 3),
    ("unipc", {"order": 1}, 2),
    ("unipc", {"order": 2}, 3),
    ("unipc", {"order": 3}, 3),
    ("unipc", {"order": 2, "variant": "bh1"}, 3),
    ("unipc", {"order": 3, "variant": "bh1"}, 3),
    ("unipc", {"order": 1, "corrector": False}, 1),
    ("unipc", {"order": 2, "corrector": False}, 2),
    ("unipc", {"order": 3, "corrector": False}, 3),
    ("deis", {"order": 1}, 1),
    ("deis", {"order": 2}, 2),
    ("deis", {"order": 3}, 3),
    ("ipndm", {"order": 1}, 1),
    ("ipndm", {"order": 2}, 2),
    ("ipndm", {"order": 3}, 3),
    ("ipndm", {"order": 4}, 4),
    # the classic fixed Adams-Bashforth weights assume equal steps in sigma/alpha; a log-SNR grid has
    # geometric ones, and the fixed weights fall back to second order
    ("ipndm", {"order": 4, "variable_step": False}, 2),
]

# A 1-D two-component mixture: its data prediction is a generic nonlinear function of lambda. (A
# single Gaussian has a linear flow whose leading error constants reduce to boundary terms that
# nearly cancel for some end points, which makes measured slopes jump by one order.) The grids stop
# at a moderate noise level so that the derivatives do not vanish at the end either.
ORDER_SCHEDULES = {"edm": lambda: schedules.EDM(sigma_min=0.3), "linear_vp": lambda: schedules.LinearVP(t_min=0.2)}


@pytest.fixture(scope="module", params=sorted(ORDER_SCHEDULES))
def order_setup(request):
    sch = ORDER_SCHEDULES[request.param]()
    gm = testbeds.GaussianMixture([[1.0], [-1.0]], [0.3, 0.7], 0.5)
    noise = torch.randn(8, 1, dtype=F64, generator=torch.Generator().manual_seed(0))
    # solvers return the data prediction at the last grid point, t_min: compare with the exact one there
    target = gm.denoise(gm.reference(noise, sch, t_end=sch.t_min), sch, sch.t_min)
    return gm.model(sch, "eps"), noise, target


@pytest.mark.parametrize("name, options, order", ORDER_CASES,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o, _ in ORDER_CASES])
def test_measured_order_of_convergence(order_setup, name, options, order):
    model, noise, target = order_setup
    solver = fewstep.solvers.get(name, **options)
    # 96 -> 192 grid points: past the pre-asymptotic wobble, errors still far above float64 noise
    errors, nfes = [], []
    for points in (96, 192):
        nfe = solver.nfe_for_points(points)
        out, info = fewstep.sample(model, noise, solver=solver, nfe=nfe, grid="logsnr", return_info=True)
        errors.append(rel(out, target))
        nfes.append(info.nfe)
    assert min(errors) > 1e-10
    slope = -math.log(errors[1] / errors[0]) / math.log(nfes[1] / nfes[0])
    assert abs(slope - order) <= 0.3, (slope, errors)


# ------------------------------------------------------------------------------------ order rules
def step_orders(solver, n, schedule=None):
    schedule = schedule or schedules.EDM()
    plan = solver.prepare(schedule, grids.logsnr(schedule, n))
    return [len(p.d) for p in plan.predictors]


def test_dpmpp_order_rule_is_diffusers():
    s3 = fewstep.solvers.get("dpm++", order=3)
    # warm-up, lower_order_final below 15 steps, first-order final step to zero noise
    assert step_orders(s3, 10) == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert step_orders(s3, 16) == [1, 2] + [3] * 13 + [1]
    assert step_orders(fewstep.solvers.get("dpm++"), 6) == [1, 2, 2, 2, 2, 1]
    assert step_orders(s3, 1) == [1]


def test_unipc_order_rule_is_diffusers():
    s3 = fewstep.solvers.get("unipc", order=3)
    plan = s3.prepare(schedules.EDM(), grids.logsnr(schedules.EDM(), 8))
    # predictors: min(order, steps left, steps done + 1)
    assert [len(p.d) for p in plan.predictors] == [1, 2, 3, 3, 3, 3, 2, 1]
    # corrector at node i: the previous predictor's order, over that many + 1 predictions; none at node 0
    assert plan.correctors[0] is None
    assert [len(c.d) for c in plan.correctors[1:]] == [2, 3, 4, 4, 4, 4, 3]
    assert plan.history == 4
    off = fewstep.solvers.get("unipc", order=3, corrector=False).prepare(schedules.EDM(), grids.logsnr(schedules.EDM(), 8))
    assert all(c is None for c in off.correctors)


def test_pure_noise_start_is_not_used_as_a_past_point():
    """A flow grid starting at t = 1 (lambda = -inf): dpm++ and unipc still work, from an x0 network."""
    sch = schedules.RectifiedFlow()
    gm = testbeds.mixtures()["gmm16"]
    model = gm.model(sch, "x0")
    noise = torch.randn(8, 16, dtype=F64, generator=torch.Generator().manual_seed(2))
    ref = gm.reference(noise, sch)
    for name, opts in [("dpm++", {"order": 3}), ("unipc", {"order": 3}), ("unipc", {"order": 2, "variant": "bh1"})]:
        solver = fewstep.solvers.get(name, **opts)
        assert step_orders(solver, 6, sch)[:3] == [1, 1, 2]
        errors = [rel(fewstep.sample(model, noise, solver=solver, nfe=n), ref) for n in (20, 40)]
        assert errors[1] < errors[0] / 4, (name, errors)


@pytest.mark.parametrize("name", ["deis", "ipndm", "heun"])
def test_solvers_in_sigma_over_alpha_reject_a_pure_noise_start(name):
    sch = schedules.RectifiedFlow()
    model = testbeds.mixtures()["gmm16"].model(sch, "x0")
    noise = torch.randn(2, 16, dtype=F64)
    with pytest.raises(ValueError, match=rf"grid: {name} integrates in x/alpha.*t_max=0.999"):
        fewstep.sample(model, noise, solver=name, nfe=6)


# ------------------------------------------------------------------------------------ coefficients
@pytest.mark.parametrize("z", [-40.0, -3.0, -1.0, -0.3, -1e-3, 0.0, 1e-3, 0.5, 2.0])
def test_phi_functions(z):
    """phi_k(z) = int_0^1 e^{(1-u) z} u^{k-1} / (k-1)! du, checked by quadrature (independent of the
    series and the recurrence the implementation uses)."""
    from scipy.integrate import quad

    assert phi(0, z) == pytest.approx(math.exp(z), rel=1e-15)
    for k in range(1, 5):
        want = quad(lambda u: math.exp((1 - u) * z) * u ** (k - 1) / math.factorial(k - 1), 0, 1,
                    epsabs=0, epsrel=1e-13, limit=200)[0]
        assert phi(k, z) == pytest.approx(want, rel=1e-11)
    assert phi(3, -math.inf) == 0.0


# -------------------------------------------------------------------------------------- bad options
@pytest.mark.parametrize(
    "name, options, match",
    [
        ("dpm++", {"order": 4}, r"order: dpm\+\+ supports orders \[1, 2, 3\], got 4"),
        ("dpm++", {"order": 2.0}, r"order: dpm\+\+ supports orders"),
        ("dpm++", {"third_order": "exact"}, r"third_order: dpm\+\+ accepts \['reference', 'taylor'\], got 'exact'"),
        ("dpm++", {"variant": "bh2"}, r"dpm\+\+: unknown option\(s\) \['variant'\]"),
        ("unipc", {"order": 0}, r"order: unipc supports orders \[1, 2, 3\], got 0"),
        ("unipc", {"variant": "bh3"}, r"variant: unipc accepts \['bh1', 'bh2'\], got 'bh3'"),
        ("unipc", {"corrector": "yes"}, r"corrector: unipc accepts True or False, got 'yes'"),
        ("unipc", {"predict_x0": True}, r"unipc: unknown option\(s\) \['predict_x0'\]"),
        ("deis", {"order": 4}, r"order: deis supports orders \[1, 2, 3\], got 4"),
        ("ipndm", {"order": 5}, r"order: ipndm supports orders \[1, 2, 3, 4\], got 5"),
        ("ipndm", {"variable_step": 1}, r"variable_step: ipndm accepts True or False, got 1"),
        ("heun", {"order": 2}, r"heun: unknown option\(s\) \['order'\]"),
    ],
)
def test_bad_options_name_the_option(name, options, match):
    with pytest.raises(ValueError, match=match):
        fewstep.solvers.get(name, **options)


def test_registered_names_and_table_rows():
    names = fewstep.solvers.available()
    for name in ["dpm++", "dpmpp", "unipc", "deis", "ipndm", "heun"]:
        assert name in names
    rows = {r["name"]: r for r in fewstep.solvers.table()}
    assert rows["heun"]["nfe_per_step"] == "2" and rows["heun"]["orders"] == "2"
    assert rows["dpm++"]["orders"] == "1-3" and rows["ipndm"]["orders"] == "1-4"
    assert rows["dpm++"]["aliases"] == "dpmpp"
