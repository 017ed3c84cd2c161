"""fewstep bench: metric functions on known cases, the accuracy/order harnesses on tiny configs, and
atomic report files. No timings are asserted (they belong in the benchmark reports)."""
import math
import os
import types

import pytest
import torch

from fewstep import grids as fewstep_grids
from fewstep import testbeds
from fewstep.bench import accuracy, distribution, order, overhead, targets
from fewstep.bench.report import Report, atomic_path

F64 = torch.float64


# ------------------------------------------------------------------------------------ distribution
def test_sliced_w2_of_identical_sets_is_zero():
    x = torch.randn(500, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert distribution.sliced_w2(x, x) == 0.0


def test_sliced_w2_in_one_dimension_is_the_shift():
    x = torch.randn(800, 1, dtype=F64, generator=torch.Generator().manual_seed(1))
    assert distribution.sliced_w2(x, x + 0.7, projections=3) == pytest.approx(0.7, rel=1e-12)


def test_sliced_w2_of_shifted_gaussians_is_shift_over_sqrt_dim():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 8, dtype=F64, generator=g)
    shift = torch.zeros(8, dtype=F64)
    shift[0] = 2.0
    # E_theta (theta . c)^2 = |c|^2 / d for directions uniform on the sphere (Monte Carlo over
    # 4096 directions: about 1% standard error)
    assert distribution.sliced_w2(x, x + shift, projections=4096) == pytest.approx(2.0 / math.sqrt(8), rel=0.03)


def test_w2_1d_unequal_sizes_exact():
    # quantile functions differ by 0.5 on (1/3, 2/3): W2^2 = 0.25 * 1/3 = 1/12
    a = torch.tensor([[0.0], [1.0]], dtype=F64)
    b = torch.tensor([[0.5], [0.0], [1.0]], dtype=F64)
    assert float(distribution.w2_1d(a, b)[0]) == pytest.approx(1.0 / 12.0, rel=1e-12)


def test_median_bandwidth_known_points():
    a = torch.tensor([[0.0], [1.0], [3.0]], dtype=F64)  # distances 1, 2, 3
    assert distribution.median_bandwidth(a) == 2.0


def test_mmd_matches_closed_form_for_shifted_gaussians():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3000, 1, dtype=F64, generator=g)
    y = torch.randn(3000, 1, dtype=F64, generator=g) + 1.0
    z = torch.randn(3000, 1, dtype=F64, generator=g)
    h, mu = 1.0, 1.0
    exact = 2.0 * math.sqrt(h * h / (h * h + 2.0)) * (1.0 - math.exp(-mu * mu / (2.0 * (h * h + 2.0))))
    assert exact == pytest.approx(0.17727, abs=1e-5)
    assert distribution.mmd(x, y, bandwidth=h) == pytest.approx(exact, abs=0.01)
    assert abs(distribution.mmd(x, z, bandwidth=h)) < 2e-3
    # MMDTo with the same kernel is the same estimator
    assert distribution.MMDTo(y, bandwidth=h)(x) == pytest.approx(distribution.mmd(x, y, bandwidth=h), rel=1e-12)


def test_metric_input_errors_name_the_argument():
    x = torch.zeros(5, 2, dtype=F64)
    with pytest.raises(ValueError, match="a, b: sample dimensions"):
        distribution.sliced_w2(x, torch.zeros(5, 3, dtype=F64))
    with pytest.raises(ValueError, match="projections"):
        distribution.sliced_w2(x, x, projections=0)
    with pytest.raises(TypeError, match="a: expected a torch.Tensor"):
        distribution.sliced_w2([1, 2], x)
    with pytest.raises(ValueError, match="median bandwidth is zero"):
        distribution.mmd(x, x)


def test_distribution_harness_tiny():
    res = distribution.measure_testbed("gmm2d", [6], samples=64, seed=0, projections=16)
    assert distribution.DIFFUSERS_SA in res.rows and distribution.ODE_ROW in res.rows
    for name in distribution.stochastic_solvers():
        assert name in res.rows
    for cells in res.rows.values():
        c = cells[6]
        assert c.note == "" and math.isfinite(c.sw2) and math.isfinite(c.mmd)
    assert 0 < res.floor.sw2 < 0.5


# ---------------------------------------------------------------------------------------- targets
def test_expand_targets():
    assert targets.expand("gmm,gaussian") == ["gmm2d", "gmm16", "gmm64", "gaussian"]
    assert targets.expand("gmm2d, gmm") == ["gmm2d", "gmm16", "gmm64"]
    with pytest.raises(ValueError, match="target: unknown name 'mnist'"):
        targets.expand("mnist")


