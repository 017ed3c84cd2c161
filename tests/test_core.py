"""Schedules, grids, the model wrapper, the driver and the exact testbeds."""
import math

import pytest
import torch

import fewstep
from fewstep import grids, schedules, testbeds
from fewstep.model import view_coefficients
from fewstep.sample import FiniteGuard

F64 = torch.float64


def all_schedules():
    return [
        schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000)),
        schedules.DiscreteVP.scaled_linear(),
        schedules.LinearVP(),
        schedules.CosineVP(),
        schedules.EDM(),
        schedules.RectifiedFlow(t_max=0.999),
    ]


SCHEDULE_IDS = ["discrete-linear", "discrete-scaled", "linear-vp", "cosine-vp", "edm", "flow"]


# ----------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("sch", all_schedules(), ids=SCHEDULE_IDS)
def test_lambda_inverse_and_derivatives(sch):
    t = torch.linspace(sch.t_min, sch.t_max, 37, dtype=F64)
    back = sch.t_of_lambda(sch.lambda_(t))
    assert float((back - t).abs().max()) < 1e-9 * max(1.0, sch.t_max)
    # lambda decreases in t
    lam = sch.lambda_(t)
    assert bool((lam[1:] < lam[:-1]).all())
    # closed-form derivatives agree with central differences away from table knots
    tm = (t[1:-1] + 0.37 * (t[2:] - t[1:-1])).clone()
    h = 1e-6 * max(1.0, sch.t_max)
    fd_a = (sch.alpha(tm + h) - sch.alpha(tm - h)) / (2 * h)
    fd_s = (sch.sigma(tm + h) - sch.sigma(tm - h)) / (2 * h)
    assert torch.allclose(sch.dalpha(tm), fd_a, rtol=1e-5, atol=1e-8)
    assert torch.allclose(sch.dsigma(tm), fd_s, rtol=1e-5, atol=1e-8)


def test_discrete_vp_reproduces_table_and_vp_identity():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    ac = torch.cumprod(1 - betas, 0)
    sch = schedules.DiscreteVP.from_betas(betas)
    idx = torch.tensor([0.0, 1.0, 500.0, 999.0], dtype=F64)
    assert torch.allclose(sch.alpha(idx) ** 2, ac[idx.long()], rtol=1e-13)
    t = torch.linspace(0, 999, 101, dtype=F64)
    assert torch.allclose(sch.alpha(t) ** 2 + sch.sigma(t) ** 2, torch.ones_like(t), atol=1e-14)
    assert sch.model_time(torch.tensor(412.5)).item() == 412.5


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.tensor([0.9, 0.95, 0.5]), "strictly decreasing"),
        (torch.tensor([1.2, 0.5, 0.1]), r"\(0, 1\]"),
        (torch.tensor([0.9, 0.5, 0.0]), r"\(0, 1\]"),
        (torch.tensor([0.9, float("nan"), 0.1]), r"\(0, 1\]"),
        (torch.tensor([0.5]), "at least 2"),
    ],
)
def test_discrete_vp_rejects_bad_tables(bad, match):
    with pytest.raises(ValueError, match="alphas_cumprod.*" + match):
        schedules.DiscreteVP(bad)


def test_bad_betas_and_ranges():
    with pytest.raises(ValueError, match="betas"):
        schedules.DiscreteVP.from_betas(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="sigma_min"):
        schedules.EDM(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="t_min, t_max"):
        schedules.RectifiedFlow(t_min=0.5, t_max=0.2)


# -------------------------------------------------------------------------------------- grids
@pytest.mark.parametrize("sch", all_schedules(), ids=SCHEDULE_IDS)
@pytest.mark.parametrize("name", grids.NAMES)
def test_named_grids_span_the_range(sch, name):
    g = grids.make(name, sch, 12)
    assert g.shape == (12,) and g.dtype == F64
    assert g[0].item() == sch.t_max and g[-1].item() == sch.t_min
    assert bool((g[1:] < g[:-1]).all())


def test_logsnr_grid_is_uniform_in_lambda():
    sch = schedules.LinearVP()
    lam = sch.lambda_(grids.make("logsnr", sch, 9))
    d = lam[1:] - lam[:-1]
    assert float((d - d.mean()).abs().max()) < 1e-9


def test_karras_grid_matches_edm_formula():
    sch = schedules.EDM()
    g = grids.make("karras", sch, 5)
    ramp = torch.linspace(0, 1, 5, dtype=F64)
    want = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(g, want, rtol=1e-12)


