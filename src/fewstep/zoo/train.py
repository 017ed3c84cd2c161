"""The training recipe of every bundled model: ``fewstep zoo train NAME --seed S``.

Diffusion models (DDPM, Ho et al. 2020, Algorithm 1): ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``
with ``t`` uniform over the 1,000 steps of the linear beta table (``1e-4 .. 0.02``), loss
``|eps_theta(x_t, t, label) - eps|^2``. Conditional models drop the label to the null class with
probability 0.1 (classifier-free guidance, Ho & Salimans 2022). AdamW, linear warm-up then cosine
decay of the learning rate, gradient clipping at 1, and an exponential moving average (EMA) of the
weights, which is what gets saved (EMA weights sample visibly cleaner after short trainings).

Reproducibility: with the default ``--minutes`` cap not reached, a run is a fixed number of steps
and the result depends only on the seed (and torch version / thread count, through float rounding).
When a slow machine hits the ``--minutes`` cap, the learning-rate schedule is driven by elapsed
time instead, so the run still finishes annealed on time; the json then records ``stopped_by:
"time"`` and the number of steps done.

Example::

    >>> from fewstep.zoo import train
    >>> r = train.train("digits16-s", seed=0, steps=3, out_dir=None, progress=False, overrides={"batch_size": 8})
    >>> r.steps_done
    3
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data
from .classifier import ClassifierConfig, DigitClassifier
from .unet import UNet, UNetConfig, flops_per_call

__all__ = ["Recipe", "RECIPES", "TrainResult", "train", "schedule_description", "make_schedule", "diffusion_loss"]

#: DDPM's linear beta table (diffusers' "linear"); every bundled diffusion model uses it.
BETA_START, BETA_END, NUM_TIMESTEPS = 1e-4, 0.02, 1000


def schedule_description() -> dict:
    return {"kind": "DiscreteVP", "betas": "linear", "beta_start": BETA_START, "beta_end": BETA_END,
            "num_train_timesteps": NUM_TIMESTEPS}


def make_schedule(desc: dict | None = None):
    """The :class:`~fewstep.schedules.DiscreteVP` a model's json describes."""
    from ..schedules import DiscreteVP

    desc = desc or schedule_description()
    if desc.get("kind") != "DiscreteVP" or desc.get("betas") != "linear":
        raise ValueError(f"schedule: the zoo knows DiscreteVP with linear betas only, got {desc!r}")
    n = int(desc["num_train_timesteps"])
    # float32 linspace, as diffusers and the API contract build the "linear" table
    return DiscreteVP.from_betas(torch.linspace(float(desc["beta_start"]), float(desc["beta_end"]), n))


@dataclass(frozen=True)
class Recipe:
    """How one bundled model is trained (the numbers are the recipe; ``overrides`` may change them)."""

    name: str
    kind: str  # "diffusion" | "classifier"
    dataset: str
    architecture: dict
    description: str
    steps: int
    batch_size: int
    lr: float
    warmup: int = 100
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    weight_decay: float = 0.0
    hflip: bool = False
    minutes: float = 30.0
    extra: dict = field(default_factory=dict)

    def sample_shape(self) -> tuple[int, int, int]:
        return (1, 16, 16) if self.dataset == "digits16" else (3, 32, 32)


_SKIP = (BETA_START, BETA_END, NUM_TIMESTEPS)


def _digits_arch(width: int, min_group_channels: int = 1) -> dict:
    return UNetConfig(in_channels=1, base_channels=width, channel_mult=(1, 2, 2), num_res_blocks=1,
                      attention_levels=(2,), num_classes=10, skip_betas=_SKIP,
                      min_group_channels=min_group_channels).to_dict()


_FAMILY_NOTE = (
    "Class-conditional DDPM on digits16 (10 classes + null class 10 for classifier-free guidance). "
    "Member of the width family digits16-s/-m/-l (base widths 4/8/16, FLOPs per call 1:4:16) for "
    "multilevel sampling."
)

