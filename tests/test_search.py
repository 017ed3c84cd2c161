"""Differentiable solver search: the coefficient formula, its parity with the solvers, the teacher,
the file, the searched solver, a tiny search and the command line."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fewstep
from fewstep import schedules, testbeds
from fewstep.search import fileformat, loop, parameterisation as P, rollout as R, teacher as T
from fewstep.solvers.coefficients import lagrange_weights

F64 = torch.float64


def linear_vp():
    return schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=F64))


def random_params(schedule, n, view=None, seed=0, base_order=2, scale=0.3, corrector=False):
    g = torch.Generator().manual_seed(seed)
    view = view or P.default_view(schedule)
    p = P.SolverParameters(view, base_order, torch.randn(n, generator=g, dtype=F64),
                           scale * torch.randn(n, n, generator=g, dtype=F64),
                           0.1 * torch.randn(n, generator=g, dtype=F64))
    if corrector:
        p.gains = 0.3 * torch.randn(n, generator=g, dtype=F64)
        p.corrector = scale * torch.randn(n, n, generator=g, dtype=F64)
    return p


# ------------------------------------------------------------------------------ parameterisation
@pytest.mark.parametrize("schedule", [linear_vp(), schedules.EDM(), schedules.RectifiedFlow(), schedules.CosineVP()],
                         ids=["discrete", "edm", "flow", "cosine"])
def test_any_parameters_give_a_valid_solver(schedule):
    for seed in range(3):
        table = P.step_table(random_params(schedule, 6, seed=seed, scale=3.0), schedule)
        assert torch.allclose(table.matrix.sum(1), torch.ones(6, dtype=F64), atol=1e-12, rtol=0)
        assert torch.equal(table.matrix, torch.tril(table.matrix))
        t = table.times
        assert float(t[0]) == schedule.t_max
        assert bool((t[1:] < t[:-1]).all()) and float(t.min()) >= schedule.t_min
        assert bool((table.eval_times >= schedule.t_min).all() and (table.eval_times <= schedule.t_max).all())


def test_zero_offsets_evaluate_at_the_grid_times():
    sch = linear_vp()
    p = P.SolverParameters.from_grid(sch, fewstep.grids.make("karras", sch, 7), base_order=3)
    table = P.step_table(p, sch)
    assert torch.equal(table.eval_times, table.times)
    # the grid is the Karras grid, its last node (t_min) moved by END_SLACK of its log-SNR interval only
    assert torch.allclose(table.times[:-1], fewstep.grids.make("karras", sch, 7)[:-1], rtol=1e-12, atol=1e-9)
    lam = sch.lambda_(table.times)
    assert float(lam[-1]) == pytest.approx(float(sch.lambda_(0.0) - P.END_SLACK * (sch.lambda_(0.0) - lam[-2])), rel=1e-9)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_base_is_exactly_dpm_solver_pp(order):
    """Zero corrections give fewstep's dpm++ (diffusers' DPM-Solver++ multistep) on the same grid."""
    sch = linear_vp()
    p = P.SolverParameters.from_grid(sch, fewstep.grids.make("logsnr", sch, 8), base_order=order)
    table = P.step_table(p, sch)
    plan = fewstep.solvers.get("dpm++", order=order).prepare(sch, table.times)
    w, a = table.weights, table.a
    for i, step in enumerate(plan.predictors):
        assert step.a == pytest.approx(float(a[i]), rel=1e-12, abs=1e-14)
        ours = [float(w[i, i - k]) for k in range(len(step.d))]
        assert ours == pytest.approx(list(step.d), rel=1e-9, abs=1e-12)
        older = w[i, : i + 1 - len(step.d)]  # predictions beyond the base's order get no weight
        assert float(older.abs().sum()) == 0.0


def test_velocity_base_is_variable_step_adams_bashforth():
    sch = schedules.RectifiedFlow(t_max=1.0)
    p = random_params(sch, 6, view="velocity", seed=3, base_order=3, scale=0.0)
    table = P.step_table(p, sch)
    t = table.times.tolist() + [0.0]
    for i in range(6):
        k = min(3, i + 1)
        past = [t[i - j] for j in range(k)]
        expect = lagrange_weights(past, t[i], t[i + 1]) / (t[i + 1] - t[i])
        got = [float(table.matrix[i, i - j]) for j in range(k)]
        assert got == pytest.approx(expect.tolist(), rel=1e-12, abs=1e-12)
        assert float(table.scale[i]) == pytest.approx(t[i + 1] - t[i], rel=1e-14)


def test_coefficients_are_differentiable():
    sch = linear_vp()
    p = random_params(sch, 5, seed=1)
    for t in p.tensors():
        t.requires_grad_(True)
    table = P.step_table(p, sch)
    probe = torch.randn(5, 5, dtype=F64, generator=torch.Generator().manual_seed(9))
    ((table.weights * probe).sum() + table.a.sum() + table.eval_times.sum()).backward()
    for t in p.tensors():
        assert t.grad is not None and torch.isfinite(t.grad).all() and float(t.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------ the solver
def _save(tmp_path, params, sch, name="s.safetensors", prediction="eps"):
    path = tmp_path / name
    fileformat.save(path, params, sch, prediction=prediction, model="test")
    return str(path)


@pytest.mark.parametrize("corrector", [False, True], ids=["plain", "corrector+gains"])
@pytest.mark.parametrize("schedule,prediction", [(linear_vp(), "eps"), (schedules.RectifiedFlow(t_max=0.999), "flow")],
                         ids=["discrete-eps", "flow"])
def test_searched_solver_runs_exactly_the_searched_update(tmp_path, schedule, prediction, corrector):
    gm = testbeds.mixtures()["gmm2d"]
    params = random_params(schedule, 6, seed=4, corrector=corrector)
    path = _save(tmp_path, params, schedule, prediction=prediction)
    noise = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    got, info = fewstep.sample(gm.model(schedule, prediction=prediction), noise, solver="searched", path=path,
                               nfe=6, return_info=True)
    with torch.no_grad():
        want, _ = R.rollout(R.differentiable_testbed(gm, schedule, prediction), noise, P.step_table(params, schedule))
    assert info.nfe == 6
    # (the corrector's extra sums round in another order in run_multistep)
    assert float((got - want).abs().max()) < (1e-10 if corrector else 1e-12)
    if corrector:
        # the corrector changes the result, and a zero corrector is exactly no corrector
        plain = P.SolverParameters(params.view, params.base_order, params.time_logits, params.corrections,
                                   params.time_offsets, params.gains)
        with torch.no_grad():
            no_corr, _ = R.rollout(R.differentiable_testbed(gm, schedule, prediction), noise, P.step_table(plain, schedule))
            zero, _ = R.rollout(R.differentiable_testbed(gm, schedule, prediction), noise,
                                P.step_table(plain.with_corrector(), schedule))
        assert float((got - no_corr).abs().max()) > 1e-3
        assert float((zero - no_corr).abs().max()) < 1e-10
        assert torch.equal(fileformat.load(path).params.corrector, params.corrector)


def test_searched_file_checks(tmp_path):
    sch = linear_vp()
    params = random_params(sch, 5, seed=5)
    path = _save(tmp_path, params, sch)
    loaded = fileformat.load(path)
    assert loaded.nfe == 5 and loaded.prediction == "eps" and loaded.schedule == sch.fingerprint()
    assert loaded.t_range == (0.0, 999.0)
    assert torch.equal(loaded.params.time_logits, params.time_logits)
    stored = P.step_table(loaded.params, sch)
    assert torch.equal(loaded.stored["weights"], stored.weights.detach())
    gm = testbeds.Gaussian(0.3, 0.5, dim=2)
    noise = torch.zeros(2, 2, dtype=F64)
    other = schedules.DiscreteVP.scaled_linear()
    with pytest.raises(fileformat.ScheduleMismatch, match="schedule: this searched solver .* searched for model 'test'"):
        fewstep.sample(gm.model(other), noise, solver="searched", path=path, nfe=5)
    with pytest.raises(ValueError, match="nfe: this searched solver .* nfe=5, got nfe=6"):
        fewstep.sample(gm.model(sch), noise, solver="searched", path=path, nfe=6)
    with pytest.raises(ValueError, match="grid: a searched solver evaluates at its own"):
        fewstep.sample(gm.model(sch), noise, solver="searched", path=path, nfe=5,
                       grid=torch.tensor([999.0, 700.0, 400.0, 100.0, 3.0]))
    # a named grid (the default included) is ignored: same result as the searched grid itself
    a = fewstep.sample(gm.model(sch), noise + 1, solver="searched", path=path, nfe=5, grid="uniform")
    b = fewstep.sample(gm.model(sch), noise + 1, solver="searched", path=path, nfe=5, grid=stored.times.detach())
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="path: solver='searched' needs path="):
        fewstep.solvers.get("searched")
    with pytest.raises(FileNotFoundError, match="neither a file nor a bundled"):
        fewstep.solvers.get("searched", path=str(tmp_path / "missing.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        fewstep.solvers.get("searched", path=str(tmp_path / "junk.safetensors"))
    assert any(row["name"] == "searched" and row["nfe_per_step"] == "1" for row in fewstep.solvers.table())


# ------------------------------------------------------------------------------ teacher
def test_teacher_is_dpm_solver_pp_and_interpolates_the_exact_flow():
    sch = linear_vp()
    gm = testbeds.Gaussian(0.3, 0.5, dim=4)
    noise = torch.randn(8, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    exact_end = gm.denoise(gm.reference(noise, sch, t_end=0.0), sch, 0.0)
    errors = {}
    for steps in (40, 80):
        traj = T.solve(gm.model(sch), noise, steps=steps)
        # the end point is fewstep's DPM-Solver++(3M) with the same budget, to rounding
        dpm = fewstep.sample(gm.model(sch), noise, solver="dpm++", order=3, nfe=steps)
        assert float((traj.end - dpm).abs().max()) < 1e-12
        errors[steps] = float((traj.end - exact_end).abs().max())
        for t in (990.0, 700.0, 333.3, 50.0, 2.5):
            mid = traj.at(torch.tensor(t, dtype=F64))
            errors[steps] = max(errors[steps], float((mid - gm.reference(noise, sch, t_end=t)).abs().max()))
    assert errors[80] < 5e-4
    assert errors[40] / errors[80] > 4  # second order at least (the interpolant is fourth order)
    # the time derivative (what the search's loss sends to the grid) is that of the exact flow;
    # t = 400.37 sits between the table entries of DiscreteVP, where the schedule is smooth
    t = torch.tensor(400.37, dtype=F64, requires_grad=True)
    traj.at(t).sum().backward()
    h = 1e-3
    fd = (gm.reference(noise, sch, t_end=400.37 + h) - gm.reference(noise, sch, t_end=400.37 - h)).sum() / (2 * h)
    assert float(t.grad) == pytest.approx(float(fd), rel=3e-3)


def test_teacher_cache_round_trip(tmp_path):
    sch = linear_vp()
    gm = testbeds.mixtures()["gmm2d"]
    noise = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    a, hit_a = T.cached(gm.model(sch), noise, 12, cache_dir=tmp_path)
    b, hit_b = T.cached(gm.model(sch), noise, 12, cache_dir=tmp_path)
    assert (hit_a, hit_b) == (False, True)
    assert torch.equal(a.ys, b.ys) and torch.equal(a.end, b.end)
    other = testbeds.GaussianMixture([[1.0, 0.0], [-1.0, 0.0]], [0.5, 0.5], 0.1)
    assert T.model_fingerprint(other.model(sch)) != T.model_fingerprint(gm.model(sch))
    assert len(list((tmp_path / "teacher").glob("*.safetensors"))) == 1


# ------------------------------------------------------------------------------ the search
def test_search_needs_a_differentiable_network():
    sch = linear_vp()
    gm = testbeds.Gaussian(0.3, 0.5, dim=2)
    with pytest.raises(R.NotDifferentiable, match="differentiable_testbed"):
        loop.search(gm.model(sch), 3, samples=8, val_samples=4, iterations=2, teacher_steps=8, use_cache=False)


def test_tiny_search_improves_and_generalises_to_unseen_noise():
    """Searched on 64 noise draws, the error on 512 other draws stays within 1.2x of the training error."""
    sch = linear_vp()
    gm = testbeds.GaussianMixture([[0.6, 0.2, 0.0], [-0.5, -0.3, 0.2]], [0.6, 0.4], 0.35)
    model = R.differentiable_testbed(gm, sch)
    res = loop.search(model, 4, samples=64, val_samples=32, iterations=20, teacher_steps=60, starts=1,
                      exact_end=lambda n: gm.reference(n, sch), exact_name="exact-3d", use_cache=False)
    assert res.train_rmse < 0.5 * res.train_rmse_init
    assert res.val_rmse <= res.val_rmse_init
    unseen = torch.randn(512, 3, dtype=F64, generator=torch.Generator().manual_seed(11))
    held = loop.evaluate_rmse(model, res.params, unseen, gm.reference(unseen, sch))
    assert held <= 1.2 * res.train_rmse
    # the best training-free solver in the search space, on the same unseen noise
    start = min(loop.candidates(sch, 4, "x0"),
                key=lambda c: loop.evaluate_rmse(model, c[1], unseen, gm.reference(unseen, sch)))
    assert held < 0.5 * loop.evaluate_rmse(model, start[1], unseen, gm.reference(unseen, sch))


def test_cli_search_writes_a_usable_solver(tmp_path, capsys):
    from fewstep.cli import main

    out = tmp_path / "g-nfe{nfe}.safetensors"
    rc = main(["search", "--model", "gaussian", "--nfe", "3,4", "--samples", "24", "--val-samples", "8",
               "--iterations", "4", "--teacher-steps", "12", "--no-cache", "--quiet", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "nfe=3: RMSE to the teacher" in printed and "nfe=4: RMSE to the teacher" in printed
    assert printed.count("starts at t") == 2  # at t_max, or where the searched start put it
    solver = fileformat.load(tmp_path / "g-nfe4.safetensors")
    assert solver.nfe == 4 and solver.model == "gaussian" and solver.search["samples"] == 24
    gm = testbeds.Gaussian(mean=0.3, std=0.5, dim=16)
    x = fewstep.sample(gm.model(linear_vp()), torch.zeros(2, 16, dtype=F64), solver="searched",
                       path=str(tmp_path / "g-nfe4.safetensors"), nfe=4)
    assert x.shape == (2, 16) and bool(torch.isfinite(x).all())
    rc = main(["search", "--model", "gaussian", "--nfe", "3,4", "--out", str(tmp_path / "one.safetensors")])
    assert rc == 2
    assert "--out: with several NFEs the name must contain {nfe}" in capsys.readouterr().err


# ------------------------------------------------------------------------------ shipped solvers
SHIPPED_TARGETS = ("gmm2d", "gmm16", "gmm64", "digits16")
SHIPPED_NFES = (4, 5, 6, 8, 10)


def test_bundled_lookup():
    from fewstep import search

    for target in SHIPPED_TARGETS:
        for nfe in SHIPPED_NFES:
            path = search.bundled(target, nfe)
            assert path is not None and path.name == f"{target}-nfe{nfe}.safetensors" and path.is_file()
    assert search.bundled("digits16", 7) is None and search.bundled("patches-none", 6) is None
    assert search.bundled("digits16-l", 6) == search.bundled("digits16", 6)  # the zoo alias
    assert {f"{t}-nfe{n}" for t in SHIPPED_TARGETS for n in SHIPPED_NFES} <= set(search.bundled_names())
    with pytest.raises(ValueError, match="nfe: expected a positive integer"):
        search.bundled("digits16", 0)
    # the folder stays small: a few KB per solver
    total = sum(search.bundled(t, n).stat().st_size for t in SHIPPED_TARGETS for n in SHIPPED_NFES)
    assert total < 200_000


@pytest.mark.parametrize("target", ["gmm2d", "gmm16", "gmm64"])
def test_shipped_testbed_solvers_beat_every_training_free_start(target):
    """Every shipped testbed solver runs through fewstep.sample (bundled short name) and, on noise
    neither the search nor the benchmark used, beats the best training-free solver of its search
    space (DDIM / DPM-Solver++ 2M, 3M on four grids, three end shares) by 2x at least. 1024 draws:
    with 128, one solver's ratio moved 0.31-0.54 between noise sets (a few samples that end at
    another mixture component carry most of gmm16's error)."""
    from fewstep import search
    from fewstep.bench import targets

    sch = targets.linear_schedule()
    gm = targets.exact_testbed(target)
    model = gm.model(sch, prediction="eps", dtype=F64)
    noise = torch.randn(1024, gm.dim, dtype=F64, generator=torch.Generator().manual_seed(2024))
    reference = gm.reference(noise, sch)
    rollout_model = R.differentiable_testbed(gm, sch)
    for nfe in SHIPPED_NFES:
        name = f"{target}-nfe{nfe}"
        solver = fileformat.load(search.bundled(target, nfe))
        assert solver.nfe == nfe and solver.model == target and solver.prediction == "eps"
        x, info = fewstep.sample(model, noise, solver="searched", path=name, nfe=nfe, return_info=True)
        assert info.nfe == nfe
        err = float((x - reference).pow(2).mean().sqrt())
        best_free = min(loop.evaluate_rmse(rollout_model, p, noise, reference) for _, p in loop.candidates(sch, nfe, "x0"))
        assert err < 0.5 * best_free, (name, err, best_free)


