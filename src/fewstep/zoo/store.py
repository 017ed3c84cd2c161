"""Weight files of the zoo: safetensors only (never pickle), self-describing and checksummed.

A zoo weight file is a ``.safetensors`` file whose metadata holds:

* ``fewstep_zoo``: the model's json description (kind, architecture, schedule, sample shape, ...);
* ``content_sha256``: a SHA-256 over every tensor's name, dtype, shape and bytes, in sorted order.

:func:`read` checks the header, the checksum, and (in :func:`check_state`) every tensor's name and
shape against the architecture, so a truncated, corrupted or mismatched file fails with a message
that says which, instead of a model that silently samples garbage.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..bench.report import atomic_path

__all__ = ["WeightFileError", "write", "read", "check_state", "content_sha256", "write_json"]


class WeightFileError(ValueError):
    """A zoo weight file is unreadable, corrupt, or does not match its architecture."""


def content_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write(path: str | os.PathLike, state: dict[str, torch.Tensor], description: dict) -> str:
    """Write ``state`` with ``description`` in the metadata, atomically; returns the content hash."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    digest = content_sha256(state)
    meta = {"fewstep_zoo": json.dumps(description, sort_keys=True), "content_sha256": digest}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata=meta)
        _readable(tmp)
    return digest


def write_json(path: str | os.PathLike, obj: dict) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        _readable(tmp)


def _readable(path) -> None:
    # temp files are created 0600; weight files are shared data (package, other users)
    os.chmod(path, 0o644)


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Load ``(state, description)`` from a zoo ``.safetensors`` file, verifying its checksum."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights: no file at {str(path)!r}")
    if path.suffix != ".safetensors":
        raise WeightFileError(
            f"weights: {path.name!r} is not a .safetensors file; the zoo loads safetensors only (never pickle)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers/lengths
        raise WeightFileError(
            f"weights: {str(path)!r} is not a readable safetensors file (truncated or corrupt?): {e}"
        ) from None
    if "fewstep_zoo" not in meta:
        raise WeightFileError(
            f"weights: {str(path)!r} has no 'fewstep_zoo' description in its metadata; "
            "it was not written by fewstep's zoo (fewstep zoo train NAME writes one)"
        )
    try:
        description = json.loads(meta["fewstep_zoo"])
    except json.JSONDecodeError as e:
        raise WeightFileError(f"weights: {str(path)!r} has an unreadable description ({e})") from None
    want = meta.get("content_sha256")
    got = content_sha256(state)
    if want != got:
        raise WeightFileError(
            f"weights: {str(path)!r} is corrupt: its tensors' checksum {got[:12]}... does not match the "
            f"recorded {str(want)[:12]}..."
        )
    return state, description


def check_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`WeightFileError` naming every missing, unexpected or wrongly shaped tensor."""
    expected = module.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key in sorted(set(expected) & set(state)):
        if tuple(expected[key].shape) != tuple(state[key].shape):
            problems.append(
                f"tensor {key!r} has shape {tuple(state[key].shape)}, the architecture needs {tuple(expected[key].shape)}"
            )
        elif not state[key].is_floating_point() and expected[key].is_floating_point():
            problems.append(f"tensor {key!r} has dtype {state[key].dtype}, expected a floating dtype")
    if problems:
        raise WeightFileError(f"weights: {source} does not match its architecture: " + "; ".join(problems[:6]))
