"""HEROISM (reconstructed; ``solver="heroism"``): order, robustness, budget, parallel depth, low NFE."""
import math

import pytest
import torch

import fewstep
from fewstep import schedules, testbeds
from fewstep.bench.report import geomean

F64 = torch.float64
EDM = schedules.EDM()


def _noise(n, d, seed=0):
    return torch.randn(n, d, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _exact_x0_at(tb, noise, sch, t_last):
    """The exact data prediction at the last grid time: what the solver's result approximates."""
    return tb.denoise(tb.reference(noise, sch, t_end=t_last), sch, t_last)


def _rmse(a, b):
    return float((a - b).pow(2).mean().sqrt())


def _slope(nfes, errors):
    """Least-squares slope of -log(error) against log(NFE)."""
    lx = [math.log(n) for n in nfes]
    ly = [math.log(e) for e in errors]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return -sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


TESTBEDS = {"gaussian": testbeds.Gaussian(mean=0.3, std=0.5, dim=4), "gmm2d": testbeds.mixtures()["gmm2d"]}
STEPS = {"gaussian": (8, 16, 32, 64), "gmm2d": (16, 32, 64, 128)}
_TARGETS = {}


def _target(name):
    if name not in _TARGETS:
        tb = TESTBEDS[name]
        noise = _noise(16, tb.dim)
        _TARGETS[name] = (noise, _exact_x0_at(tb, noise, EDM, EDM.t_min))
    return _TARGETS[name]


# ------------------------------------------------------------------------------ empirical order
@pytest.mark.parametrize("quantity", ["x0", "score"])
@pytest.mark.parametrize("name", list(TESTBEDS))
@pytest.mark.parametrize("order", [2, 3, 4])
def test_collocation_reaches_order_k(order, name, quantity):
    """Exact scores, log-SNR grid, K nodes and the default N = K refinements: slope >= K - 0.3."""
    tb = TESTBEDS[name]
    noise, target = _target(name)
    solver = fewstep.solvers.get("heroism", mode="collocation", order=order, quantity=quantity)
    nfes, errors = [], []
    for steps in STEPS[name]:
        nfe = solver.nfe_for_points(steps + 1)
        out, info = fewstep.sample(tb.model(EDM, "eps"), noise, solver=solver, nfe=nfe, return_info=True)
        assert info.nfe == nfe and len(info.grid) == steps + 1
        nfes.append(info.nfe)
        errors.append(_rmse(out, target))
    assert _slope(nfes, errors) >= order - 0.3, errors


def test_chebyshev_lobatto_nodes_reach_order_k():
    noise, target = _target("gaussian")
    tb = TESTBEDS["gaussian"]
    solver = fewstep.solvers.get("heroism", mode="collocation", order=4, nodes="chebyshev")
    nfes = [solver.nfe_for_points(m + 1) for m in STEPS["gaussian"]]
    errors = [_rmse(fewstep.sample(tb.model(EDM), noise, solver=solver, nfe=n), target) for n in nfes]
    assert _slope(nfes, errors) >= 3.7, errors


@pytest.mark.parametrize("order", [2, 3])
def test_multistep_mode_reaches_order_k(order):
    """One refinement of the newest node raises the order-(K-1) predictor to K."""
    noise, target = _target("gaussian")
    tb = TESTBEDS["gaussian"]
    nfes = (40, 80, 160)
    errors = [_rmse(fewstep.sample(tb.model(EDM), noise, solver="heroism", nfe=n, order=order), target) for n in nfes]
    assert _slope(nfes, errors) >= order - 0.3, errors


# ---------------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("options", [dict(mode="collocation", order=3, nfe=71), dict(nfe=20)],
                         ids=["collocation", "multistep"])
def test_error_grows_at_most_linearly_with_the_score_error(options):
    gm = testbeds.mixtures()["gmm16"]
    noise = _noise(32, gm.dim)
    target = _exact_x0_at(gm, noise, EDM, EDM.t_min)
    outs = {}
    for delta in (0.0, 1e-3, 1e-2, 1e-1):
        error = testbeds.perturbed(gm, delta) if delta else None
        outs[delta] = fewstep.sample(gm.model(EDM, "eps", error=error), noise, solver="heroism", **options)
    e0 = _rmse(outs[0.0], target)
    shift = {d: _rmse(outs[d], outs[0.0]) for d in (1e-3, 1e-2, 1e-1)}
    for d in shift:
        assert _rmse(outs[d], target) - e0 <= 4.0 * d
        assert shift[d] <= 4.0 * d
    # the response to the error is linear over two decades: log-log slope 1 +- 0.2
    slope = math.log(shift[1e-1] / shift[1e-3]) / math.log(100.0)
    assert 0.8 <= slope <= 1.2, shift