def test_angle_reference_matches_exact_gaussian_flow():
    gm = testbeds.Gaussian(mean=0.3, std=0.5, dim=3)
    sch = targets.linear_schedule()
    noise = targets.fixed_noise(6, (3,), 0)
    exact = gm.denoise(gm.reference(noise, sch, t_end=0.0), sch, 0.0)
    coarse = targets.angle_reference(gm.model(sch, dtype=F64), noise, 111)
    fine = targets.angle_reference(gm.model(sch, dtype=F64), noise, 333)
    e_coarse = float((coarse - exact).abs().max())
    e_fine = float((fine - exact).abs().max())
    assert e_fine < 1e-9
    assert 40 < e_coarse / e_fine < 160  # RK4: a third of the step divides the error by ~3^4 = 81


def test_testbed_target_reference_and_rmse():
    t = targets.build("gaussian", samples=5)
    assert t.noise.shape == (5, 16) and t.reference.dtype == F64
    assert t.rmse(t.reference) == 0.0
    assert t.rmse(t.reference + 0.25) == pytest.approx(0.25, rel=1e-12)
    floor = targets.denoise_floor(t)
    assert 0 < floor < 1e-3


# ---------------------------------------------------------------------------------------- accuracy
def _result_with(peers: dict) -> accuracy.TargetResult:
    t = targets.build("gaussian", samples=2)
    res = accuracy.TargetResult(target=t, nfes=[4, 6])
    for label, errs in peers.items():
        res.peers[label] = errs
        res.peer_family[label] = label.split(",")[0]
    return res


def test_best_peer_is_the_min_over_finite_configs():
    res = _result_with({"A, x": {4: math.nan, 6: 0.3}, "B, y": {4: 0.2, 6: 0.5}, "B, z": {4: 0.1, 6: math.nan}})
    assert res.best_peer(4) == (0.1, "B, z")
    assert res.best_peer(6) == (0.3, "A, x")
    assert res.best_in_family("B", 6) == (0.5, "B, y")
    res.fewstep["mine"] = {4: 0.05, 6: None}
    assert res.ratio("mine", 4) == pytest.approx(0.5)
    assert math.isnan(res.ratio("mine", 6))
    empty = _result_with({"A, x": {4: math.nan, 6: math.nan}})
    assert math.isnan(empty.best_peer(4)[0])


def test_accuracy_harness_tiny_config():
    t = targets.build("gaussian", samples=8)
    rows = [accuracy.FewstepRow("ddim", "ddim"), accuracy.FewstepRow("ddim | karras", "ddim", (), "karras")]
    peers = accuracy.peer_configs(["DDIM", "DPM-Solver++ 2M"])[:5]
    res = accuracy.measure(t, [4, 6], rows, peers)
    for errs in list(res.fewstep.values()) + list(res.peers.values()):
        assert all(math.isfinite(errs[n]) and 0 < errs[n] < 1 for n in (4, 6))
    for n in (4, 6):
        best, label = res.best_peer(n)
        assert best == min(errs[n] for errs in res.peers.values())
        assert res.peers[label][n] == best
    assert res.defects == []
    table = accuracy.error_table(res, ["ddim", "ddim | karras"])
    assert "best peer (oracle)" in table and "nan" not in table


def test_fewstep_row_that_cannot_run_is_blank_with_the_reason():
    t = targets.build("gaussian", samples=2)
    e, why = accuracy.run_fewstep(t, accuracy.FewstepRow("nope", "nope"), 4)
    assert e is None and "solver: unknown name 'nope'" in why
    e, why = accuracy.run_fewstep(t, accuracy.FewstepRow("ddim", "ddim"), 4)
    assert why is None and 0 < e < 1


def test_open_grid_spends_no_evaluation_at_t_min():
    sch = targets.linear_schedule()
    g = accuracy.open_grid("logsnr", sch, 5)
    assert g.shape == (5,) and float(g[0]) == sch.t_max and float(g[-1]) > sch.t_min + 1.0
    full = fewstep_grids.make("logsnr", sch, 6)
    assert torch.equal(g, full[:-1])
    assert accuracy.grid_names()[:2] == ("uniform", "uniform-open")
    t = targets.build("gaussian", samples=4)
    e_named, _ = accuracy.run_fewstep(t, accuracy.FewstepRow("ddim @ logsnr", "ddim", (), "logsnr"), 6)
    e_open, why = accuracy.run_fewstep(t, accuracy.FewstepRow("ddim @ logsnr-open", "ddim", (), "logsnr-open"), 6)
    assert why is None and 0 < e_open < 1 and e_open != e_named