@pytest.mark.parametrize("target", ["digits16", "patches32"])
def test_shipped_zoo_solvers_run_on_the_bundled_model(target):
    """Each solver shipped for a bundled model loads by its short name and samples that model (as
    the benchmark calls it: class-conditional models with labels in turn, no guidance)."""
    from fewstep import search, zoo

    model = zoo.load(target)
    conditional = getattr(model, "null_label", None) is not None
    if conditional:
        model = model.with_cond(label=torch.arange(4) % 10)
    noise = torch.randn(4, *model.sample_shape, generator=torch.Generator().manual_seed(5))
    for nfe in SHIPPED_NFES:
        solver = fileformat.load(search.bundled(target, nfe))
        assert solver.nfe == nfe and solver.model == target
        assert solver.search["labels"] == ("cycle" if conditional else "none")
        assert solver.search["val_rmse"] < solver.search["val_rmse_init"]  # it improved on its start
        x, info = fewstep.sample(model, noise, solver="searched", path=f"{target}-nfe{nfe}", nfe=nfe, return_info=True)
        assert info.nfe == nfe and x.shape == (4, *model.sample_shape) and bool(torch.isfinite(x).all())
        assert float(x.abs().max()) < 3.0  # clean data lives in [-1, 1]


# ------------------------------------------------------------------------------ a searched start
def test_searched_start_reproduces_the_truncated_default_start(tmp_path):
    """A grid that starts below t_max becomes a searched start: the searched solver then begins from
    sigma(t_0) * noise, exactly as fewstep.sample(..., start_logsnr=) does for a training-free solver,
    and the file keeps the start (format version 2)."""
    from safetensors import safe_open

    sch = linear_vp()
    from fewstep.sample import truncated_start

    t_start = truncated_start(sch, -3.24)
    grid = fewstep.grids.make("quadratic-open", sch, 6, t_start=t_start)
    params = P.SolverParameters.from_grid(sch, grid, base_order=2)
    assert params.start_logit is not None and params.num_free() == 6 + 15 + 1
    table = P.step_table(params, sch)
    assert torch.allclose(table.times, grid, rtol=1e-12, atol=1e-9)
    assert float(table.start_sigma) == pytest.approx(float(sch.sigma(grid[0])), rel=1e-12)
    path = _save(tmp_path, params, sch)
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["version"] == "2" and "start_logit" in f.keys()
    assert torch.equal(fileformat.load(path).params.start_logit, params.start_logit)
    gm = testbeds.mixtures()["gmm16"]
    model = gm.model(sch, prediction="eps")
    noise = torch.randn(64, 16, dtype=F64, generator=torch.Generator().manual_seed(3))
    got = fewstep.sample(model, noise, solver="searched", path=path, nfe=6)
    # a searched start is pure noise there, like a truncated start without the bridge
    want = fewstep.sample(model, noise, solver="dpm++", order=2, nfe=6, grid="quadratic-open", start_logsnr=-3.24,
                          start_bridge=False)
    assert float((got - want).abs().max()) < 1e-10
    with torch.no_grad():
        rolled, _ = R.rollout(R.differentiable_testbed(gm, sch), noise, table)
    assert float((got - rolled).abs().max()) < 1e-12
    # the start is searched: the loss has a gradient in it
    traj = T.solve(gm.model(sch, prediction="eps"), noise[:16], 32)
    _, grads = loop.training_loss(R.differentiable_testbed(gm, sch), params, noise[:16], traj)
    assert len(grads) == 5 and float(grads[-1].abs()) > 0
    # a start beyond the searched range is refused, naming the argument
    too_low = fewstep.grids.make("quadratic", sch, 4, t_start=truncated_start(sch, 1.0))
    with pytest.raises(ValueError, match="times: a searched grid starts at t_max=999 or within the first 0.5"):
        P.SolverParameters.from_grid(sch, too_low)


