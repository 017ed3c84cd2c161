"""Multilevel Euler–Maruyama (``solver="mlem"``) and its building blocks in ``fewstep.multilevel``."""
import doctest
import itertools
import math

import pytest
import torch

import fewstep
from fewstep import multilevel, schedules, testbeds
from fewstep.multilevel import cost, estimator, gamma, pilot, probabilities
from fewstep.solvers import mlem

F64 = torch.float64
COSTS = [1.0, 4.0, 16.0]


def _noise(n, d, seed=0):
    return torch.randn(n, d, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def family():
    """gmm16 under diffusers' linear betas: two perturbed levels (errors 0.4, 0.1) and the exact model."""
    gm = testbeds.mixtures()["gmm16"]
    sch = schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=F64))
    fam = [gm.model(sch, error=testbeds.perturbed(gm, d, seed=s)) for s, d in enumerate([0.4, 0.1])]
    fam.append(gm.model(sch))
    return gm, sch, fam


# ------------------------------------------------------------------------------------- estimator
@pytest.mark.parametrize("probs", [[1.0, 0.5, 0.2], [0.7, 0.7, 0.1, 0.9], [1.0, 1.0, 1.0]])
def test_level_weights_have_exact_expectation_e_k(probs):
    """Enumerating every draw: E[c_j] = 1 for the finest network and 0 for the others (telescoping)."""
    k = len(probs)
    mean = [0.0] * k
    for fired in itertools.product([False, True], repeat=k):
        p = math.prod(q if f else 1.0 - q for q, f in zip(probs, fired))
        for j, c in enumerate(estimator.level_weights(list(fired), probs)):
            mean[j] += p * c
    assert mean[:-1] == pytest.approx([0.0] * (k - 1), abs=1e-15)
    assert mean[-1] == pytest.approx(1.0, abs=1e-15)


def test_network_weights_table_matches_level_weights():
    table = [[1.0, 0.5, 0.2], [1.0, 0.3, 0.3]]
    w = mlem.network_weights(table, batch=64, seed=3)
    assert tuple(w.shape) == (2, 3, 64)
    # rebuild the draws from the weights: B_j = 1 iff the scaled indicator sum_{m >= j} c_m is nonzero
    for i, row in enumerate(table):
        for b in range(64):
            tail = w[i, :, b].flip(0).cumsum(0).flip(0)  # B_j / p_j
            fired = [bool(t != 0) for t in tail]
            assert w[i, :, b].tolist() == pytest.approx(estimator.level_weights(fired, row), abs=1e-15)
    # equal adjacent probabilities cancel when both fire: that network is skipped (weight exactly 0)
    both = (w[1, 1] == 0) & (w[1, 2] != 0)
    assert bool(both.any())


def test_systematic_draws_keep_each_step_probability_and_spread_the_count():
    """Every step fires with its own probability (over 20000 independent phases), and each sample's
    number of firings of a level is the floor or the ceiling of the expected count."""
    table = [[1.0, 0.3 + 0.02 * i, 0.05 + 0.01 * (i % 4)] for i in range(25)]
    fired = mlem.level_draws(table, batch=20000, seed=0, draws="systematic")
    p = torch.tensor(table, dtype=F64)
    freq = fired.to(F64).mean(-1)
    assert float(((freq - p).abs() / (p * (1 - p) / 20000 + 1e-300).sqrt()).max()) < 4.5
    counts = fired.sum(0).to(F64)  # (levels, samples)
    expected = p.sum(0)[:, None]
    assert bool(((counts == expected.floor()) | (counts == expected.ceil())).all())
    independent = mlem.level_draws(table, batch=20000, seed=0).sum(0).to(F64)
    assert float(independent[2].std()) > 2 * float(counts[2].std())  # Poisson-like vs at most one apart


def _one_step_states(fam_model, noise, grid, solver, **kw):
    states = []
    fewstep.sample(fam_model, noise, solver=solver, grid=grid, callback=lambda d: states.append(d["x"]), **kw)
    return states[0]


@pytest.mark.parametrize("form,base,draws", [("sde", "em", "independent"), ("ode", "ddim", "independent"),
                                             ("sde", "em", "systematic")])