def test_flow_logsnr_grid_starts_at_pure_noise():
    sch = schedules.RectifiedFlow()
    g = grids.make("logsnr", sch, 6)
    assert g[0].item() == 1.0 and g[-1].item() == sch.t_min


# -------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("pred", ["eps", "x0", "v", "flow"])
@pytest.mark.parametrize("sch", all_schedules(), ids=SCHEDULE_IDS)
def test_views_are_exact_linear_maps(pred, sch):
    gm = testbeds.mixtures()["gmm16"]
    model = gm.model(sch, prediction=pred)
    x = torch.randn(7, 16, dtype=F64, generator=torch.Generator().manual_seed(1))
    t = 0.3 * sch.t_min + 0.7 * sch.t_max * 0.5
    a, s = float(sch.alpha(t)), float(sch.sigma(t))
    x0_true, eps_true = gm.posterior(x, a, s)
    assert torch.allclose(model.x0(x, t), x0_true, atol=1e-9)
    assert torch.allclose(model.eps(x, t), eps_true, atol=1e-9)
    v = model.velocity(x, t)
    assert torch.allclose(v, float(sch.dalpha(t)) * x0_true + float(sch.dsigma(t)) * eps_true, atol=1e-8)


@pytest.mark.parametrize("pred", ["eps", "x0", "v", "flow"])
def test_scaled_views_equal_views(pred):
    # Evaluate(scaled=True) answers (u, s) with view = s * u; run_multistep folds s into its weights
    sch = schedules.EDM()
    model = testbeds.mixtures()["gmm16"].model(sch, prediction=pred)
    x = torch.randn(5, 16, dtype=F64, generator=torch.Generator().manual_seed(2))
    nodes = [sch.node(t) for t in (0.05, 1.0, 40.0)]
    for view in ("x0", "eps", "velocity"):
        plain = model.evaluate([x] * 3, nodes, view)
        scaled = model.evaluate([x] * 3, nodes, view, scaled=True)
        for p, (u, s) in zip(plain, scaled):
            assert isinstance(s, float)
            assert torch.allclose(u * s, p, rtol=1e-12, atol=1e-12)


def test_repeated_calls_reuse_the_plan_and_give_the_same_bits():
    sch = schedules.EDM()
    model = testbeds.Gaussian(0.3, 0.5, dim=3).model(sch)
    noise = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    first = fewstep.sample(model, noise, solver="dpm++", nfe=7)
    again = fewstep.sample(model, noise, solver="dpm++", nfe=7)
    other = fewstep.sample(model, noise, solver="dpm++", nfe=8)  # another budget: another plan
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_view_coefficient_identities():
    sch = schedules.CosineVP()
    node = sch.node(0.4)
    for pred in ["eps", "x0", "v", "flow"]:
        cx0, co0 = view_coefficients(pred, "x0", node)
        cxe, coe = view_coefficients(pred, "eps", node)
        # x = alpha*x0 + sigma*eps must hold for any output
        assert abs(node.alpha * cx0 + node.sigma * cxe - 1.0) < 1e-12
        assert abs(node.alpha * co0 + node.sigma * coe) < 1e-12


def test_eps_model_at_pure_noise_gives_clear_error():
    sch = schedules.RectifiedFlow()  # t_max = 1: alpha = 0
    model = testbeds.Gaussian(0.0, 1.0, dim=2).model(sch, prediction="eps")
    with pytest.raises(ValueError, match="cannot give the 'x0' view"):
        fewstep.sample(model, torch.randn(2, 2, dtype=F64), solver="ddim", nfe=4)


def test_model_rejects_bad_construction():
    sch = schedules.EDM()
    with pytest.raises(TypeError, match="net"):
        fewstep.Model(42, schedule=sch)
    with pytest.raises(ValueError, match="prediction"):
        fewstep.Model(lambda x, t: x, schedule=sch, prediction="score")
    with pytest.raises(TypeError, match="schedule"):
        fewstep.Model(lambda x, t: x, schedule="edm")
    assert fewstep.Model(lambda x, t: x, schedule=sch, prediction="v_prediction").prediction == "v"


def test_guidance_is_one_batched_call():
    sch = schedules.EDM()
    calls = []

    def net(x, sigma, label):
        calls.append(x.shape[0])
        return x * 0 + label[:, None].to(x.dtype)

    model = fewstep.Model(net, schedule=sch, prediction="x0")
    guided = model.guided(3.0, uncond={"label": torch.tensor([10])}, label=torch.tensor([1, 2]))
    x = torch.zeros(2, 4)
    out = guided.x0(x, 1.0)
    assert calls == [4]
    # uncond + 3 (cond - uncond) = 10 + 3 (c - 10)
    assert torch.allclose(out[:, 0], torch.tensor([10 + 3 * (1 - 10), 10 + 3 * (2 - 10)], dtype=out.dtype))
    assert guided.nfe == 1