def test_search_can_start_below_t_max():
    """With truncate=True (the default) the starting points include truncated grids; the search
    result is no worse than without them on the same data."""
    sch = linear_vp()
    gm = testbeds.mixtures()["gmm16"]
    labels = [name for name, p in loop.candidates(sch, 5, "x0", truncate=True) if p.start_logit is not None]
    assert len(labels) == 2 * len(loop.INIT_GRIDS) * 3 * len(loop.INIT_SHARES)
    assert all("from log-SNR" in name for name in labels)
    model = R.differentiable_testbed(gm, sch)
    kw = dict(nfe=4, samples=64, val_samples=32, iterations=20, teacher_steps=32, use_cache=False, starts=1)
    with_start = loop.search(model, truncate=True, **kw)
    without = loop.search(model, truncate=False, **kw)
    assert with_start.val_rmse_init <= without.val_rmse_init


def test_searched_start_in_a_diffusers_pipeline(tmp_path):
    """Through FewstepScheduler a searched start scales the pipeline's latents by sigma(t_0)
    (init_noise_sigma) and the pipeline loop returns what fewstep.sample returns."""
    from fewstep.integrations.diffusers import FewstepScheduler  # diffusers: a test dependency
    from fewstep.sample import truncated_start

    sch = linear_vp()
    grid = fewstep.grids.make("logsnr-open", sch, 5, t_start=truncated_start(sch, -4.1))
    params = random_params(sch, 5, seed=8)
    params.start_logit = P.SolverParameters.from_grid(sch, grid).start_logit
    path = _save(tmp_path, params, sch)
    sched = FewstepScheduler(solver="searched", solver_options={"path": path})
    gm = testbeds.mixtures()["gmm16"]
    model = gm.model(sched.schedule, "epsilon")
    noise = torch.randn(5, 16, dtype=F64, generator=torch.Generator().manual_seed(4))
    sched.set_timesteps(5)
    ours = sched.schedule  # diffusers' float32 betas: the same schedule to 1e-6 (its fingerprint)
    assert sched.init_noise_sigma == pytest.approx(float(ours.sigma(P.step_table(params, ours).times[0])), rel=1e-12)
    assert sched.init_noise_sigma < 1.0 - 1e-5  # not the initial_scale (1) of a start at t_max
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(model.net(x, t.expand(5).to(F64)), t, x).prev_sample
    ref = fewstep.sample(model, noise, solver="searched", path=path, nfe=5)
    assert float((x - ref).abs().max()) <= 1e-6


