"""Measured model cards: ``fewstep zoo card NAME`` samples the model and writes ``cards/NAME.md`` + PNG.

Digits models are judged by the digit classifier (``digits-classifier``): the fraction of
conditional samples it assigns to the requested label, and FD-digits to the held-out digits, set
against the FD between the training and held-out halves of the data themselves (the best a perfect
model could hope for, given the sample sizes). ``patches32`` has no classifier; its card reports a
pixel-space Fréchet distance on 4x4 average-pooled patches (48 numbers per patch) with the same
train-vs-held-out baseline.

All samples come from the reference solver: DDIM with 200 evaluations on the log-SNR grid.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import CARDS_DIR, WEIGHTS_DIR, conditioned, data, load
from .classifier import _batched, frechet_distance
from .images import save_grid

__all__ = ["reference_samples", "evaluate", "write_card", "REFERENCE_SOLVER", "REFERENCE_NFE"]

REFERENCE_SOLVER = "ddim"
REFERENCE_NFE = 200


def reference_samples(model, noise: torch.Tensor, labels=None, guidance: float = 1.0, *, solver: str = REFERENCE_SOLVER,
                      nfe: int = REFERENCE_NFE, batch: int = 500, progress: bool = False) -> torch.Tensor:
    """Sample in batches of ``batch`` with the reference solver (float32, deterministic for a noise)."""
    from ..sample import sample

    out = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=nfe * ((noise.shape[0] + batch - 1) // batch), desc=f"{solver} x{nfe}", unit="nfe", leave=False)
    try:
        for i in range(0, noise.shape[0], batch):
            lab = None if labels is None else labels[i : i + batch]
            m = conditioned(model, lab, guidance)
            out.append(sample(m, noise[i : i + batch], solver=solver, nfe=nfe, progress=bar if bar is not None else False))
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(out)


def _pooled(images: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(images.clamp(-1, 1), 8).flatten(1)


def evaluate(name: str, num: int = 1000, guidance: float = 2.0, seed: int = 0, nfe: int = REFERENCE_NFE,
             progress: bool = True, unguided: int = 200) -> dict:
    """Sample ``num`` images with the reference solver and measure them (see the module docstring)."""
    if name == "digits-classifier":
        return _evaluate_classifier()
    model = load(name)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(num, *model.sample_shape, generator=gen)
    start = time.perf_counter()
    if model.info["dataset"] == "digits16":
        clf = load("digits-classifier")
        labels = torch.arange(num) % 10
        samples = reference_samples(model, noise, labels, guidance, nfe=nfe, progress=progress)
        seconds = time.perf_counter() - start
        train_set, held = data.digits16("train"), data.digits16("heldout")
        feats = lambda x: _batched(clf.features, x.clamp(-1, 1))  # noqa: E731
        held_f = feats(held.images)
        pred = _batched(clf, samples.clamp(-1, 1)).argmax(1)
        result = {
            "num_samples": num,
            "guidance": guidance,
            "label_accuracy": float((pred == labels).double().mean()),
            "fd_digits": frechet_distance(feats(samples), held_f),
            "fd_digits_train_vs_heldout": frechet_distance(feats(train_set.images), held_f),
            "classifier_heldout_accuracy": float((_batched(clf, held.images).argmax(1) == held.labels).double().mean()),
        }
        # unguided conditional samples too: guidance trades diversity for fidelity
        if unguided > 0:
            k = min(num, unguided)
            plain = reference_samples(model, noise[:k], labels[:k], 1.0, nfe=nfe, progress=progress)
            result["unguided_num_samples"] = k
            result["fd_digits_guidance1"] = frechet_distance(feats(plain), held_f)
            result["label_accuracy_guidance1"] = float((_batched(clf, plain.clamp(-1, 1)).argmax(1) == labels[:k]).double().mean())
        grid = samples[:100]  # labels cycle 0..9, so in a 10-wide grid column c shows digit c
    else:
        samples = reference_samples(model, noise, nfe=nfe, progress=progress)
        seconds = time.perf_counter() - start
        train_set, held = data.patches32("train"), data.patches32("heldout")
        sub = torch.randperm(train_set.images.shape[0], generator=torch.Generator().manual_seed(seed))[:num]
        result = {
            "num_samples": num,
            "fd_pooled_pixels": frechet_distance(_pooled(samples), _pooled(held.images)),
            "fd_pooled_pixels_train_vs_heldout": frechet_distance(_pooled(train_set.images[sub]), _pooled(held.images)),
            "sample_channel_mean": [round(float(v), 3) for v in samples.clamp(-1, 1).mean((0, 2, 3))],
            "heldout_channel_mean": [round(float(v), 3) for v in held.images.mean((0, 2, 3))],
            "sample_std": round(float(samples.clamp(-1, 1).std()), 3),
            "heldout_std": round(float(held.images.std()), 3),
        }
        grid = samples[:64]
    result.update({"solver": REFERENCE_SOLVER, "nfe": nfe, "grid": "logsnr", "seed": seed,
                   "sampling_seconds": round(seconds, 1), "threads": torch.get_num_threads()})
    return {"model": model, "result": result, "grid_images": grid}


def _evaluate_classifier() -> dict:
    clf = load("digits-classifier")
    train_set, held = data.digits16("train"), data.digits16("heldout")
    pred = _batched(clf, held.images).argmax(1)
    wrong = (pred != held.labels).nonzero().flatten()
    result = {
        "heldout_accuracy": float((pred == held.labels).double().mean()),
        "train_accuracy": float((_batched(clf, train_set.images).argmax(1) == train_set.labels).double().mean()),
        "fd_digits_train_vs_heldout": frechet_distance(_batched(clf.features, train_set.images), _batched(clf.features, held.images)),
        "misclassified": [{"index": int(i), "label": int(held.labels[i]), "predicted": int(pred[i])} for i in wrong],
    }
    grid = held.images[wrong] if wrong.numel() else held.images[:10]
    return {"model": clf, "info": json.loads((WEIGHTS_DIR / "digits-classifier.json").read_text()), "result": result,
            "grid_images": grid}


def _classifier_card(name: str, d: dict, res: dict) -> list[str]:
    tr = d["training"]
    arch = d["architecture"]
    wrong = ", ".join(f"{m['label']}->{m['predicted']}" for m in res["misclassified"]) or "none"
    return [
        f"# {name}",
        "",
        d["description"],
        "",
        "## Data",
        "",
        "digits16 (scikit-learn's `load_digits` upsampled to 16x16, in [-1, 1]); trained on the 1,438 training",
        "digits with random 1-pixel shifts and a little Gaussian noise (N(0, 0.05^2)), evaluated on the 359 held-out digits.",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | 4 3x3 convolutions (width {arch['width']}, {2 * arch['width']}), two 2x2 average pools, "
        f"a {arch['feature_dim']}-d feature layer (SiLU), a linear head |",
        f"| parameters | {_fmt_int(d['parameters'])} |",
        f"| FLOPs per call (one image) | {_fmt_int(d['flops_per_call'])} |",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| recipe | `fewstep zoo train {name} --seed {tr['seed']}` |",
        f"| steps | {tr['steps']}, batch {tr['batch_size']}, AdamW lr {tr['lr']} |",
        f"| training time | {tr['seconds'] / 60:.1f} min on {tr['threads']} CPU thread(s) of a shared 2-core machine |",
        f"| final loss | {tr['final_loss']} ({tr['final_loss_note']}, cross-entropy) |",
        "",
        "## Measured",
        "",
        "| measure | value |",
        "|---|---|",
        f"| held-out accuracy | {res['heldout_accuracy']:.4f} |",
        f"| training accuracy | {res['train_accuracy']:.4f} |",
        f"| FD-digits, training half vs held-out half | {res['fd_digits_train_vs_heldout']:.2f} |",
        f"| misclassified held-out digits (label->predicted) | {wrong} |",
        "",
        f"![misclassified]({name}.png)",
        "",
        "The held-out digits it gets wrong.",
    ]


def _fmt_int(n) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def write_card(name: str, evaluation: dict, cards_dir: str | Path = CARDS_DIR, weights_dir: str | Path = WEIGHTS_DIR) -> Path:
    """Write ``NAME.md`` and ``NAME.png`` into ``cards_dir`` and add the numbers to ``NAME.json``."""
    model, res = evaluation["model"], evaluation["result"]
    d = evaluation.get("info") or model.info
    cards_dir = Path(cards_dir)
    nrow = 10 if d["dataset"] == "digits16" else 8
    save_grid(evaluation["grid_images"], cards_dir / f"{name}.png", nrow=nrow, scale=4 if d["dataset"] == "digits16" else 2)
    if d["kind"] == "classifier":
        return _finish_card(name, _classifier_card(name, d, res), res, cards_dir, weights_dir)
    tr = d["training"]
    arch = d["architecture"]
    lines = [
        f"# {name}",
        "",
        d["description"],
        "",
        "## Data",
        "",
    ]
    if d["dataset"] == "digits16":
        lines += [
            "scikit-learn's `load_digits` (1,797 8x8 digits, UCI optdigits), upsampled bilinearly to 16x16 and",
            "scaled to [-1, 1]. A seeded permutation holds out 359 digits (`fewstep.zoo.data.digits16('heldout')`);",
            "the model saw only the 1,438 training digits.",
        ]
    else:
        lines += [
            "32x32 RGB patches (stride 16, at full and half resolution) cut from the photographs that ship in",
            "scikit-learn and scikit-image: training on china, astronaut, chelsea, rocket, hubble_deep_field,",
            "immunohistochemistry; held out: coffee and flower (whole photographs).",
        ]
    lines += [
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | fewstep UNet: base width {arch['base_channels']}, channel multipliers {tuple(arch['channel_mult'])}, "
        f"{arch['num_res_blocks']} res block(s) per level, self-attention at level(s) {tuple(arch['attention_levels'])}"
        f"{', output sigma_t * x + F (Gaussian skip)' if arch.get('skip_betas') else ''}"
        f"{', at least ' + str(arch['min_group_channels']) + ' channels per GroupNorm group' if arch.get('min_group_channels', 1) > 1 else ''} |",
        f"| conditioning | {'class label 0-9, null label ' + str(d['null_label']) + ' (classifier-free guidance)' if d.get('num_classes') else 'none'} |",
        f"| parameters | {_fmt_int(d['parameters'])} |",
        f"| FLOPs per call (one sample) | {_fmt_int(d['flops_per_call'])} ({d['flops_per_call'] / 1e6:.1f} MFLOP; guidance doubles it) |",
        "| schedule | DiscreteVP, linear betas 1e-4..0.02, 1,000 steps; model time = float timestep index |",
        "| prediction | eps |",
        f"| sample shape | {tuple(d['sample_shape'])} |",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| recipe | `fewstep zoo train {name} --seed {tr['seed']}` |",
        f"| steps | {tr['steps']} of {tr['recipe_steps']} (stopped by {tr['stopped_by']}), batch {tr['batch_size']}, AdamW lr {tr['lr']}, EMA {tr['ema_decay']} |",
        f"| training time | {tr['seconds'] / 60:.1f} min on {tr['threads']} CPU thread(s) of a shared 2-core machine |",
        f"| final loss | {tr['final_loss']} ({tr['final_loss_note']}) |",
        *([f"| note | the machine was busy: the learning-rate schedule followed the {tr['seconds'] / 60:.0f}-minute cap "
           f"instead of the step count (see `fewstep.zoo.train`); on a free machine the same seed runs all "
           f"{tr['recipe_steps']} steps |"] if tr.get("lr_schedule_driven_by_clock") else []),
        "",
        "## Measured quality",
        "",
        f"Samples from the reference solver: `{res['solver']}` with {res['nfe']} evaluations on the `{res['grid']}` grid, "
        f"noise seed {res['seed']} ({res['sampling_seconds']} s on {res['threads']} thread(s)).",
        "",
    ]
    if d["dataset"] == "digits16":
        lines += [
            "| measure | value |",
            "|---|---|",
            f"| label accuracy, {res['num_samples']} samples, guidance {res['guidance']:g} | {res['label_accuracy']:.3f} |",
            f"| FD-digits to held-out, {res['num_samples']} samples, guidance {res['guidance']:g} | {res['fd_digits']:.2f} |",
        ]
        if "unguided_num_samples" in res:
            k = res["unguided_num_samples"]
            lines += [
                f"| label accuracy, {k} samples, guidance 1 (no guidance) | {res['label_accuracy_guidance1']:.3f} |",
                f"| FD-digits to held-out, {k} samples, guidance 1 (small-sample bias: compare with care) | {res['fd_digits_guidance1']:.2f} |",
            ]
        lines += [
            f"| FD-digits, training half vs held-out half (baseline) | {res['fd_digits_train_vs_heldout']:.2f} |",
            f"| ratio FD(samples) / FD(train vs held-out) | {res['fd_digits'] / res['fd_digits_train_vs_heldout']:.2f} |",
            f"| classifier accuracy on held-out digits | {res['classifier_heldout_accuracy']:.3f} |",
            "",
            f"![samples]({name}.png)",
            "",
            f"Column c shows digit c (guidance {res['guidance']:g}); each row is a different noise.",
        ]
    else:
        lines += [
            "| measure | value |",
            "|---|---|",
            f"| pixel FD (4x4-pooled), {res['num_samples']} samples vs held-out photos | {res['fd_pooled_pixels']:.4f} |",
            f"| pixel FD, {res['num_samples']} training patches vs held-out photos (baseline) | {res['fd_pooled_pixels_train_vs_heldout']:.4f} |",
            f"| channel means, samples / held-out | {res['sample_channel_mean']} / {res['heldout_channel_mean']} |",
            f"| pixel std, samples / held-out | {res['sample_std']} / {res['heldout_std']} |",
            "",
            f"![samples]({name}.png)",
        ]
    return _finish_card(name, lines, res, cards_dir, weights_dir)


def _finish_card(name: str, lines: list[str], res: dict, cards_dir: Path, weights_dir) -> Path:
    from . import store
    from ..bench.report import atomic_write_text

    lines = lines + ["", "Reproduce these numbers with `fewstep zoo card " + name + "`.", ""]
    path = cards_dir / f"{name}.md"
    atomic_write_text(path, "\n".join(lines))
    os.chmod(path, 0o644)
    json_path = Path(weights_dir) / f"{name}.json"
    if json_path.is_file():
        meta = json.loads(json_path.read_text())
        meta["evaluation"] = res
        store.write_json(json_path, meta)
    return path