# ---------------------------------------------------------------------------------- testbeds
@pytest.mark.parametrize("sch", all_schedules()[2:], ids=SCHEDULE_IDS[2:])
def test_gaussian_closed_form_matches_ode_reference(sch):
    g = testbeds.Gaussian(mean=[0.3, -0.2, 1.0], std=0.4)
    noise = torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    exact = g.reference(noise, sch)
    ode = testbeds.GaussianMixture.reference(g, noise, sch)
    assert float((exact - ode).abs().max()) < 1e-10
    # intermediate end times too
    t_mid = 0.5 * (sch.t_min + sch.t_max)
    assert float((g.reference(noise, sch, t_end=t_mid) -
                  testbeds.GaussianMixture.reference(g, noise, sch, t_end=t_mid)).abs().max()) < 1e-10


def test_mixture_reference_self_converges():
    gm = testbeds.mixtures()["gmm2d"]  # narrow components: the hardest trajectories
    sch = schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000))
    noise = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    a = gm.reference(noise, sch)
    b = gm.reference(noise, sch, rtol=1e-11, atol=1e-11)
    c = gm.reference(noise, sch, rtol=3e-14, atol=3e-14)
    # the default tolerance is already converged to far below 1e-10 ...
    assert float((a - c).abs().max()) < 1e-10
    # ... and the comparison is sensitive: a looser solve differs measurably
    assert float((b - c).abs().max()) > float((a - c).abs().max())


def test_mixture_samples_have_the_right_moments():
    gm = testbeds.GaussianMixture([[2.0, 0.0], [-2.0, 0.0]], [0.25, 0.75], [0.1, 0.3])
    x = gm.sample_data(20000, generator=torch.Generator().manual_seed(0))
    assert abs(float(x[:, 0].mean()) - (0.25 * 2 - 0.75 * 2)) < 0.05


# ------------------------------------------------------------------------------------ sample
def _gmm_model(pred="eps", sch=None):
    sch = sch or schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000))
    return testbeds.mixtures()["gmm16"].model(sch, prediction=pred)


def test_nfe_is_exactly_the_budget_and_info_is_returned():
    model = _gmm_model()
    noise = torch.randn(3, 16, dtype=F64)
    x, info = fewstep.sample(model, noise, solver="ddim", nfe=7, return_info=True)
    assert info.nfe == 7 and info.calls == 7 and len(info.grid) == 7
    assert x.shape == noise.shape and x.dtype == noise.dtype


def test_default_solver_runs_within_budget():
    model = _gmm_model()
    for nfe in (1, 2, 5, 10):
        _, info = fewstep.sample(model, torch.randn(2, 16, dtype=F64), nfe=nfe, return_info=True)
        assert info.nfe <= nfe


def test_default_truncates_the_schedule_only_at_few_steps():
    model = _gmm_model()
    sch = model.schedule
    noise = torch.randn(256, 16, dtype=F64, generator=torch.Generator().manual_seed(3))
    for nfe, lam in ((5, -3.24), (8, -3.24), (9, -4.1), (12, -4.1)):
        _, info = fewstep.sample(model, noise[:2], nfe=nfe, return_info=True)
        assert info.nfe == nfe
        assert float(sch.lambda_(torch.tensor(info.grid[0], dtype=F64))) == pytest.approx(lam, abs=1e-9)
    for nfe in (15, 20):
        _, info = fewstep.sample(model, noise[:2], nfe=nfe, return_info=True)
        assert info.grid[0] == pytest.approx(float(sch.t_max))
    # a schedule that already starts with more signal than the threshold is not truncated
    short = schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 300))
    _, info = fewstep.sample(_gmm_model(sch=short), noise[:2], nfe=5, return_info=True)
    assert info.grid[0] == pytest.approx(float(short.t_max))
    # and the truncation is what makes the default more accurate at few steps (measured on gmm16:
    # RMSE 0.099 against 0.132 at NFE 5 with the same solver and grid from t_max)
    ref = testbeds.mixtures()["gmm16"].reference(noise, sch)
    default = fewstep.sample(model, noise, nfe=5)
    full = fewstep.sample(model, noise, solver="fv", order=1, nfe=5, grid="quadratic-open")
    err = lambda x: float((x - ref).pow(2).mean().sqrt())
    assert err(default) < 0.85 * err(full)