def test_trial_starts_keep_the_best_of_each_kind():
    """The trial runs always include the best start from t_max and the best truncated start."""
    sch = linear_vp()
    cands = loop.candidates(sch, 5, "x0", truncate=True)
    truncated = [p for _, p in cands if p.start_logit is not None]
    from_top = [p for _, p in cands if p.start_logit is None]
    # the three best by probe error are truncated; the best from t_max is fourth
    scored = [(0.1, "a", truncated[0]), (0.2, "b", truncated[1]), (0.3, "c", truncated[2]), (0.4, "d", from_top[0]),
              (0.5, "e", from_top[1])]
    chosen = loop._trial_starts(scored, 3)
    assert [name for _, name, _ in chosen] == ["a", "b", "d"]
    assert [name for _, name, _ in loop._trial_starts(scored, 1)] == ["a"]
    mixed = [scored[0], scored[3], scored[1]]
    assert [name for _, name, _ in loop._trial_starts(mixed, 2)] == ["a", "d"]


# ------------------------------------------------------------------------------ the truncation bridge
def _bridged_params(sch, n=6, seed=9, corrector=False, lam=-3.6):
    from fewstep.sample import truncated_start

    params = random_params(sch, n, seed=seed, corrector=corrector)
    grid = fewstep.grids.make("logsnr-open", sch, n, t_start=truncated_start(sch, lam))
    params.start_logit = P.SolverParameters.from_grid(sch, grid).start_logit
    params.bridge = True
    return params


