"""Bundled trained models, ready to sample: ``fewstep.zoo.load("digits16")``.

=====================  ==========================================================================
name                   what it is
=====================  ==========================================================================
``digits16``           the recommended digits model: alias of ``digits16-l``
``digits16-s/-m/-l``   class-conditional DDPMs on 16x16 digits, base widths 4/8/16, FLOPs per call
                       1 : 4 : 16 (a family for multilevel sampling)
``patches32``          unconditional DDPM on 32x32 RGB patches of packaged photographs
``digits-classifier``  CNN digit classifier; its features define FD-digits
=====================  ==========================================================================

Every diffusion model uses DDPM's linear beta table (``DiscreteVP``, 1,000 steps), predicts the
noise (``prediction="eps"``), and receives the float timestep index as time. Conditional models take
``label=`` (0-9; 10 is the null label used for classifier-free guidance).

Example::

    >>> import torch, fewstep
    >>> model = fewstep.zoo.load("digits16")
    >>> model.sample_shape
    (1, 16, 16)
    >>> labels = torch.arange(4)
    >>> guided = fewstep.zoo.conditioned(model, labels, guidance=2.0)
    >>> noise = torch.randn(4, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    >>> fewstep.sample(guided, noise, solver="ddim", nfe=6).shape
    torch.Size([4, 1, 16, 16])
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .store import WeightFileError

__all__ = ["load", "list_models", "conditioned", "info", "family", "FAMILIES", "ALIASES", "WEIGHTS_DIR", "CARDS_DIR", "WeightFileError"]

WEIGHTS_DIR = Path(__file__).with_name("weights")
CARDS_DIR = Path(__file__).with_name("cards")

#: Friendly names for bundled models (``digits16`` is the member the demo and the docs use).
ALIASES = {"digits16": "digits16-l"}

_CACHE: dict[tuple, tuple] = {}


def list_models() -> list[dict]:
    """One row per bundled model (aliases included): name, kind, parameters, FLOPs, sample shape."""
    rows = []
    for path in sorted(WEIGHTS_DIR.glob("*.json")):
        d = json.loads(path.read_text())
        rows.append(_row(d["name"], d))
    for alias, target in sorted(ALIASES.items()):
        target_json = WEIGHTS_DIR / f"{target}.json"
        if target_json.is_file():
            rows.append(_row(alias, json.loads(target_json.read_text()), alias_of=target))
    return sorted(rows, key=lambda r: r["name"])


def _row(name: str, d: dict, alias_of: str | None = None) -> dict:
    return {
        "name": name,
        "alias_of": alias_of or "",
        "kind": d.get("kind", "?"),
        "conditional": bool(d.get("num_classes")),
        "parameters": d.get("parameters"),
        "flops_per_call": d.get("flops_per_call"),
        "sample_shape": tuple(d.get("sample_shape", ())),
        "final_loss": d.get("training", {}).get("final_loss"),
    }


def _bundled_names() -> list[str]:
    files = {p.stem for p in WEIGHTS_DIR.glob("*.safetensors")}
    return sorted(files | {alias for alias, target in ALIASES.items() if target in files})


def _resolve(name_or_path) -> Path:
    if isinstance(name_or_path, (str, os.PathLike)):
        s = os.fspath(name_or_path)
        target = ALIASES.get(s, s)
        bundled = WEIGHTS_DIR / f"{target}.safetensors"
        if os.sep not in s and "/" not in s and not s.endswith(".safetensors"):
            if bundled.is_file():
                return bundled
            raise ValueError(f"name_or_path: no bundled model named {s!r}; valid: {_bundled_names()} (or a path to a .safetensors file)")
        path = Path(s).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"name_or_path: no file at {s!r} (bundled names: {_bundled_names()})")
        return path
    raise TypeError(f"name_or_path: expected a model name or a path, got {type(name_or_path).__name__}")


def info(name_or_path) -> dict:
    """The json description of a model (architecture, schedule, FLOPs, training record...)."""
    from . import store

    return store.read(_resolve(name_or_path))[1]


def load(name_or_path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a bundled model by name, or a zoo ``.safetensors`` file by path.

    Diffusion models come back as a ready :class:`fewstep.Model` (``DiscreteVP`` schedule,
    ``prediction="eps"``, ``sample_shape`` set; ``model.info`` holds the json description and
    ``model.null_label`` the guidance label). ``digits-classifier`` comes back as the
    :class:`~fewstep.zoo.classifier.DigitClassifier` module, in eval mode.

    Raises:
        ValueError: unknown name; :class:`WeightFileError` (a ``ValueError``) for a truncated,
            corrupt or mismatched file. FileNotFoundError for a missing path.
    """
    from . import store
    from .classifier import DigitClassifier
    from .train import make_schedule
    from .unet import UNet, UNetConfig
    from ..model import Model

    path = _resolve(name_or_path)
    key = (str(path.resolve()), path.stat().st_mtime_ns, path.stat().st_size)
    if key not in _CACHE:
        state, desc = store.read(path)
        _CACHE.clear()  # keep at most one file's tensors around
        _CACHE[key] = (state, desc)
    state, desc = _CACHE[key]
    kind = desc.get("kind")
    try:
        if kind == "diffusion":
            module = UNet(UNetConfig.from_dict(desc["architecture"]))
        elif kind == "classifier":
            module = DigitClassifier(**desc["architecture"])
        else:
            raise WeightFileError(f"weights: {path.name!r} describes an unknown kind {kind!r}; valid: diffusion, classifier")
    except (KeyError, TypeError) as e:
        raise WeightFileError(f"weights: {path.name!r} has an incomplete architecture description ({e})") from None
    store.check_state(module, state, repr(path.name))
    module.load_state_dict(state)
    module.eval().requires_grad_(False).to(device=device, dtype=dtype)
    if kind == "classifier":
        return module
    if desc.get("prediction") != "eps":
        raise WeightFileError(f"weights: {path.name!r} has prediction {desc.get('prediction')!r}; the zoo expects 'eps'")
    model = Model(module, make_schedule(desc.get("schedule")), prediction="eps",
                  sample_shape=desc["sample_shape"], name=desc["name"])
    model.info = desc
    model.null_label = desc.get("null_label")
    return model


