"""Property-based checks over random schedules, grids, budgets and batch shapes, and thread safety."""
import re
import threading

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import fewstep
from fewstep import grids, schedules, testbeds
from fewstep.solvers.base import REGISTRY

F64 = torch.float64
# solvers that need extra inputs (a file, a model family) are exercised by their own tests
SELF_CONTAINED = sorted(n for n, cls in REGISTRY.items() if not cls.needs_inputs)


@st.composite
def schedule_strategy(draw):
    kind = draw(st.sampled_from(["discrete", "linear_vp", "cosine_vp", "edm", "flow"]))
    if kind == "discrete":
        n = draw(st.integers(20, 1000))
        b0 = draw(st.floats(1e-5, 1e-3))
        b1 = draw(st.floats(5e-3, 0.05))
        return schedules.DiscreteVP.from_betas(torch.linspace(b0, b1, n, dtype=F64))
    if kind == "linear_vp":
        return schedules.LinearVP(beta_min=draw(st.floats(0.01, 1.0)), beta_max=draw(st.floats(5.0, 30.0)))
    if kind == "cosine_vp":
        return schedules.CosineVP()
    if kind == "edm":
        return schedules.EDM(sigma_min=draw(st.floats(1e-3, 0.05)), sigma_max=draw(st.floats(5.0, 120.0)))
    return schedules.RectifiedFlow(t_min=draw(st.floats(1e-3, 0.05)), t_max=draw(st.floats(0.9, 0.999)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sch=schedule_strategy(),
    solver=st.sampled_from(SELF_CONTAINED),
    grid=st.sampled_from(grids.NAMES),
    nfe=st.integers(1, 14),
    batch=st.integers(1, 4),
    dim=st.integers(1, 5),
    pred=st.sampled_from(["eps", "x0", "v", "flow"]),
    seed=st.integers(0, 2**16),
)
def test_any_configuration_samples_finitely_within_budget(sch, solver, grid, nfe, batch, dim, pred, seed):
    s = fewstep.solvers.get(solver)
    assume(nfe >= s.min_nfe())
    g = torch.Generator().manual_seed(seed)
    model = testbeds.Gaussian(mean=0.5, std=0.3, dim=dim).model(sch, prediction=pred)
    noise = torch.randn(batch, dim, dtype=F64, generator=g)
    out, info = fewstep.sample(model, noise, solver=s, nfe=nfe, grid=grid, generator=g, return_info=True)
    assert out.shape == noise.shape
    assert bool(torch.isfinite(out).all())
    promised = s.nfe_for_points(s.num_points(nfe))
    assert info.nfe == promised <= nfe


def test_solvers_are_safe_to_share_across_threads():
    sch = schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000))
    gm = testbeds.mixtures()["gmm16"]
    noises = [torch.randn(32, 16, dtype=F64, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    for name in SELF_CONTAINED:
        solver = fewstep.solvers.get(name)
        if solver.min_nfe() > 8:
            continue
        model = gm.model(sch, "eps")

        def run(k):
            gen = torch.Generator().manual_seed(100 + k)
            return fewstep.sample(model, noises[k], solver=solver, nfe=8, generator=gen)

        serial = [run(0), run(1)]
        results = [None, None]

        def worker(k):
            results[k] = run(k)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for k in range(2):
            assert torch.equal(results[k], serial[k]), name


@pytest.mark.parametrize("name", SELF_CONTAINED)
def test_every_solver_rejects_unknown_options(name):
    with pytest.raises(ValueError, match=re.escape(f"{name}: unknown option(s) ['definitely_not_an_option']")):
        fewstep.solvers.get(name, definitely_not_an_option=1)