@pytest.mark.parametrize("corrector", [False, True], ids=["plain", "corrector+gains"])
def test_bridged_searched_solver_runs_exactly_the_searched_update(tmp_path, corrector):
    """With ``bridge`` the searched solver (fewstep.sample) returns what the differentiable rollout
    returns, to 1e-12: both read the bridge from step_table. The file is format version 3."""
    from safetensors import safe_open

    sch = linear_vp()
    gm = testbeds.mixtures()["gmm16"]
    params = _bridged_params(sch, corrector=corrector)
    assert params.bridged
    path = _save(tmp_path, params, sch)
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["version"] == "3" and "start_bridge" in f.keys()
    loaded = fileformat.load(path).params
    assert loaded.bridge and torch.equal(loaded.start_logit, params.start_logit)
    noise = torch.randn(32, 16, dtype=F64, generator=torch.Generator().manual_seed(5))
    got, info = fewstep.sample(gm.model(sch, prediction="eps"), noise, solver="searched", path=path, nfe=6,
                               return_info=True)
    table = P.step_table(params, sch)
    with torch.no_grad():
        want, _ = R.rollout(R.differentiable_testbed(gm, sch), noise, table)
    assert info.nfe == 6
    assert float((got - want).abs().max()) < (1e-10 if corrector else 1e-12)
    # the bridge is the weight a_0 w on D_0 in step 0 (and corrector row 1), nothing else
    plain = P.step_table(P.SolverParameters(**{**params.__dict__, "bridge": False}), sch)
    w = float(table.bridge_weight)
    assert w == pytest.approx(float(sch.alpha(table.times[0]) - sch.sigma(table.times[0]) * sch.alpha(
        torch.tensor(999.0, dtype=F64)) / sch.sigma(torch.tensor(999.0, dtype=F64))), rel=1e-12)
    fold = torch.zeros(6, 6, dtype=F64)
    fold[0, 0] = float(table.a[0]) * w
    assert torch.allclose(table.weights - plain.weights, fold, rtol=0, atol=1e-15)
    if corrector:
        fold = torch.zeros(6, 6, dtype=F64)
        fold[1, 0] = float(table.a[0]) * w
        assert torch.allclose(table.corrector_weights - plain.corrector_weights, fold, rtol=0, atol=1e-15)
    with torch.no_grad():
        unbridged, _ = R.rollout(R.differentiable_testbed(gm, sch), noise, plain)
    assert float((got - unbridged).abs().max()) > 1e-3