def test_start_logsnr_truncates_any_solver_and_rejects_conflicts():
    model = _gmm_model()
    sch = model.schedule
    noise = torch.randn(2, 16, dtype=F64, generator=torch.Generator().manual_seed(4))
    x, info = fewstep.sample(model, noise, solver="dpm++", nfe=6, start_logsnr=-3.0, return_info=True)
    assert float(sch.lambda_(torch.tensor(info.grid[0], dtype=F64))) == pytest.approx(-3.0, abs=1e-9)
    assert torch.isfinite(x).all() and info.nfe == 6
    _, info = fewstep.sample(model, noise, nfe=6, start_logsnr=float("-inf"), return_info=True)
    assert info.grid[0] == pytest.approx(float(sch.t_max))  # the default, untruncated
    with pytest.raises(ValueError, match="start_logsnr"):
        fewstep.sample(model, noise, solver="ddim", grid=torch.tensor([900.0, 500.0]), start_logsnr=-3.0)
    with pytest.raises(ValueError, match="start_logsnr"):
        fewstep.sample(model, noise, solver="ddim", nfe=4, start=500.0, start_logsnr=-3.0)
    with pytest.raises(ValueError, match="start_logsnr"):
        fewstep.sample(model, noise, solver="ddim", nfe=4, start_logsnr=float("nan"))


def test_explicit_grid_and_callback():
    model = _gmm_model()
    grid = torch.tensor([999.0, 700.0, 400.0, 100.0, 0.0])
    seen = []
    fewstep.sample(model, torch.randn(2, 16, dtype=F64), solver="ddim", grid=grid,
                   callback=lambda d: seen.append((d["i"], d["t"], d["x"].shape, d["x0"].shape)))
    assert [s[0] for s in seen] == [0, 1, 2, 3, 4]
    assert [s[1] for s in seen] == [700.0, 400.0, 100.0, 0.0, 0.0]
    assert all(s[2] == (2, 16) and s[3] == (2, 16) for s in seen)


@pytest.mark.parametrize("solver, options", [("ddim", {}), ("unipc", {"order": 3}), ("heroism", {"order": 2})])
def test_quiet_stops_step_events_and_changes_no_bits(solver, options):
    # A driver without a callback answers StepDone with QUIET: the multistep loop then announces no
    # more steps (one generator round trip less per step); solvers that ignore it keep announcing.
    from fewstep.solvers.base import QUIET, Evaluate, StepDone

    model = _gmm_model()
    noise = torch.randn(3, 16, dtype=F64, generator=torch.Generator().manual_seed(4))
    slv = fewstep.solvers.get(solver, **options)
    times = grids.make("logsnr", model.schedule, slv.num_points(8))
    plan = slv.prepare(model.schedule, times)
    view = slv.view(plan)

    def drive(reply):  # answer every StepDone with `reply`; count them
        run, events, answer = slv.run(plan, noise * model.schedule.initial_scale, None), 0, None
        while True:
            try:
                msg = run.send(answer)  # the first send(None) starts the generator
            except StopIteration as stop:
                return stop.value, events
            is_request = type(msg) is Evaluate
            events += type(msg) is StepDone
            answer = model.evaluate(msg.xs, msg.nodes, view, scaled=msg.scaled) if is_request else reply

    loud, n_loud = drive(None)
    quiet, n_quiet = drive(QUIET)
    assert torch.equal(loud, quiet)
    assert n_loud >= 4
    assert n_quiet == (1 if solver != "heroism" else n_loud)
    with_callback = fewstep.sample(model, noise, solver=solver, nfe=8, grid="logsnr", callback=lambda d: None,
                                   **options)
    assert torch.equal(with_callback, fewstep.sample(model, noise, solver=solver, nfe=8, grid="logsnr", **options))