def test_drift_estimate_is_unbiased_per_sample(family, form, base, draws):
    """Acceptance: the mean of the ML-EM update over 4000 independent level draws (or phases) equals the finest
    model's update (same state, same Brownian increment) within 4 standard errors in every coordinate,
    while the estimate itself is genuinely random (its spread is far above the tolerance)."""
    gm, sch, fam = family
    n_draws = 4000
    grid = torch.tensor([600.0, 300.0], dtype=F64)
    x0 = _noise(1, gm.dim, seed=4).expand(n_draws, gm.dim).contiguous()
    gens = [_gen(7) for _ in range(n_draws)]  # one Brownian increment shared by every draw
    got = _one_step_states(fam[-1], x0, grid, "mlem", family=fam, costs=COSTS, form=form, draws=draws,
                           probabilities=[1.0, 0.5, 0.2], seed=11, generator=gens)
    want = _one_step_states(fam[-1], x0[:1], grid, base, generator=[_gen(7)])
    err = got.mean(0) - want[0]
    se = got.std(0) / math.sqrt(n_draws)
    assert float((err.abs() / se).max()) < 4.0
    assert float(got.std(0).min()) > 1e-3  # the level pattern really varies between draws
    assert float(se.max()) < 5e-3


def test_drift_estimate_is_unbiased_shared(family):
    """Same as above with one draw per call for the whole batch (``pattern="shared"``), 600 calls."""
    gm, sch, fam = family
    grid = torch.tensor([600.0, 300.0], dtype=F64)
    x0 = _noise(2, gm.dim, seed=4)
    runs = torch.stack([
        _one_step_states(fam[-1], x0, grid, "mlem", family=fam, costs=COSTS, form="ode", pattern="shared",
                         probabilities=[1.0, 0.5, 0.2], seed=s)
        for s in range(600)
    ])
    want = _one_step_states(fam[-1], x0, grid, "ddim")
    err = runs.mean(0) - want
    se = runs.std(0) / math.sqrt(runs.shape[0])
    assert float((err.abs() / se).max()) < 4.0
    assert float(runs.std(0).min()) > 1e-3


@pytest.mark.parametrize("form,base", [("sde", "em"), ("ode", "ddim"), ("ddpm", "ddpm")])
@pytest.mark.parametrize("pattern", ["per_sample", "shared"])
def test_all_levels_always_is_the_finest_model_alone(family, form, base, pattern):
    """p = 1 everywhere cancels every coarse network: exactly the base solver with the finest model,
    and the coarse models are never called."""
    gm, sch, fam = family
    noise = _noise(8, gm.dim)
    for m in fam:
        m.reset_counters()
    stats = multilevel.MLEMStats()
    got, info = fewstep.sample(fam[-1], noise, solver="mlem", family=fam, costs=COSTS, form=form, pattern=pattern,
                               probabilities=[1.0, 1.0, 1.0], nfe=12, generator=_gen(), stats=stats, return_info=True)
    assert [m.nfe for m in fam] == [0, 0, 12] and info.nfe == 12
    want = fewstep.sample(fam[-1], noise, solver=base, nfe=12, generator=_gen())
    assert float((got - want).abs().max()) < 1e-12
    assert stats.calls == [0, 0, 12] and stats.flops == 12 * 8 * 16.0 and stats.flops_ratio == 1.0


def test_brownian_noise_matches_em(family):
    gm, sch, fam = family
    noise = _noise(4, gm.dim)
    got = fewstep.sample(fam[-1], noise, solver="mlem", family=fam, costs=COSTS, probabilities=[1.0] * 3,
                         brownian=True, nfe=10, generator=_gen())
    want = fewstep.sample(fam[-1], noise, solver="em", brownian=True, nfe=10, generator=_gen())
    assert float((got - want).abs().max()) < 1e-12


# ----------------------------------------------------------------------------------- costs, rule
def test_expected_step_cost_counts_each_network_once():
    assert cost.network_probabilities([1.0, 0.5, 0.1]) == pytest.approx([1.0, 0.55, 0.1])
    assert cost.expected_step_cost([1.0, 0.5, 0.1], COSTS) == pytest.approx(1.0 + 4 * 0.55 + 1.6)
    assert cost.expected_step_cost([1.0, 1.0, 1.0], COSTS) == 16.0  # everything cancels but the finest
    assert cost.expected_step_cost([1.0, 1.0, 0.25], COSTS) == pytest.approx(4.0 + 16 * 0.25)


def test_realised_flops_match_the_expected_flops(family):
    gm, sch, fam = family
    stats = multilevel.MLEMStats()
    table = [[1.0, 0.4, 0.1]] * 40
    fewstep.sample(fam[-1], _noise(256, gm.dim), solver="mlem", family=fam, costs=COSTS, probabilities=table,
                   nfe=40, seed=5, generator=_gen(), stats=stats)
    per_step = cost.expected_step_cost(table[0], COSTS)
    assert stats.expected_flops == pytest.approx(256 * 40 * per_step)
    # rows of each network are Binomial(256 * 40, P(needed)); 4 standard deviations
    for j, q in enumerate(cost.network_probabilities(table[0])):
        n = 256 * 40
        assert abs(stats.rows[j] - n * q) < 4 * math.sqrt(n * q * (1 - q)) + 1e-9
    assert stats.flops == sum(r * c for r, c in zip(stats.rows, COSTS))
    assert stats.calls == [40, 40, 40]  # per-sample draws: every network runs each step on some samples


