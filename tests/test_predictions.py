"""Every deterministic solver gives the same samples whatever the network predicts (eps, x0, v, flow).

The solvers only ever see a view (x0, eps or velocity), and each view is an exact linear map of the
network output, so wrapping one exact target as four prediction types must give the same samples up
to rounding. Solvers registered later are covered automatically; stochastic ones (their noise draws
are tested elsewhere) and those that need extra inputs (a file, a model family) are left out.
"""
import pytest
import torch

import fewstep
from fewstep import schedules, testbeds
from fewstep.solvers.base import REGISTRY

F64 = torch.float64
PREDICTIONS = ["eps", "x0", "v", "flow"]


def deterministic_solvers() -> list[str]:
    names = []
    for name, cls in sorted(REGISTRY.items()):
        if cls.stochastic or getattr(cls, "needs_inputs", False):
            continue
        try:
            cls()  # a solver that cannot be built from its defaults needs inputs (as solvers.table() reads it)
        except (ValueError, TypeError):
            continue
        names.append(name)
    return names


SCHEDULES = {
    "discrete": lambda: schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000)),
    "edm": lambda: schedules.EDM(),
    "flow": lambda: schedules.RectifiedFlow(t_max=0.999),
}


def test_the_baselines_are_covered():
    covered = set(deterministic_solvers())
    assert {"ddim", "dpm++", "unipc", "deis", "ipndm", "heun"} <= covered


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("name", deterministic_solvers())
def test_prediction_types_give_the_same_samples(name, schedule):
    sch = SCHEDULES[schedule]()
    gm = testbeds.mixtures()["gmm16"]
    noise = torch.randn(4, 16, dtype=F64, generator=torch.Generator().manual_seed(3))
    solver = fewstep.solvers.get(name)  # default options
    nfe = max(8, solver.min_nfe())
    samples = {}
    for prediction in PREDICTIONS:
        model = gm.model(sch, prediction)
        samples[prediction] = fewstep.sample(model, noise, solver=solver, nfe=nfe)
    base = samples["eps"]
    assert bool(torch.isfinite(base).all())
    for prediction in PREDICTIONS[1:]:
        diff = float((samples[prediction] - base).abs().max())
        assert diff <= 1e-6, (prediction, diff)