def test_progress_bar_counts_evaluations():
    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    fewstep.sample(_gmm_model(), torch.randn(2, 16, dtype=F64), solver="ddim", nfe=6, progress=bar)
    assert bar.n == 6


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(solver="nope", nfe=5), ValueError, r"solver: unknown name 'nope'; valid: \[.*'ddim'"),
        (dict(solver="ddim", nfe=0), ValueError, "nfe: must be >= 1"),
        (dict(solver="ddim", nfe=2.5), TypeError, "nfe: expected an integer"),
        (dict(solver="ddim", nfe=5, grid="cosine"), ValueError, "grid: unknown name 'cosine'"),
        (dict(solver="ddim", grid=torch.tensor([100.0, 500.0])), ValueError, "strictly decreasing"),
        (dict(solver="ddim", grid=torch.tensor([1500.0, 500.0])), ValueError, r"range \[0, 999\]"),
        (dict(solver="ddim", grid=torch.tensor([[900.0, 500.0]])), ValueError, "1-D"),
        (dict(solver="ddim", grid=torch.tensor([900.0, float("nan")])), ValueError, "finite"),
        (dict(solver="ddim", nfe=5, bogus=1), ValueError, r"ddim: unknown option\(s\) \['bogus'\]"),
        (dict(solver="ddim", nfe=2, grid=torch.tensor([999.0, 500.0, 0.0])), ValueError, "more than nfe=2"),
        (dict(solver="ddim"), ValueError, "nfe: required"),
        (dict(nfe=None), ValueError, "nfe: required"),
        (dict(solver=3, nfe=4), TypeError, "solver: expected a name"),
        (dict(solver="ddim", nfe=4, progress="yes"), TypeError, "progress"),
        (dict(solver="ddim", nfe=4, state_dtype=torch.int32), TypeError, "state_dtype"),
    ],
)
def test_bad_sampling_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fewstep.sample(_gmm_model(), torch.randn(2, 16, dtype=F64), **kwargs)


def test_bad_noise():
    model = _gmm_model()
    with pytest.raises(TypeError, match="noise: expected a torch.Tensor"):
        fewstep.sample(model, [[0.0] * 16], solver="ddim", nfe=3)
    with pytest.raises(TypeError, match="noise: expected a floating"):
        fewstep.sample(model, torch.zeros(2, 16, dtype=torch.long), solver="ddim", nfe=3)
    with pytest.raises(ValueError, match=r"noise: each sample must have shape \(16,\)"):
        fewstep.sample(model, torch.randn(2, 5, dtype=F64), solver="ddim", nfe=3)


def test_network_returning_nan_names_step_and_time():
    sch = schedules.EDM()

    def net(x, sigma):
        # fine at first, NaN once sigma drops below 1
        return torch.where(sigma[:, None] < 1.0, torch.full_like(x, float("nan")), x * 0)

    model = fewstep.Model(net, schedule=sch, prediction="x0")
    with pytest.raises(fewstep.SamplingError, match=r"ddim: .*NaN or Inf at step 5 \(t=0\.\d+"):
        fewstep.sample(model, torch.randn(2, 3), solver="ddim", nfe=8, grid="karras")


@pytest.mark.parametrize("solver, options", [("ddim", {}), ("dpm++", {"order": 2}), ("dpm++", {"order": 3}),
                                             ("unipc", {"order": 3}), ("deis", {}), ("ipndm", {}),
                                             ("heun", {}), ("heroism", {"order": 3})])
@pytest.mark.parametrize("where, nfe", [("everywhere", 10), ("one element", 13), ("once", 11), ("once", 12)])
def test_nan_stops_sampling_soon_and_names_its_step(solver, options, where, nfe):
    # Multistep solvers' answers are checked through the state every few steps (FiniteGuard,
    # Evaluate.carried): the error must still name the first bad evaluation, and sampling must stop
    # within CARRIED_CHECK_EVERY evaluations of it. Others are checked at once. "once": one element of
    # one answer, and a network whose later answers are finite whatever its input, so only a state
    # that really carries the answer can reveal it.
    sch = schedules.EDM()
    calls = []

    def net(x, sigma):
        calls.append(float(sigma[0]))
        out = x * 0.1 if where != "once" else torch.full_like(x, 0.1)
        bad = float(sigma[0]) < 1.0 and (where != "once" or sum(c < 1.0 for c in calls) == 1)
        if bad:
            out = out.clone()
            if where == "everywhere":
                out.fill_(float("nan"))
            else:
                out[1, 2] = float("inf") if where == "one element" else float("nan")
        return out

    model = fewstep.Model(net, schedule=sch, prediction="x0")
    with pytest.raises(fewstep.SamplingError, match=r"NaN or Inf at step (\d+) \(t=([\d.e-]+)\)") as err:
        fewstep.sample(model, torch.randn(2, 3, dtype=F64), solver=solver, nfe=nfe, grid="karras", **options)
    first_bad = next(k for k, s in enumerate(calls) if s < 1.0)
    t_bad = calls[first_bad]  # EDM: the model time is sigma
    step, t = err.value.args[0].split("at step ")[1].split(" (t=")
    assert float(t.rstrip(")").split(")")[0]) == pytest.approx(t_bad, rel=1e-5)
    if solver not in ("heun", "heroism"):  # one evaluation per step: the step is the call's index
        assert int(step) == first_bad
    extra = len(calls) - 1 - first_bad
    limit = FiniteGuard.CARRIED_CHECK_EVERY - 1
    assert extra <= (limit if solver not in ("heun", "heroism") else 0)