def test_bridged_start_is_fewsteps_bridged_solver_and_its_weight_is_searched(tmp_path):
    """A training-free grid from a truncated start with ``bridge``: exactly fewstep's own bridged
    DPM-Solver++ (``start_bridge=True``) there; the bridge weight moves with the searched start, so
    the loss's gradient in the start includes it (checked against finite differences)."""
    from fewstep.sample import truncated_start

    sch = linear_vp()
    gm = testbeds.mixtures()["gmm16"]
    model = gm.model(sch, prediction="eps")
    noise = torch.randn(64, 16, dtype=F64, generator=torch.Generator().manual_seed(3))
    grid = fewstep.grids.make("quadratic-open", sch, 6, t_start=truncated_start(sch, -3.24))
    for order in (1, 2, 3):
        params = P.SolverParameters.from_grid(sch, grid, base_order=order, bridge=True)
        got = fewstep.sample(model, noise, solver="searched", path=_save(tmp_path, params, sch), nfe=6)
        want = fewstep.sample(model, noise, solver="dpm++", order=order, nfe=6, grid="quadratic-open",
                              start_logsnr=-3.24, start_bridge=True)
        assert float((got - want).abs().max()) < 1e-10
    # d w / d start_logit through the grid, against central differences
    start = params.start_logit.clone().requires_grad_(True)
    t0 = P.grid_from_logits(sch, "x0", params.time_logits, start)[0][0]
    (grad,) = torch.autograd.grad(P.bridge_weight(sch, t0), start)

    def w_at(s):
        return float(P.bridge_weight(sch, P.grid_from_logits(sch, "x0", params.time_logits, s)[0][0]))

    h = 1e-5
    fd = (w_at(params.start_logit + h) - w_at(params.start_logit - h)) / (2 * h)
    assert float(grad) == pytest.approx(fd, rel=1e-5)
    traj = T.solve(model, noise[:16], 32)
    _, with_bridge = loop.training_loss(R.differentiable_testbed(gm, sch), params, noise[:16], traj)
    params.bridge = False
    _, without = loop.training_loss(R.differentiable_testbed(gm, sch), params, noise[:16], traj)
    assert abs(float(with_bridge[-1] - without[-1])) > 1e-6