def test_peer_configs_cover_every_spacing_option():
    labels = [p.label for p in accuracy.peer_configs()]
    assert len(labels) == len(set(labels))
    dpm2 = [p.kwargs() for p in accuracy.peer_configs(["DPM-Solver++ 2M"])]
    assert {d.get("timestep_spacing") for d in dpm2} >= {"linspace", "leading", "trailing"}
    for key in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas"):
        assert sum(bool(d.get(key)) for d in dpm2) == 2  # once with each final_sigmas_type
    assert {d["final_sigmas_type"] for d in dpm2} == {"zero", "sigma_min"}
    with pytest.raises(ValueError, match="families: unknown"):
        accuracy.peer_configs(["Nope"])


def test_merge_identical_rows():
    res = _result_with({})
    res.fewstep = {"fewstep default": {4: 0.1, 6: 0.2}, "ddim": {4: 0.1, 6: 0.2}, "dpm++ o1": {4: 0.1, 6: 0.2},
                   "dpm++ o2": {4: 0.1, 6: 0.15}}
    merged = accuracy.merge_identical(res, list(res.fewstep))
    assert merged == [("fewstep default", "fewstep default"), ("ddim = dpm++ o1", "ddim"), ("dpm++ o2", "dpm++ o2")]


def test_ratio_summary_geomean():
    res = _result_with({"A, x": {4: 0.2, 6: 0.1}})
    res.nfes = [4, 6]
    res.fewstep[accuracy.DEFAULT_LABEL] = {4: 0.1, 6: 0.4}
    table, total = accuracy.ratio_summary([res], headline=(4, 6))
    assert total == pytest.approx(math.sqrt(0.5 * 4.0))
    assert "gaussian" in table


def test_accuracy_cli_writes_report_and_plot(tmp_path):
    args = types.SimpleNamespace(target="gaussian", nfe="4,6", samples=4, seed=0, grids=False, no_peers=True,
                                 out=str(tmp_path))
    report = accuracy.run(args)
    path = report.write(tmp_path)
    text = path.read_text()
    assert "gaussian: RMSE" in text and "accuracy_gaussian.png" in text
    png = tmp_path / "accuracy_gaussian.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["accuracy_gaussian.png", "report.md"]  # no temporary files left


def test_bad_nfe_list():
    with pytest.raises(ValueError, match="nfe: expected"):
        accuracy._int_list("4,x")
    with pytest.raises(ValueError, match="nfe: expected positive"):
        accuracy._int_list("0,4")


# ------------------------------------------------------------------------------------------- order
def test_fitted_order_of_exact_power_laws():
    steps = [8, 16, 32, 64, 128]
    assert order.fitted_order(steps, [3.0 * s**-2.5 for s in steps]) == pytest.approx(2.5, rel=1e-12)
    # runs under the rounding floor are left out of the fit
    errs = [1e-3 * (8 / s) ** 4 for s in steps[:3]] + [1e-14, 1e-15]
    assert order.fitted_order(steps, errs) == pytest.approx(4.0, rel=1e-12)
    assert math.isnan(order.fitted_order([8], [1e-3]))


def test_ddim_is_first_order_on_the_gaussian():
    gm = targets.exact_testbed("gaussian")
    noise = targets.fixed_noise(8, (gm.dim,), 0)
    res = order.measure_order(gm, noise, "ddim", "ddim", {}, [16, 32, 64])
    assert res.theory == 1
    assert res.fitted == pytest.approx(1.0, abs=0.1)


# ------------------------------------------------------------------------------------------ report
def test_report_write_is_atomic(tmp_path):
    rep = Report(title="t")
    rep.add("s", "body")
    path = rep.write(tmp_path / "sub")
    assert path.read_text().startswith("# t")
    assert os.listdir(tmp_path / "sub") == ["report.md"]
    target = tmp_path / "x.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("partial")
            raise RuntimeError("interrupted")
    assert not target.exists()
    assert [p for p in os.listdir(tmp_path) if p != "sub"] == []  # the temporary file is gone too


# ---------------------------------------------------------------------------------------- overhead
def test_overhead_contenders_run_and_agree():
    items = overhead.contenders(steps=4, shape=(1, 2, 4, 4))
    overhead.time_interleaved(items, repeats=1, warmup=0)
    for c in items:
        assert len(c.whole_us) == 1 and len(c.loop_us) == 1
        out = c.loop(c.setup())
        assert torch.isfinite(out).all()
    by = {c.label: c for c in items}
    assert set(overhead.MULTISTEP) <= set(by)  # the "every multistep solver" verdict names them all
    # the bench's bare loop drives the same generator as fewstep.sample
    ddim = by["fewstep ddim"]
    assert torch.allclose(ddim.loop(ddim.setup()), ddim.whole(), rtol=0, atol=1e-6)