RECIPES: dict[str, Recipe] = {
    "digits16-s": Recipe("digits16-s", "diffusion", "digits16", _digits_arch(4, min_group_channels=4), _FAMILY_NOTE,
                         steps=4000, batch_size=128, lr=2e-3, minutes=15.0),
    "digits16-m": Recipe("digits16-m", "diffusion", "digits16", _digits_arch(8), _FAMILY_NOTE,
                         steps=4000, batch_size=128, lr=2e-3, minutes=20.0),
    "digits16-l": Recipe("digits16-l", "diffusion", "digits16", _digits_arch(16), _FAMILY_NOTE,
                         steps=4000, batch_size=128, lr=2e-3),
    "patches32": Recipe(
        "patches32", "diffusion", "patches32",
        UNetConfig(in_channels=3, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                   attention_levels=(2,), num_classes=0, skip_betas=_SKIP).to_dict(),
        "Unconditional DDPM on 32x32 RGB patches of the photographs shipping in scikit-learn and scikit-image.",
        steps=2500, batch_size=64, lr=1e-3, hflip=True, minutes=25.0),
    "digits-classifier": Recipe(
        "digits-classifier", "classifier", "digits16", dict(ClassifierConfig()),
        "CNN digit classifier on the digits16 training split; its 64-d penultimate features define FD-digits.",
        steps=1500, batch_size=64, lr=1e-3, warmup=50, ema_decay=0.0, label_dropout=0.0),
}


@dataclass
class TrainResult:
    name: str
    module: torch.nn.Module
    description: dict
    steps_done: int
    final_loss: float
    seconds: float
    losses: list[float]
    path: Path | None = None