def test_bridge_off_is_the_old_behaviour(tmp_path):
    """bridge=False (the default, and every file written before the bridge) changes nothing: the
    table has no bridge weight and its weights are ``scale * M`` exactly, unbridged shipped files load
    without the bridge and save as before (no ``start_bridge``, version <= 2), and a bridge without a
    searched start is no bridge."""
    from safetensors import safe_open

    sch = linear_vp()
    for name in ("gmm2d-nfe8", "gmm64-nfe5", "gmm2d-nfe10"):  # unbridged shipped files (with and without a start)
        f = fileformat.load(fewstep.solvers.searched.resolve_path(name))
        assert f.params.bridge is False and not f.params.bridged
        table = P.step_table(f.params, sch)
        assert table.bridge_weight is None
        assert torch.equal(table.weights, table.scale[:, None] * table.matrix)
        assert torch.allclose(table.weights, f.stored["weights"], rtol=1e-9, atol=1e-12)
        path = _save(tmp_path, f.params, sch)
        with safe_open(path, framework="pt") as g:
            assert "start_bridge" not in g.keys()
            assert g.metadata()["version"] == ("2" if f.params.start_logit is not None else "1")
        assert fileformat.load(path).params.bridge is False
    p = random_params(sch, 5, seed=2)
    with_flag = P.SolverParameters(**{**p.__dict__, "bridge": True})
    assert not with_flag.bridged
    assert torch.equal(P.step_table(with_flag, sch).weights, P.step_table(p, sch).weights)
    with pytest.raises(ValueError, match="bridge: the truncation bridge is searched in the data view"):
        P.SolverParameters("velocity", 1, p.time_logits, p.corrections, bridge=True)
    labels = [name for name, q in loop.candidates(sch, 5, "x0", truncate=True, bridge=True) if q.bridged]
    assert len(labels) == 2 * len(loop.INIT_GRIDS) * 3 * len(loop.INIT_SHARES)
    assert all("(bridged)" in name for name in labels)
    assert not any(q.bridge for _, q in loop.candidates(sch, 5, "x0", truncate=True))


