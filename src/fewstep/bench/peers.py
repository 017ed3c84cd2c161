"""Drive diffusers' schedulers on a fewstep model with the same network and the same noise.

Used by the parity tests and by ``fewstep bench accuracy`` to compare fewstep with the peers on
equal terms. diffusers is an optional dependency: it is imported only here.
"""
from __future__ import annotations

import torch

from ..model import Model
from ..schedules import DiscreteVP

__all__ = ["run_scheduler", "make_scheduler", "diffusers_prediction_type"]

_PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def diffusers_prediction_type(model: Model) -> str:
    if model.prediction not in _PRED:
        raise ValueError(f"prediction: diffusers' VP schedulers take {sorted(_PRED)}, got {model.prediction!r}")
    return _PRED[model.prediction]


def make_scheduler(cls_name: str, model: Model, **config):
    """Instantiate a diffusers scheduler class by name on ``model``'s :class:`DiscreteVP` table."""
    import diffusers

    sch = model.schedule
    if not isinstance(sch, DiscreteVP):
        raise TypeError(f"schedule: diffusers' discrete schedulers need a DiscreteVP, got {type(sch).__name__}")
    cls = getattr(diffusers, cls_name)
    ac = sch.alphas_cumprod
    betas = 1.0 - ac / torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
    return cls(num_train_timesteps=ac.numel(), trained_betas=betas.tolist(),
               prediction_type=diffusers_prediction_type(model), **config)


@torch.no_grad()
def run_scheduler(scheduler, model: Model, noise: torch.Tensor, num_inference_steps: int | None = None,
                  timesteps=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample with a diffusers scheduler: ``set_timesteps``, then ``step`` once per network call."""
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=[int(t) for t in timesteps])
    else:
        scheduler.set_timesteps(num_inference_steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        xin = scheduler.scale_model_input(x, t)
        mt = torch.full((x.shape[0],), float(t), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        out = model.raw(xin, mt, model.cond)
        model.nfe += 1
        model.calls += 1
        kwargs = {"generator": generator} if generator is not None else {}
        x = scheduler.step(out, t, x, return_dict=True, **kwargs).prev_sample
    return x