# ----------------------------------------------------------------------- budget and parallelism
def test_jacobi_sweeps_batch_the_nodes_of_a_round():
    tb = TESTBEDS["gaussian"]
    noise = _noise(4, tb.dim)
    model = tb.model(EDM)
    # K = 3, N = 3: 1 + 3 * 2 = 7 evaluations per step; nfe = 50 buys M = 7 steps exactly
    out_j, info_j = fewstep.sample(model, noise, solver="heroism", mode="collocation", order=3, nfe=50,
                                   return_info=True)
    steps = len(info_j.grid) - 1
    assert (steps, info_j.nfe) == (7, 50)
    assert info_j.calls == (steps + 1) + steps * 3 == 29 < info_j.nfe
    solver = fewstep.solvers.get("heroism", mode="collocation", order=3)
    assert solver.calls_for_points(steps + 1) == info_j.calls
    out_g, info_g = fewstep.sample(model, noise, solver="heroism", mode="collocation", order=3, nfe=50,
                                   sweep="gauss-seidel", return_info=True)
    assert info_g.nfe == info_g.calls == 50
    target = _exact_x0_at(tb, noise, EDM, EDM.t_min)
    assert _rmse(out_j, target) < 5e-3 and _rmse(out_g, target) < 5e-3


@pytest.mark.parametrize("options", [dict(mode="collocation", order=4, refinements=2), dict(order=3),
                                     dict(order=4, refinements=3)], ids=["collocation", "multistep", "multistep-n3"])
def test_never_exceeds_the_budget(options):
    tb = TESTBEDS["gaussian"]
    noise = _noise(2, tb.dim)
    solver = fewstep.solvers.get("heroism", **options)
    per_step = solver.nfe_for_points(3) - solver.nfe_for_points(2)
    for nfe in range(solver.min_nfe(), solver.min_nfe() + 3 * per_step + 1):
        _, info = fewstep.sample(tb.model(EDM), noise, solver=solver, nfe=nfe, return_info=True)
        assert nfe - per_step < info.nfe <= nfe
        assert info.nfe == solver.nfe_for_points(len(info.grid))


# ------------------------------------------------------------------------------------- low NFE
def test_default_mode_beats_dpmpp3_at_low_nfe():
    """gmm2d, EDM, log-SNR grid for both: geometric-mean RMSE over NFE 10-20 below DPM-Solver++(3M)'s."""
    gm = testbeds.mixtures()["gmm2d"]
    noise = _noise(256, gm.dim, seed=2)
    target = _exact_x0_at(gm, noise, EDM, EDM.t_min)
    errors = {"heroism": [], "dpm++": []}
    for nfe in (10, 12, 15, 20):
        for solver, options in (("heroism", {}), ("dpm++", {"order": 3})):
            out, info = fewstep.sample(gm.model(EDM), noise, solver=solver, nfe=nfe, grid="logsnr",
                                       return_info=True, **options)
            assert info.nfe == nfe
            errors[solver].append(_rmse(out, target))
    assert geomean(errors["heroism"]) <= 0.8 * geomean(errors["dpm++"]), errors


@pytest.mark.parametrize("quantity", ["x0", "score"])
@pytest.mark.parametrize("mode", ["multistep", "collocation"])
def test_every_prediction_type_gives_the_same_run(mode, quantity):
    tb = TESTBEDS["gaussian"]
    sch = schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000))
    noise = _noise(4, tb.dim)
    nfe = 71 if mode == "collocation" else 22  # collocation: 10 steps of 7 evaluations
    outs = [fewstep.sample(tb.model(sch, p), noise, solver="heroism", nfe=nfe, mode=mode, quantity=quantity)
            for p in ("eps", "x0", "v", "flow")]
    for out in outs[1:]:
        assert float((out - outs[0]).abs().max()) < 1e-9
    assert _rmse(outs[0], _exact_x0_at(tb, noise, sch, sch.t_min)) < 5e-3


