"""Forward-value sampler (``solver="fv"``): F-DDIM / F-DPMSolver of Jiao, Li, Cai & Li (2025)."""
import math

import pytest
import torch

import fewstep
from fewstep import schedules, testbeds
from fewstep.bench.report import geomean

F64 = torch.float64


def _noise(n, d, seed=0):
    return torch.randn(n, d, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _target(tb, noise, sch, info):
    """The exact counterpart of a data prediction made at the last grid time."""
    t_last = info.grid[-1]
    return tb.denoise(tb.reference(noise, sch, t_end=t_last), sch, t_last)


# ------------------------------------------------------------------------ parity with the paper
def _authors_algorithm(eps_of, noise, abar, order):
    """The F-DPMSolver loop as written in the authors' ``sampler.py`` (research notes §2.2–2.3),
    re-derived here independently in numpy-like torch: VP state, eps history started with the noise,
    Vandermonde interpolation in lambda, phi_k recursion; returns the last data prediction."""
    x, eps_hist = noise.clone(), [noise.clone()]
    lam = 0.5 * torch.log(abar / (1 - abar))
    x0 = None
    for i in range(abar.numel() - 1):
        q = min(i + 1, order, len(eps_hist))
        ls = lam[i - q + 1:i + 1].flip(0)  # lam_i, lam_{i-1}, ...
        vander = (ls - ls[0])[:, None] ** torch.arange(q, dtype=F64)[None, :]
        coef = torch.linalg.solve(vander, torch.stack([e.reshape(-1) for e in eps_hist[:q]]))
        h = lam[i + 1] - lam[i]
        phis = [1 - torch.exp(-h)]
        for k in range(1, q):
            phis.append(k * phis[-1] - h**k * torch.exp(-h))
        integral = sum(phis[k] * coef[k] for k in range(q)).reshape(x.shape)
        x_hat = torch.sqrt(abar[i + 1] / abar[i]) * x - torch.sqrt(abar[i + 1]) * torch.exp(-lam[i]) * integral
        eps = eps_of(x_hat, i + 1)
        x0 = (x_hat - torch.sqrt(1 - abar[i + 1]) * eps) / torch.sqrt(abar[i + 1])
        r = torch.sqrt((1 - abar[i + 1]) / (1 - abar[i]))
        x = r * x + (torch.sqrt(abar[i + 1]) - r * torch.sqrt(abar[i])) * x0
        eps_hist = [eps] + eps_hist[: order - 1]
    return x0


@pytest.mark.parametrize("order", [1, 2, 3])
def test_matches_the_authors_algorithm_on_a_discrete_schedule(order):
    sch = schedules.DiscreteVP.from_betas(torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=F64) ** 2)
    gm = testbeds.mixtures()["gmm16"]
    times = torch.linspace(999, 0, 9, dtype=F64).round()  # the LDM setting: uniform integer timesteps
    abar = sch.alphas_cumprod[times.long()]
    noise = _noise(8, gm.dim)

    def eps_of(x, i):
        return gm.posterior(x, abar[i].sqrt(), (1 - abar[i]).sqrt())[1]

    ours, info = fewstep.sample(gm.model(sch, "eps"), noise, solver="fv", grid=times, order=order, return_info=True)
    theirs = _authors_algorithm(eps_of, noise, abar, order)
    assert info.nfe == 8 and info.calls == 8
    assert float((ours - theirs).abs().max()) < 1e-10


# ------------------------------------------------------------------------------- budget
def test_one_evaluation_per_step_and_the_first_is_free():
    sch = schedules.EDM()
    gm = testbeds.Gaussian(mean=0.3, std=0.5, dim=2)
    model = gm.model(sch, "eps")
    seen = []
    net = model.net
    model.net = lambda x, mt: (seen.extend(mt.tolist()), net(x, mt))[1]
    _, info = fewstep.sample(model, _noise(4, 2), solver="fv", nfe=7, grid="karras", return_info=True)
    assert info.nfe == 7 and len(info.grid) == 8 and info.grid[0] == sch.t_max
    assert sch.t_max not in seen  # t_max is never evaluated: its noise prediction is the noise itself
    assert sorted(set(seen), reverse=True) == pytest.approx(info.grid[1:], rel=1e-12)
    solver = fewstep.solvers.get("fv")
    assert (solver.min_nfe(), solver.num_points(10), solver.nfe_for_points(11)) == (1, 11, 10)


# ------------------------------------------------------------------ the claim: opposite sign
def test_leading_error_has_the_opposite_sign_to_ddim():
    """Gaussian N(0.3, 0.5^2), EDM, Karras grid (research notes §2.9): the end-point error projected
    on the initial noise is negative for DDIM and positive for F-DDIM at every NFE from 6 to 40."""
    sch = schedules.EDM()
    g = testbeds.Gaussian(mean=0.3, std=0.5, dim=1)
    noise = _noise(64, 1)
    signs = []
    for nfe in (6, 8, 10, 15, 20, 30, 40):
        proj = {}
        for solver in ("ddim", "fv"):
            out, info = fewstep.sample(g.model(sch, "eps"), noise, solver=solver, nfe=nfe, grid="karras",
                                       return_info=True)
            err = out - _target(g, noise, sch, info)
            proj[solver] = float((err * noise).sum() / (noise * noise).sum())
        signs.append((nfe, proj["ddim"], proj["fv"]))
    for nfe, ddim, fv in signs:
        assert ddim < 0 < fv, (nfe, ddim, fv)
        assert abs(fv) < abs(ddim), (nfe, ddim, fv)  # and smaller