def test_rule_is_proportional_to_w_sqrt_v_over_c_and_hits_the_budget():
    v = [[2.0, 0.04 * (1 + i), 0.0025 * (1 + i % 3)] for i in range(30)]
    w = [0.05 + 0.01 * i for i in range(30)]
    table = probabilities.optimal_probabilities(v, COSTS, budget=0.3, weights=w)
    assert all(row[0] == 1.0 for row in table)
    assert cost.expected_flops(table, COSTS) == pytest.approx(0.3 * 16 * 30, rel=1e-8)
    pair = [None, 5.0, 20.0]
    ratios = [row[lv] / (w[i] * math.sqrt(v[i][lv] / pair[lv]))
              for i, row in enumerate(table) for lv in (1, 2) if row[lv] < 1]
    assert len(ratios) > 30 and max(ratios) / min(ratios) == pytest.approx(1.0, abs=1e-12)
    assert probabilities.optimal_probabilities(v, COSTS, budget=1.0, weights=w) == [[1.0] * 3] * 30
    with pytest.raises(ValueError, match=r"budget: must exceed 0.0625"):
        probabilities.optimal_probabilities(v, COSTS, budget=0.05)


def test_measure_flops_counts_matmuls_and_convolutions_per_sample():
    conv = torch.nn.Conv2d(2, 4, 3, padding=1, bias=False)
    sch = schedules.LinearVP()
    m = fewstep.Model(lambda x, t: conv(x).sum(1, keepdim=True).expand_as(x), sch, sample_shape=(2, 8, 8))
    expected = 2 * (2 * 4 * 9) * 64  # 2 FLOPs per multiply-add, 8x8 outputs
    assert cost.measure_flops(m) == expected
    assert m.nfe == 0 and m.calls == 0
    # conditioning with one entry per sample and classifier-free guidance (two halves per call)
    net = lambda x, t, label: conv(x).sum(1, keepdim=True).expand_as(x) + label.reshape(-1, 1, 1, 1)  # noqa: E731
    base = fewstep.Model(net, sch, sample_shape=(2, 8, 8))
    assert cost.measure_flops(base.with_cond(label=torch.arange(5.0))) == expected
    guided = base.guided(2.0, uncond={"label": torch.tensor([0.0])}, label=torch.arange(3.0))
    assert cost.measure_flops(guided) == 2 * expected
    with pytest.raises(ValueError, match="sample_shape"):
        cost.measure_flops(fewstep.Model(lambda x, t: x, sch))
    with pytest.raises(ValueError, match=r"counted no FLOPs for family\[0\]"):
        cost.family_flops([fewstep.Model(lambda x, t: x, sch, sample_shape=(3,))] * 2)


def test_solver_measures_costs_when_not_given():
    sch = schedules.LinearVP()
    nets = [torch.nn.Linear(6, 6, bias=False).double() for _ in range(2)]
    fam = [fewstep.Model(lambda x, t, n=n: n(x), sch, prediction="eps", sample_shape=(6,)) for n in nets]
    for n in nets:
        n.requires_grad_(False)
    stats = multilevel.MLEMStats()
    fewstep.sample(fam[-1], _noise(3, 6), solver="mlem", family=fam, probabilities=[1.0, 0.5], nfe=4,
                   generator=_gen(), stats=stats, seed=0)
    assert stats.costs == [72.0, 72.0]


def test_gamma_recovers_a_power_law():
    c = [1.0, 4.0, 16.0, 64.0]
    fit = gamma.estimate_gamma(c, [0.7 * x ** (-1 / 2.5) for x in c])
    assert fit.gamma == pytest.approx(2.5, rel=1e-12) and fit.points == 4
    assert fit.error_at(8.0) == pytest.approx(0.7 * 8 ** (-0.4))
    assert gamma.estimate_gamma([1, 4], [0.1, 0.2]).gamma == math.inf
    assert gamma.level_errors([[9.0, 4.0, 1.0], [9.0, 4.0, 1.0]]) == [2.0, 1.0]
    with pytest.raises(ValueError, match="errors: every entry must be a positive"):
        gamma.estimate_gamma([1, 4], [0.1, 0.0])


