"""fewstep: few-step, training-free samplers for diffusion and flow models, measured against exact
references.

Example::

    import torch, fewstep
    from fewstep import schedules
    sch = schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000))
    model = fewstep.Model(net, schedule=sch, prediction="eps")
    x0 = fewstep.sample(model, torch.randn(4, 3, 32, 32), nfe=10)
"""
from . import grids, schedules, solvers, testbeds
from .model import Guided, Model, NetworkOutputError
from .sample import SampleInfo, SamplingError, recommended, sample

__version__ = "0.1.0"

__all__ = [
    "Model",
    "Guided",
    "sample",
    "recommended",
    "SampleInfo",
    "SamplingError",
    "NetworkOutputError",
    "schedules",
    "grids",
    "solvers",
    "testbeds",
    "zoo",
]


def __getattr__(name):
    # fewstep.zoo imports the UNet and weights lazily: `import fewstep` stays light.
    if name == "zoo":
        import importlib

        return importlib.import_module(".zoo", __name__)
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")