#: Width families for multilevel sampling, cheapest first (FLOPs per call 1 : 4 : 16).
FAMILIES = {"digits16": ("digits16-s", "digits16-m", "digits16-l")}


def family(name: str = "digits16", **load_kw) -> list:
    """The members of a width family as loaded models, cheapest first (``model.info["flops_per_call"]``).

    Example: ``small, medium, large = fewstep.zoo.family("digits16")``.
    """
    if name not in FAMILIES:
        raise ValueError(f"name: unknown model family {name!r}; valid: {sorted(FAMILIES)}")
    return [load(member, **load_kw) for member in FAMILIES[name]]


def conditioned(model, labels=None, guidance: float = 1.0):
    """Condition a zoo model on ``labels`` with classifier-free guidance ``guidance``.

    ``guidance == 1`` gives the plain conditional model (one batch per call); otherwise
    ``uncond + guidance * (cond - uncond)`` with the null label (two halves in one call).
    ``labels=None`` returns the unconditional model (the null label for conditional models).
    """
    null = getattr(model, "null_label", None)
    if labels is None:
        if guidance != 1.0:
            raise ValueError("guidance: needs labels (guidance pulls towards a label)")
        return model
    if null is None:
        raise ValueError(f"labels: model {model.name!r} is unconditional; call it without a label")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if ((labels < 0) | (labels >= null)).any():
        raise ValueError(f"labels: expected integers in [0, {null - 1}], got {labels.tolist()}")
    guidance = float(guidance)
    if guidance == 1.0:
        return model.with_cond(label=labels)
    return model.guided(guidance, uncond={"label": torch.tensor([null])}, label=labels)
