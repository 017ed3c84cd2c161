"""The searched-solver file: a small safetensors file with its provenance in the metadata.

Tensors (float64):

* ``time_logits`` ``(N,)``, ``corrections`` ``(N, N)``, ``time_offsets`` ``(N,)`` and ``gains``
  ``(N,)`` (optional; zeros when absent), ``corrector`` ``(N, N)`` and ``start_logit`` ``(1,)``
  (optional; a file with ``start_logit`` is format version 2, so older readers refuse it), and
  ``start_bridge`` (optional, a 0-d flag, 1: the searched start carries the truncation bridge; such a
  file is format version 3, so a reader that does not know the bridge refuses it): the searched
  parameters (what the solver is rebuilt from, through
  :func:`fewstep.search.parameterisation.step_table`);
* ``times``, ``eval_times``, ``a``, ``weights``: the resulting grid, the times the network is told,
  and the step coefficients ``x_{i+1} = a[i] x_i + sum_j weights[i, j] D_j``, for people and tools
  that read the solver without fewstep.

Metadata (strings): ``format``, ``version``, ``nfe``, ``view``, ``base_order``, ``prediction`` (of the
model it was searched on), ``schedule`` (JSON of :meth:`fewstep.schedules.Schedule.fingerprint`, which
carries the grid range ``t_min``/``t_max``), ``model`` (a name), ``search`` (JSON: training and
validation errors, samples, teacher, seconds).

Example::

    >>> import torch, tempfile, os
    >>> from fewstep import schedules
    >>> from fewstep.search import fileformat, parameterisation as P
    >>> sch = schedules.EDM()
    >>> p = P.SolverParameters.from_grid(sch, torch.tensor([80.0, 1.0, 0.01]))
    >>> path = os.path.join(tempfile.mkdtemp(), "s.safetensors")
    >>> fileformat.save(path, p, sch, prediction="eps", model="demo")
    >>> fileformat.load(path).nfe
    3
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..schedules import Schedule
from .parameterisation import SolverParameters, step_table

__all__ = ["FORMAT", "VERSION", "SearchedFile", "save", "load", "check_schedule", "ScheduleMismatch"]

FORMAT = "fewstep-searched-solver"
VERSION = 3
F64 = torch.float64


class ScheduleMismatch(ValueError):
    """A searched solver was applied to a model whose noise schedule differs from the one it was searched on."""


@dataclass
class SearchedFile:
    """A loaded searched solver: its parameters and where they came from."""

    params: SolverParameters
    schedule: dict
    prediction: str
    model: str
    search: dict = field(default_factory=dict)
    path: str = ""
    stored: dict = field(default_factory=dict)  # times, a, weights as written

    @property
    def nfe(self) -> int:
        return self.params.nfe

    @property
    def view(self) -> str:
        return self.params.view

    @property
    def t_range(self) -> tuple[float, float]:
        return float(self.schedule["t_min"]), float(self.schedule["t_max"])


def save(path, params: SolverParameters, schedule: Schedule, *, prediction: str, model: str,
         search: dict | None = None) -> Path:
    """Write ``params`` (searched on ``schedule``) to ``path`` atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    from ..bench.report import atomic_path

    p = params.detached()
    with torch.no_grad():
        table = step_table(p, schedule)
    tensors = {
        "time_logits": p.time_logits.to(F64).contiguous(),
        "corrections": p.corrections.to(F64).contiguous(),
        "time_offsets": p.time_offsets.to(F64).contiguous(),
        "gains": p.gains.to(F64).contiguous(),
        "times": table.times.contiguous(),
        "eval_times": table.eval_times.contiguous(),
        "a": table.a.contiguous(),
        "weights": table.weights.contiguous(),
    }
    if p.corrector is not None:
        tensors["corrector"] = p.corrector.to(F64).contiguous()
        tensors["corrector_weights"] = table.corrector_weights.contiguous()
    if p.start_logit is not None:
        tensors["start_logit"] = p.start_logit.to(F64).contiguous()
    if p.bridged:
        tensors["start_bridge"] = torch.ones((), dtype=F64)
    meta = {
        "format": FORMAT,
        # version 1 files (no searched start) stay readable by fewstep releases that know only those,
        # version 2 (a searched start without the bridge) by those that know no bridge
        "version": str(VERSION if p.bridged else 2 if p.start_logit is not None else 1),
        "nfe": str(p.nfe),
        "view": p.view,
        "base_order": str(p.base_order),
        "prediction": str(prediction),
        "schedule": json.dumps(schedule.fingerprint()),
        "model": str(model),
        "search": json.dumps(search or {}, default=float),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


def load(path) -> SearchedFile:
    """Read a searched-solver file; ``ValueError`` if it is not one (or of a newer format version)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no searched solver file at {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise ValueError(f"path: {path!r} is not a safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"path: {path!r} is not a fewstep searched solver (format {meta.get('format')!r})")
    if int(meta.get("version", "0")) > VERSION:
        raise ValueError(f"path: {path!r} has format version {meta['version']}; this fewstep reads up to {VERSION}")
    for key in ("time_logits", "corrections"):
        if key not in tensors:
            raise ValueError(f"path: {path!r} lacks the tensor {key!r}")
    offsets, gains, corrector = tensors.get("time_offsets"), tensors.get("gains"), tensors.get("corrector")
    start = tensors.get("start_logit")
    bridge = tensors.get("start_bridge")
    bridge = bridge is not None and bool(bridge.reshape(-1)[0] != 0)
    if bridge and start is None:
        raise ValueError(f"path: {path!r} has the truncation bridge but no searched start")
    params = SolverParameters(meta["view"], int(meta["base_order"]), tensors["time_logits"].to(F64),
                              tensors["corrections"].to(F64), None if offsets is None else offsets.to(F64),
                              None if gains is None else gains.to(F64),
                              None if corrector is None else corrector.to(F64),
                              None if start is None else start.to(F64), bridge)
    if params.nfe != int(meta["nfe"]):
        raise ValueError(f"path: {path!r} says nfe={meta['nfe']} but stores {params.nfe} time parameters")
    return SearchedFile(
        params=params,
        schedule=json.loads(meta["schedule"]),
        prediction=meta.get("prediction", ""),
        model=meta.get("model", ""),
        search=json.loads(meta.get("search", "{}") or "{}"),
        path=path,
        stored={k: tensors[k] for k in ("times", "eval_times", "a", "weights", "corrector_weights") if k in tensors},
    )


def _close(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-6)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


def check_schedule(searched: SearchedFile, schedule: Schedule) -> None:
    """Raise :class:`ScheduleMismatch` unless ``schedule`` is the one the solver was searched on."""
    want, got = searched.schedule, schedule.fingerprint()
    keys = set(want) | set(got)
    differ = sorted(k for k in keys if not _close(want.get(k), got.get(k)))
    if differ:
        where = f" ({searched.path})" if searched.path else ""
        detail = "; ".join(f"{k}: searched on {want.get(k)!r}, model has {got.get(k)!r}" for k in differ[:3])
        raise ScheduleMismatch(
            f"schedule: this searched solver{where} was searched for model {searched.model!r} on a "
            f"{want.get('kind')} schedule and does not fit this model's {got.get('kind')} schedule "
            f"(differs in {differ}: {detail}); search one for this model with `fewstep search`"
        )