@pytest.mark.parametrize("mode", ["multistep", "collocation"])
def test_flow_from_pure_noise(mode):
    """The data form starts from alpha = 0 (lambda = -inf) in the coordinate alpha / sigma."""
    tb = TESTBEDS["gaussian"]
    sch = schedules.RectifiedFlow()
    noise = _noise(4, tb.dim)
    out = fewstep.sample(tb.model(sch, "flow"), noise, solver="heroism", nfe=71 if mode == "collocation" else 30,
                         mode=mode)
    assert _rmse(out, _exact_x0_at(tb, noise, sch, sch.t_min)) < 1e-2


# ----------------------------------------------------------------------------------- bad input
def test_bad_input():
    get = fewstep.solvers.get
    with pytest.raises(ValueError, match=r"order: heroism supports orders \[2, 3, 4, 5, 6\], got 1"):
        get("heroism", order=1)
    with pytest.raises(ValueError, match=r"order: heroism supports orders .*got 7"):
        get("heroism", order=7)
    with pytest.raises(ValueError, match=r"refinements: expected an integer >= 0, got -1"):
        get("heroism", refinements=-1)
    with pytest.raises(ValueError, match=r"refinements: expected an integer >= 0, got 1.5"):
        get("heroism", refinements=1.5)
    for key, valid in (("mode", "'multistep', 'collocation'"), ("quantity", "'x0', 'score'"),
                       ("nodes", "'equispaced', 'chebyshev'"), ("sweep", "'jacobi', 'gauss-seidel'")):
        with pytest.raises(ValueError, match=rf"{key}: heroism accepts \[{valid}\], got 'bogus'"):
            get("heroism", **{key: "bogus"})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['stages'\]"):
        get("heroism", stages=2)

    solver = get("heroism", mode="collocation", order=3, refinements=2)  # 1 + 2 * 2 = 5 per step
    assert solver.min_nfe() == 6
    with pytest.raises(ValueError, match=r"nfe: heroism \(mode='collocation', order=3, refinements=2\) needs nfe >= 6, got 5"):
        solver.num_points(5)
    model = TESTBEDS["gaussian"].model(EDM)
    noise = _noise(2, 4)
    with pytest.raises(ValueError, match=r"nfe: heroism with these options needs nfe >= 6, got 5"):
        fewstep.sample(model, noise, solver=solver, nfe=5)
    with pytest.raises(ValueError, match=r"nfe: heroism with these options needs nfe >= 2, got 1"):
        fewstep.sample(model, noise, solver="heroism", nfe=1)
    with pytest.raises(ValueError, match=r"grid: heroism .* needs at least 2 points, got 1"):
        fewstep.sample(model, noise, solver="heroism", grid=torch.tensor([80.0]))
    with pytest.raises(ValueError, match=r"nfe: the grid's 3 points cost 11 evaluations with heroism, more than nfe=10"):
        fewstep.sample(model, noise, solver=solver, grid=torch.tensor([80.0, 1.0, 0.002]), nfe=10)
    flow = TESTBEDS["gaussian"].model(schedules.RectifiedFlow(), "flow")
    with pytest.raises(ValueError, match=r"quantity: 'score' .* needs alpha > 0 at the first grid time"):
        fewstep.sample(flow, noise, solver="heroism", nfe=10, quantity="score")


# ------------------------------------------------------------------------------------- bench
def test_bench_refine_part_and_its_arguments(tmp_path):
    import argparse

    from fewstep.bench import heroism as bench

    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    bench.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--parts", "refine", "--samples-order", "4"])
    report = bench.run(args)
    (heading, body), = report.sections
    assert heading.startswith("Refinement rounds")
    rows = [line.split("|")[1:-1] for line in body.splitlines() if line.startswith("| ") and "NFE" not in line]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3, 4, 5]
    for n, nfe, calls, *_ in ([int(v) for v in r[:3]] for r in rows):
        assert nfe == 33 + 32 * 2 * n and calls == 33 + 32 * n  # K = 3, M = 32: Jacobi batches 2 nodes
    errors = [float(r[3]) for r in rows]
    assert errors[1] < errors[0] / 10 and errors[2] < errors[1] / 5  # each round buys accuracy
    with pytest.raises(ValueError, match=r"parts: unknown \['speed'\]"):
        bench.run(parser.parse_args(["--parts", "speed"]))