# ------------------------------------------------------------------------------------------- pilot
def _constant_family(values, sch, dim=3):
    return [fewstep.Model(lambda x, t, v=v: torch.full_like(x, v), sch, prediction="x0", sample_shape=(dim,))
            for v in values]


def test_pilot_measures_level_differences_and_sets_the_rule():
    """Constant data predictions: V_l = (v_l - v_(l-1))^2 exactly at every node, and the pilot's calls
    are counted separately from sampling."""
    sch = schedules.LinearVP()
    fam = _constant_family([0.5, 0.3, 0.35], sch)
    stats = multilevel.MLEMStats()
    fewstep.sample(fam[-1], _noise(10, 3), solver="mlem", family=fam, costs=COSTS, budget=0.4, nfe=30,
                   pilot_points=5, pilot_samples=4, generator=_gen(), stats=stats, seed=2)
    assert [v for row in stats.pilot_variances for v in row] == pytest.approx([0.25, 0.04, 0.0025] * 5, rel=1e-12)
    assert stats.pilot_flops == 5 * 4 * sum(COSTS)
    assert cost.expected_flops(stats.probabilities, COSTS) == pytest.approx(0.4 * 16 * 30, rel=1e-8)
    cal = multilevel.calibrate(fam, _noise(4, 3), nfe=30, costs=COSTS, budget=0.4, points=5)
    assert sum(cal.probabilities, []) == pytest.approx(sum(stats.probabilities, []), rel=1e-9)
    assert cal.expected_ratio == pytest.approx(0.4, rel=1e-8)
    assert cal.with_budget(0.2).expected_ratio == pytest.approx(0.2, rel=1e-8)
    assert pilot.pilot_indices(30, 5) == [0, 7, 14, 22, 29]


def test_pilot_interpolates_rms_linearly_between_nodes():
    lv = pilot.LevelVariances([0, 4], [1.0, 0.5], [[1.0, 4.0], [9.0, 16.0]], 2)
    table = lv.interpolate(5)
    assert [math.sqrt(r[1]) for r in table] == pytest.approx([2.0, 2.5, 3.0, 3.5, 4.0])


# ------------------------------------------------------------------------- conditioning, counters
def test_per_sample_subsets_follow_each_samples_label():
    """Two identical label-conditioned networks: whatever the draws, the weights of the two sum to 1,
    so ML-EM must equal EM with one of them — only if every subset call sees its own samples' labels."""
    sch = schedules.LinearVP()
    net = lambda x, t, label: 0.3 * x + 0.1 * label.to(x.dtype).reshape(-1, 1)  # noqa: E731
    base = fewstep.Model(net, sch, prediction="eps", sample_shape=(5,))
    labels = torch.arange(16) % 10
    fam = [base.with_cond(label=labels), base.with_cond(label=labels)]
    noise = _noise(16, 5)
    stats = multilevel.MLEMStats()
    got, info = fewstep.sample(fam[-1], noise, solver="mlem", family=fam, costs=[1.0, 4.0], probabilities=[1.0, 0.4],
                               nfe=10, generator=_gen(), seed=1, stats=stats, return_info=True)
    want = fewstep.sample(fam[-1], noise, solver="em", nfe=10, generator=_gen())
    assert float((got - want).abs().max()) < 1e-12
    assert 0 < stats.rows[1] < 10 * 16 and info.nfe == stats.calls[1] == fam[1].nfe - 10
    guided = [base.guided(2.0, uncond={"label": torch.tensor([10])}, label=labels)] * 2
    got = fewstep.sample(guided[-1], noise, solver="mlem", family=[guided[0], guided[1]], costs=[1.0, 4.0],
                         probabilities=[1.0, 0.4], nfe=10, generator=_gen(), seed=1)
    want = fewstep.sample(guided[-1], noise, solver="em", nfe=10, generator=_gen())
    assert float((got - want).abs().max()) < 1e-12