def test_network_returning_inf_is_caught():
    model = fewstep.Model(lambda x, s: x * float("inf"), schedule=schedules.EDM(), prediction="x0")
    with pytest.raises(fewstep.SamplingError, match="step 0"):
        fewstep.sample(model, torch.randn(2, 3), solver="ddim", nfe=3)


@pytest.mark.parametrize(
    "net, match",
    [
        (lambda x, s: x[:, :2], r"network returned shape \(2, 2\), expected \(2, 3\)"),
        (lambda x, s: x.long(), "floating dtype"),
        (lambda x, s: "x", "returned str"),
        (lambda x, s: x.to("meta"), "on meta"),
    ],
)
def test_network_bad_outputs_name_the_step(net, match):
    model = fewstep.Model(net, schedule=schedules.EDM(), prediction="x0")
    with pytest.raises(fewstep.NetworkOutputError, match=r"ddim, step 0 \(t=80\).*" + match):
        fewstep.sample(model, torch.randn(2, 3), solver="ddim", nfe=3)


def test_low_precision_network_keeps_float32_state():
    sch = schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000))
    gm = testbeds.mixtures()["gmm16"]
    exact = gm.model(sch, "eps")
    seen = []

    def net16(x, t):
        seen.append(x.dtype)
        return exact.net(x, t)

    model = fewstep.Model(net16, schedule=sch, prediction="eps", dtype=torch.float16)
    noise = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)).half()
    out = fewstep.sample(model, noise, solver="ddim", nfe=10)
    ref = fewstep.sample(exact, noise.double(), solver="ddim", nfe=10)
    assert out.dtype == torch.float16 and set(seen) == {torch.float16}
    assert float((out.double() - ref).abs().max()) < 2e-2


def test_same_seed_is_bit_identical():
    model = _gmm_model()
    noise = torch.randn(4, 16, dtype=F64, generator=torch.Generator().manual_seed(5))
    a = fewstep.sample(model, noise, solver="ddim", nfe=6)
    b = fewstep.sample(model, noise.clone(), solver="ddim", nfe=6)
    assert torch.equal(a, b)


def test_recommended_choice_is_registered():
    for nfe in (1, 3, 4, 6, 10, 50):
        name, opts = fewstep.recommended(nfe)
        fewstep.solvers.get(name, **opts)


def test_solver_table_lists_every_solver():
    rows = fewstep.solvers.table()
    assert {r["name"] for r in rows} == set(fewstep.solvers.base.REGISTRY)
    assert all(r["nfe_per_step"] for r in rows)
    assert math.isfinite(len(rows))


def test_start_from_a_partly_noised_state_follows_the_exact_flow():
    sch = schedules.EDM()
    g = testbeds.Gaussian(mean=[0.2, -0.4], std=0.5)
    noise = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    t_start = 2.0
    x_start = g.reference(noise, sch, t_end=t_start)  # the exact state at t_start
    exact = g.reference(noise, sch)
    errors = []
    for nfe in (20, 40):
        out, info = fewstep.sample(g.model(sch, "x0"), x_start, solver="dpm++", nfe=nfe, start=t_start, return_info=True)
        assert info.grid[0] == t_start and info.nfe == nfe
        errors.append(float((out - exact).abs().max()))
    # converges to the exact end point at second order from the exact intermediate state
    assert errors[1] < 5e-3 and errors[0] / errors[1] > 3.0
    with pytest.raises(ValueError, match="start: must lie in"):
        fewstep.sample(g.model(sch, "x0"), x_start, solver="dpm++", nfe=4, start=100.0)
    with pytest.raises(ValueError, match="grid: with start=2 the grid must begin"):
        fewstep.sample(g.model(sch, "x0"), x_start, solver="dpm++", grid=torch.tensor([3.0, 1.0]), start=2.0)
    with pytest.raises(ValueError, match="start: fv treats its first state as pure noise"):
        fewstep.sample(g.model(sch, "x0"), x_start, solver="fv", nfe=4, start=2.0)