def diffusion_loss(net: UNet, x0: torch.Tensor, alphas_cumprod: torch.Tensor, generator: torch.Generator,
                   labels: torch.Tensor | None = None, label_dropout: float = 0.0) -> torch.Tensor:
    """DDPM's simple loss (Ho et al. 2020, eq. (14)) for one batch, eps prediction."""
    n = x0.shape[0]
    t = torch.randint(0, alphas_cumprod.numel(), (n,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    abar = alphas_cumprod[t].to(x0.dtype)[:, None, None, None]
    xt = abar.sqrt() * x0 + (1.0 - abar).sqrt() * eps
    label = None
    if labels is not None:
        drop = torch.rand(n, generator=generator) < label_dropout
        label = torch.where(drop, torch.full_like(labels, net.config.num_classes), labels)
    return F.mse_loss(net(xt, t.to(x0.dtype), label=label), eps)


def _lr_factor(progress: float, step: int, warmup: int) -> float:
    warm = min(1.0, (step + 1) / max(1, warmup))
    return warm * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def _shift_augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translations by up to ``max_shift`` pixels (classifier only: digits move, not flip)."""
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    dx, dy = torch.randint(0, 2 * p + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]


def train(
    name: str,
    *,
    seed: int = 0,
    minutes: float | None = None,
    steps: int | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    threads: int | None = None,
    overrides: dict | None = None,
) -> TrainResult:
    """Train the bundled model ``name`` from ``seed``; write ``NAME.safetensors`` + ``NAME.json`` to ``out_dir``.

    Args:
        name: a key of :data:`RECIPES`.
        seed: seeds the initial weights and every random draw of training.
        minutes: wall-clock cap (default: the recipe's, 30); see the module docstring.
        steps: override the recipe's number of steps (tests use a handful).
        out_dir: folder for the weight file and json (``None``: write nothing).
        progress: show a tqdm bar with the running loss.
        threads: ``torch.set_num_threads`` for the run (default: leave as is).
        overrides: replace recipe fields (``batch_size``, ``lr``, ``architecture``, ...).
    """
    from .. import zoo

    canonical = zoo.ALIASES.get(name, name)
    if canonical not in RECIPES:
        raise ValueError(f"name: no training recipe for {name!r}; valid: {sorted(RECIPES)}")
    recipe = RECIPES[canonical]
    if overrides:
        unknown = set(overrides) - set(Recipe.__dataclass_fields__)
        if unknown:
            raise ValueError(f"overrides: unknown recipe fields {sorted(unknown)}")
        recipe = replace(recipe, **overrides)
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected a positive integer, got {steps!r}")
        recipe = replace(recipe, steps=steps)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an integer, got {seed!r}")
    budget = float(recipe.minutes if minutes is None else minutes)
    if not budget > 0:
        raise ValueError(f"minutes: expected a positive number, got {minutes!r}")
    if threads is not None:
        torch.set_num_threads(int(threads))

    dataset = data.DATASETS[recipe.dataset]("train")
    images, labels = dataset.images, dataset.labels
    torch.manual_seed(seed)  # initial weights
    gen = torch.Generator().manual_seed(seed + 1)  # batches, times, noise, dropout

    if recipe.kind == "diffusion":
        net = UNet(UNetConfig.from_dict(recipe.architecture))
        conditional = net.config.num_classes > 0
        abar = make_schedule().alphas_cumprod.to(torch.float32)
    else:
        net = DigitClassifier(**recipe.architecture)
        conditional = True
    net.train()
    ema = copy.deepcopy(net).eval() if recipe.ema_decay > 0 else None
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=recipe.steps, desc=f"train {canonical}", unit="step", mininterval=2.0)
    losses: list[float] = []
    running = None
    start = time.perf_counter()
    stopped_by = "steps"
    time_driven = False
    step = 0
    try:
        while step < recipe.steps:
            # progress through the lr schedule: by steps, or by the clock when the clock runs ahead
            time_frac = (time.perf_counter() - start) / (budget * 60.0)
            if time_frac >= 1.0:
                stopped_by = "time"
                break
            # (only once the clock is a whole step ahead, so fast runs stay bit-for-bit reproducible)
            frac = step / recipe.steps
            if time_frac > (step + 1) / recipe.steps:
                frac, time_driven = time_frac, True
            for g in opt.param_groups:
                g["lr"] = recipe.lr * _lr_factor(frac, step, recipe.warmup)
            idx = torch.randint(0, images.shape[0], (recipe.batch_size,), generator=gen)
            x0 = images[idx]
            if recipe.hflip:
                flip = torch.rand(x0.shape[0], generator=gen) < 0.5
                x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
            if recipe.kind == "diffusion":
                loss = diffusion_loss(net, x0, abar, gen, labels[idx] if conditional else None, recipe.label_dropout)
            else:
                x_aug = _shift_augment(x0, gen)
                x_aug = x_aug + 0.05 * torch.randn(x_aug.shape, generator=gen)  # samples are never exactly clean
                loss = F.cross_entropy(net(x_aug), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            if ema is not None:
                decay = min(recipe.ema_decay, (1.0 + step) / (10.0 + step))
                with torch.no_grad():
                    for pe, p in zip(ema.parameters(), net.parameters()):
                        pe.lerp_(p, 1.0 - decay)
            value = float(loss.detach())
            losses.append(value)
            running = value if running is None else 0.98 * running + 0.02 * value
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    final = ema if ema is not None else net
    final.eval()
    tail = losses[-max(1, len(losses) // 10):]
    final_loss = sum(tail) / len(tail)

    description = describe(canonical, recipe, final, seed=seed, steps_done=step, seconds=seconds,
                           final_loss=final_loss, stopped_by=stopped_by, time_driven=time_driven)
    result = TrainResult(canonical, final, description, step, final_loss, seconds, losses)
    if out_dir is not None:
        result.path = save(final, description, out_dir)
    return result


def describe(name: str, recipe: Recipe, module: torch.nn.Module, **training) -> dict:
    """The json description of a trained model (stored in the weight file and beside it)."""
    params = sum(p.numel() for p in module.parameters())
    shape = list(recipe.sample_shape())
    d = {
        "name": name,
        "kind": recipe.kind,
        "dataset": recipe.dataset,
        "description": recipe.description,
        "architecture": dict(recipe.architecture),
        "parameters": int(params),
        "sample_shape": shape,
        "training": {
            "seed": training["seed"],
            "steps": training["steps_done"],
            "recipe_steps": recipe.steps,
            "batch_size": recipe.batch_size,
            "lr": recipe.lr,
            "ema_decay": recipe.ema_decay,
            "label_dropout": recipe.label_dropout if recipe.kind == "diffusion" else None,
            "seconds": round(training["seconds"], 1),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "final_loss": round(training["final_loss"], 5),
            "final_loss_note": "mean training loss over the last 10% of steps",
            "stopped_by": training["stopped_by"],
            "lr_schedule_driven_by_clock": training["time_driven"],
        },
    }
    if recipe.kind == "diffusion":
        cond = {"label": torch.tensor([0])} if module.config.num_classes > 0 else {}
        d["schedule"] = schedule_description()
        d["prediction"] = "eps"
        d["model_time"] = "float timestep index in [0, 999]"
        d["num_classes"] = module.config.num_classes
        d["null_label"] = module.config.num_classes if module.config.num_classes > 0 else None
        d["flops_per_call"] = flops_per_call(module, tuple(shape), **cond)
        d["flops_note"] = "one network call on one sample, torch.utils.flop_counter (2 per multiply-add); guidance doubles it"
    else:
        x = torch.zeros(1, *shape)
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
        d["flops_per_call"] = int(counter.get_total_flops())
        d["feature_dim"] = recipe.architecture["feature_dim"]
    return d


def save(module: torch.nn.Module, description: dict, out_dir: str | os.PathLike) -> Path:
    """Write ``NAME.safetensors`` (with the description in its metadata) and ``NAME.json``."""
    from . import store

    out = Path(out_dir)
    path = out / f"{description['name']}.safetensors"
    digest = store.write(path, module.state_dict(), description)
    store.write_json(out / f"{description['name']}.json", {**description, "content_sha256": digest})
    return path