# ------------------------------------------------------------------------------------------ errors
def test_bad_inputs_name_the_argument(family):
    gm, sch, fam = family
    noise = _noise(2, gm.dim)

    def run(**kw):
        kw = {"family": fam, "costs": COSTS, **kw}
        return fewstep.sample(fam[-1], noise, solver="mlem", nfe=4, generator=_gen(), **kw)

    with pytest.raises(ValueError, match=r"family: mlem needs family="):
        fewstep.sample(fam[-1], noise, solver="mlem", nfe=4)
    with pytest.raises(TypeError, match=r"family: expected a list of fewstep.Model"):
        run(family=fam[0])
    with pytest.raises(ValueError, match=r"family: needs at least 2 models"):
        run(family=[fam[0]])
    with pytest.raises(TypeError, match=r"family\[1\]: expected a fewstep.Model"):
        run(family=[fam[0], "big"])
    with pytest.raises(ValueError, match=r"family: all models must share one prediction type"):
        run(family=[fam[0], gm.model(sch, prediction="x0")])
    with pytest.raises(ValueError, match=r"family\[0\]: its schedule differs"):
        run(family=[gm.model(schedules.CosineVP()), fam[1], fam[2]])
    with pytest.raises(ValueError, match=r"costs: expected 3 positive finite numbers"):
        run(costs=[1.0, -4.0, 16.0])
    with pytest.raises(ValueError, match=r"probabilities: expected a table of 4 steps x 3 levels"):
        run(probabilities=[[1.0, 0.5, 0.1]] * 3)
    with pytest.raises(ValueError, match=r"probabilities: every entry must be in \(0, 1\]"):
        run(probabilities=[1.0, 0.0, 0.1])
    with pytest.raises(ValueError, match=r"form: expected one of \['ddpm', 'ode', 'sde'\]"):
        run(form="heun")
    with pytest.raises(ValueError, match=r"pattern: expected one of \['per_sample', 'shared'\]"):
        run(pattern="random")
    with pytest.raises(ValueError, match=r"draws: expected one of \['independent', 'systematic'\]"):
        run(draws="sobol")
    with pytest.raises(ValueError, match=r"budget: expected a positive number"):
        run(budget=-1)
    with pytest.raises(ValueError, match=r"budget: must exceed 0.0625"):
        run(budget=0.05)
    with pytest.raises(ValueError, match=r"seed: expected a non-negative integer"):
        run(seed=1.5)
    with pytest.raises(ValueError, match=r"brownian: only for the stochastic forms"):
        run(form="ode", brownian=True)
    with pytest.raises(TypeError, match=r"stats: expected a fewstep.multilevel.MLEMStats"):
        run(stats={})
    with pytest.raises(ValueError, match=r"noise: mlem form='sde' draws noise"):
        solver = mlem.MultilevelEM(family=fam, costs=COSTS, probabilities=[1.0, 0.5, 0.5])
        plan, _ = fewstep.sample.__globals__["plan_for"](fam[-1], solver, 3, None)
        next(solver.run(plan, noise, None))


def test_registry_lists_mlem_as_needing_inputs():
    cls = fewstep.solvers.base.REGISTRY["mlem"]
    assert cls.stochastic and cls.needs_inputs
    row = next(r for r in fewstep.solvers.table() if r["name"] == "mlem")
    assert row["nfe_per_step"] == mlem.MultilevelEM.per_step_note


@pytest.mark.parametrize("module", [cost, estimator, gamma, pilot, probabilities, multilevel, mlem,
                                    multilevel.stats])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


# ------------------------------------------------------------------------------------------- bench
def test_equal_error_flops_interpolates_log_log_on_the_monotone_envelope():
    from fewstep.bench.mlem import equal_error_flops

    curve = [(100.0, 0.4), (400.0, 0.1), (800.0, 0.2)]  # the last point is worse: the envelope keeps 0.1
    assert equal_error_flops(curve, 0.2) == pytest.approx(200.0)
    assert equal_error_flops(curve, 0.1, margin=1.0) == pytest.approx(400.0)
    assert equal_error_flops(curve, 0.12) is None  # within 25% of the best error: the plateau
    assert equal_error_flops(curve, 0.5) is None and equal_error_flops(curve, 0.05) is None
    assert equal_error_flops(curve, 0.2, resolution=0.25) is None  # below the metric's noise level


def test_bench_mlem_tiny(tmp_path):
    import argparse

    from fewstep.bench import mlem as bench_mlem

    parser = argparse.ArgumentParser()
    bench_mlem.add_arguments(parser)
    args = parser.parse_args(["--family", "gmm2d", "--samples", "64", "--steps", "4,8", "--mlem-steps", "4,8",
                              "--budgets", "0.3",
                              "--pilot-samples", "16", "--pilot-points", "3", "--no-levels"])
    args.out = str(tmp_path)
    report = bench_mlem.run(args)
    text = report.markdown()
    assert [h for h, _ in report.sections] == ["Family", "Runs", "Equal-error FLOPs", "Pilot"]
    assert "gamma (error ∝ cost^(-1/gamma), 2 points)" in text and "floor: 64 independent exact draws" in text
    assert (tmp_path / "mlem.png").stat().st_size > 1000
    runs = report.sections[1][1]
    assert runs.count("| ML-EM |") == 2 and runs.count("| EM gmm2d+error 0.1 |") == 2