def test_cli_search_with_the_bridge(tmp_path, capsys):
    from fewstep.cli import main

    out = tmp_path / "b.safetensors"
    rc = main(["search", "--model", "gmm2d", "--nfe", "4", "--samples", "24", "--val-samples", "8", "--iterations",
               "4", "--teacher-steps", "12", "--no-cache", "--quiet", "--bridge", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    solver = fileformat.load(out)
    # the bridge is recorded where it acts: with a searched start
    assert solver.params.bridge == (solver.params.start_logit is not None)
    assert ("with the truncation bridge" in printed) == solver.params.bridge


# ------------------------------------------------------------------------- steps outside the schedule
def test_parameters_outside_the_schedule_are_a_clear_error_and_the_search_steps_back():
    """Parameters that give NaN times are a clear error from step_table (naming the parameters), not
    an index error from the schedule; an L-BFGS trial step whose loss is not finite makes the line
    search step back, and Adam stops there: both return a finite solver no worse than the start."""
    sch = linear_vp()
    gm = testbeds.GaussianMixture([[0.6, 0.2, 0.0], [-0.5, -0.3, 0.2]], [0.6, 0.4], 0.35)
    params = random_params(sch, 4, seed=1)
    params.time_offsets = torch.tensor([0.0, math.nan, 0.0, 0.0], dtype=F64)
    with pytest.raises(P.NonFiniteTimes, match="params: the searched parameters give non-finite times"):
        P.step_table(params, sch)
    model = R.differentiable_testbed(gm, sch)
    for optimizer in ("lbfgs", "adam"):
        # lr = 1e3 sends the first trial (L-BFGS) or the first step (Adam) far outside the schedule
        res = loop.search(model, 4, samples=32, val_samples=16, iterations=12, teacher_steps=40, starts=1, lr=1e3,
                          optimizer=optimizer, batch=16, exact_end=lambda n: gm.reference(n, sch),
                          exact_name="exact-3d", use_cache=False)
        assert all(bool(torch.isfinite(t).all()) for t in res.params.tensors())
        assert math.isfinite(res.val_rmse) and res.val_rmse <= res.val_rmse_init
        P.step_table(res.params, sch)  # runs