def test_more_accurate_than_ddim_on_a_mixture():
    """gmm64, EDM, Karras grid for both (the paper's setting; the same family, the same budget):
    geometric-mean RMSE over NFE 8, 10, 15, 20 at most 2/3 of DDIM's."""
    sch = schedules.EDM()
    gm = testbeds.mixtures()["gmm64"]
    noise = _noise(96, gm.dim, seed=3)
    target = gm.denoise(gm.reference(noise, sch, t_end=sch.t_min), sch, sch.t_min)
    rmse = {"ddim": [], "fv": []}
    for nfe in (8, 10, 15, 20):
        for solver in rmse:
            out, info = fewstep.sample(gm.model(sch, "eps"), noise, solver=solver, nfe=nfe, grid="karras",
                                       return_info=True)
            assert info.nfe == nfe and info.grid[-1] == sch.t_min
            rmse[solver].append(float((out - target).pow(2).mean().sqrt()))
    ratio = geomean(rmse["fv"]) / geomean(rmse["ddim"])
    assert ratio <= 2 / 3, rmse


def test_stays_first_order():
    """Only the lookahead gets the higher order: log-log slope 1 +- 0.2 at NFE 80-320, for p = 1 and 2
    (measured 0.92 and 0.97; the slope creeps up to 1 from below as the NFE grows)."""
    sch = schedules.EDM()
    g = testbeds.Gaussian(mean=0.3, std=0.5, dim=2)
    noise = _noise(16, 2)
    target = g.denoise(g.reference(noise, sch, t_end=sch.t_min), sch, sch.t_min)
    for order in (1, 2):
        nfes = (80, 160, 320)
        errs = [float((fewstep.sample(g.model(sch, "eps"), noise, solver="fv", nfe=n, order=order, grid="karras")
                       - target).pow(2).mean().sqrt()) for n in nfes]
        slope = -math.log(errs[-1] / errs[0]) / math.log(nfes[-1] / nfes[0])
        assert abs(slope - 1.0) <= 0.2, (order, errs, slope)


# ------------------------------------------------------- every schedule and prediction type
SCHEDULES = {
    "discrete": schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000)),
    "linear-vp": schedules.LinearVP(),
    "cosine-vp": schedules.CosineVP(),
    "edm": schedules.EDM(),
    "flow": schedules.RectifiedFlow(),  # starts from pure noise, alpha(t_max) = 0
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_and_prediction_type(name):
    """The same run through every prediction type (views are exact), and more accurate than DDIM
    on every schedule (default log-SNR grid, NFE 20)."""
    sch = SCHEDULES[name]
    g = testbeds.Gaussian(mean=0.3, std=0.5, dim=2)
    noise = _noise(8, 2)
    errors = {}
    for order in (1, 2):
        outs = {}
        for prediction in ("eps", "x0", "v", "flow"):
            out, info = fewstep.sample(g.model(sch, prediction), noise, solver="fv", nfe=20, order=order,
                                       return_info=True)
            outs[prediction] = out
        for prediction, out in outs.items():
            assert float((out - outs["eps"]).abs().max()) < 1e-9, (order, prediction)
        errors[order] = float((outs["eps"] - _target(g, noise, sch, info)).pow(2).mean().sqrt())
    # DDIM evaluates t_max, where an eps network has no data view on a flow: use the flow prediction
    out, info = fewstep.sample(g.model(sch, "flow"), noise, solver="ddim", nfe=20, return_info=True)
    ddim = float((out - _target(g, noise, sch, info)).pow(2).mean().sqrt())
    assert errors[1] < 0.8 * ddim, (errors, ddim)
    assert errors[2] < ddim, (errors, ddim)


# ---------------------------------------------------------------------------- bad input
def test_bad_options():
    with pytest.raises(ValueError, match=r"order: fv supports orders \[1, 2, 3, 4\], got 5"):
        fewstep.solvers.get("fv", order=5)
    with pytest.raises(ValueError, match="order: fv supports orders"):
        fewstep.solvers.get("fv", order=1.0)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['refinements'\]"):
        fewstep.solvers.get("fv", refinements=2)
    sch = schedules.EDM()
    model = testbeds.Gaussian(dim=2).model(sch)
    with pytest.raises(ValueError, match="grid: fv needs at least 2 points"):
        fewstep.sample(model, _noise(2, 2), solver="fv", grid=torch.tensor([80.0]))
    with pytest.raises(ValueError, match="nfe: must be >= 1"):
        fewstep.sample(model, _noise(2, 2), solver="fv", nfe=0)
    with pytest.raises(ValueError, match=r"nfe: the grid's 5 points cost 4 evaluations with fv, more than nfe=3"):
        fewstep.sample(model, _noise(2, 2), solver="fv", grid=torch.tensor([80.0, 10.0, 1.0, 0.1, 0.002]), nfe=3)
