"""Accuracy: endpoint RMSE against exact references, fewstep vs diffusers' schedulers, per NFE.

Every solver starts from the same float64 noise on the same model and is scored by the root mean
square distance of its output to the reference end point of the probability-flow ODE from that noise
(:mod:`fewstep.bench.targets`). No sampling noise enters the number: it is discretisation error only.

Rows:

* each deterministic fewstep solver at its default options, one row per supported order;
* ``fewstep default``: ``fewstep.sample(model, noise, nfe=N)`` with no solver named;
* the peers: diffusers' DDIM, DPM-Solver++ (2M, 3M), UniPC (orders 2, 3), DEIS (orders 2, 3) and
  SA-Solver with ``tau = 0`` (its ODE form), each with every spacing option it supports
  (``timestep_spacing`` linspace/leading/trailing, Karras, Lu (uniform log-SNR), exponential and beta
  sigmas, ``final_sigmas_type`` zero and sigma_min). The *best peer* at an NFE is the minimum over
  all of them on that target: an oracle that picks the best configuration after the fact, which no
  user of diffusers can do.

A peer's NFE is its number of model calls (``num_inference_steps`` for these schedulers, all one
call per step); fewstep's is the ``nfe=`` budget, never exceeded.

Example::

    fewstep bench accuracy --target gmm --nfe 4,5,6,8,10,15,20
    fewstep bench accuracy --target gmm,digits16 --grids
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from .. import grids as _grids
from .. import solvers as _solvers
from ..sample import SamplingError, recommended, sample
from ..solvers.base import REGISTRY
from . import targets as _targets
from .report import Report, atomic_path, fmt, geomean, markdown_table

__all__ = [
    "FewstepRow",
    "PeerConfig",
    "Defect",
    "TargetResult",
    "fewstep_rows",
    "peer_configs",
    "measure",
    "run_fewstep",
    "run_peer",
    "extra_checks",
    "merge_identical",
    "open_grid",
    "grid_names",
    "error_table",
    "ratio_summary",
    "grid_ranking",
    "add_arguments",
    "run",
]

DEFAULT_NFES = (4, 5, 6, 8, 10, 15, 20)
#: The budgets the headline ratio averages over (geometric mean).
HEADLINE_NFES = (5, 6, 8, 10)
DEFAULT_LABEL = "fewstep default"
#: The searched solver fewstep ships for the target and NFE (``fewstep.search.bundled``), when there is one.
SEARCHED_LABEL = "fewstep searched (bundled)"
BEST_PEER = "best peer (oracle)"


# ------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class FewstepRow:
    """A fewstep configuration: ``solver=None`` is :func:`fewstep.sample`'s own choice."""

    label: str
    solver: str | None
    options: tuple = ()
    grid: str | None = None
    #: truncate the schedule: start from pure noise where the log-SNR is this (``sample(start_logsnr=)``)
    start_logsnr: float | None = None

    def kwargs(self) -> dict:
        return dict(self.options)


#: ``--starts``: the candidates for the default at few steps, each from every start log-SNR below
#: (``None``: from t_max) -- how ``sample.py::_RECOMMENDED`` was chosen.
START_CANDIDATES = (("fv", 1), ("heroism", 2), ("heroism", 3), ("unipc", 2), ("unipc", 3))
START_LOGSNRS = (None, -4.1, -3.6, -3.24, -2.9)
START_GRID = "quadratic-open"


def start_rows() -> list[FewstepRow]:
    """Rows of the ``--starts`` sweep: each candidate on ``quadratic-open`` from each start log-SNR."""
    rows = []
    for name, order in START_CANDIDATES:
        if name not in REGISTRY:
            continue
        for lam in START_LOGSNRS:
            where = "t_max" if lam is None else f"log-SNR {lam:g}"
            rows.append(FewstepRow(f"{name} o{order} @ {START_GRID} from {where}", name, (("order", order),),
                                   START_GRID, lam if lam is not None else -math.inf))
    return rows


def fewstep_rows(grids: Sequence[str | None] = (None,)) -> tuple[list[FewstepRow], list[str]]:
    """Rows for every registered deterministic solver (one per order) on each grid in ``grids``.

    ``None`` in ``grids`` means the default grid. Returns ``(rows, notes)``; solvers that cannot be
    built from defaults alone (``searched`` needs a file, ``mlem`` a model family) are left out with a
    note. The ``fewstep default`` row comes first when ``None`` is among the grids.
    """
    rows: list[FewstepRow] = []
    notes: list[str] = []
    if None in grids:
        rows.append(FewstepRow(DEFAULT_LABEL, None))
        if "searched" in REGISTRY:
            rows.append(FewstepRow(SEARCHED_LABEL, "searched"))
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        if cls.stochastic or name == "searched":  # searched: one file per target and NFE (SEARCHED_LABEL)
            continue
        orders = list(cls.orders) if "order" in cls.options and len(cls.orders) > 1 else [None]
        for order in orders:
            options = () if order is None else (("order", order),)
            try:
                _solvers.get(name, **dict(options))
            except (ValueError, TypeError) as e:
                notes.append(f"`{name}` left out: it cannot run at its defaults ({e})")
                break
            base = name if order is None else f"{name} o{order}"
            for grid in grids:
                label = base if grid is None else f"{base} @ {grid}"
                rows.append(FewstepRow(label, name, options, grid))
    return rows, notes


@dataclass(frozen=True)
class PeerConfig:
    """One diffusers scheduler configuration (class name and constructor keywords)."""

    family: str
    cls_name: str
    options: tuple
    label: str

    def kwargs(self) -> dict:
        return dict(self.options)


def _deterministic_tau(_t) -> float:
    """SA-Solver's ``tau_func`` for its ODE form (tau = 0 at every time)."""
    return 0.0


#: Spacing variants: (label, keywords). The sigma kinds replace the timestep spacing entirely in
#: diffusers (set_timesteps recomputes the times from the sigmas), so they are listed once.
_SPACINGS = (("linspace", {"timestep_spacing": "linspace"}),
             ("leading", {"timestep_spacing": "leading"}),
             ("trailing", {"timestep_spacing": "trailing"}))
_SIGMA_KINDS = {
    "karras": {"use_karras_sigmas": True},
    "lu": {"use_lu_lambdas": True},
    "exp": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
}
_FINALS = (("zero", {"final_sigmas_type": "zero"}), ("sigma_min", {"final_sigmas_type": "sigma_min"}))


def _variants(sigma_kinds: Iterable[str], finals: bool) -> list[tuple[str, dict]]:
    spacing = list(_SPACINGS) + [(k, _SIGMA_KINDS[k]) for k in sigma_kinds]
    if not finals:
        return spacing
    return [(f"{s}, final {f}", {**sk, **fk}) for s, sk in spacing for f, fk in _FINALS]


def peer_configs(families: Sequence[str] | None = None) -> list[PeerConfig]:
    """Every peer configuration of the accuracy benchmark (``families`` filters by family name)."""
    specs = [
        # clip_sample=False: DDIM's default clips x0 to [-1, 1] (for pixel models); the other
        # schedulers do not clip, and the testbeds' data is not confined to [-1, 1]
        ("DDIM", "DDIMScheduler", {"clip_sample": False}, _variants((), finals=False)),
        ("DPM-Solver++ 2M", "DPMSolverMultistepScheduler", {"solver_order": 2, "algorithm_type": "dpmsolver++"},
         _variants(("karras", "lu", "exp", "beta"), finals=True)),
        ("DPM-Solver++ 3M", "DPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "dpmsolver++"},
         _variants(("karras", "lu", "exp", "beta"), finals=True)),
        ("UniPC 2", "UniPCMultistepScheduler", {"solver_order": 2}, _variants(("karras", "exp", "beta"), finals=True)),
        ("UniPC 3", "UniPCMultistepScheduler", {"solver_order": 3}, _variants(("karras", "exp", "beta"), finals=True)),
        ("DEIS 2", "DEISMultistepScheduler", {"solver_order": 2}, _variants(("karras", "exp", "beta"), finals=False)),
        ("DEIS 3", "DEISMultistepScheduler", {"solver_order": 3}, _variants(("karras", "exp", "beta"), finals=False)),
        ("SA-Solver tau=0", "SASolverScheduler", {"tau_func": _deterministic_tau},
         _variants(("karras", "exp", "beta"), finals=False)),
    ]
    known = [s[0] for s in specs]
    if families is not None:
        unknown = sorted(set(families) - set(known))
        if unknown:
            raise ValueError(f"families: unknown {unknown}; valid: {known}")
    out = []
    for family, cls_name, base, variants in specs:
        if families is not None and family not in families:
            continue
        for vlabel, vkw in variants:
            out.append(PeerConfig(family, cls_name, tuple({**base, **vkw}.items()), f"{family}, {vlabel}"))
    return out


# ------------------------------------------------------------------------------------------ results
@dataclass
class Defect:
    """A peer (or fewstep) failure found on the way, with the input that shows it."""

    target: str
    where: str
    nfe: int
    what: str
    repro: str


@dataclass
class TargetResult:
    """RMSE per configuration label and NFE on one target (``None``: the budget is not reachable)."""

    target: _targets.Target
    nfes: list[int]
    fewstep: dict[str, dict[int, float | None]] = field(default_factory=dict)
    peers: dict[str, dict[int, float]] = field(default_factory=dict)
    peer_family: dict[str, str] = field(default_factory=dict)
    defects: list[Defect] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    floor: float | None = None

    def best_peer(self, nfe: int) -> tuple[float, str]:
        """The smallest finite peer error at ``nfe`` and its configuration (the oracle choice)."""
        best, label = math.inf, ""
        for name, errs in self.peers.items():
            e = errs.get(nfe)
            if e is not None and math.isfinite(e) and e < best:
                best, label = e, name
        return (best, label) if label else (math.nan, "")

    def best_in_family(self, family: str, nfe: int) -> tuple[float, str]:
        best, label = math.inf, ""
        for name, errs in self.peers.items():
            e = errs.get(nfe)
            if self.peer_family[name] == family and e is not None and math.isfinite(e) and e < best:
                best, label = e, name
        return (best, label) if label else (math.nan, "")

    def families(self) -> list[str]:
        return list(dict.fromkeys(self.peer_family.values()))

    def ratio(self, label: str, nfe: int) -> float:
        """``error(label) / best peer`` at ``nfe`` (NaN when either is missing)."""
        e = self.fewstep.get(label, {}).get(nfe)
        best = self.best_peer(nfe)[0]
        if e is None or not math.isfinite(best) or best <= 0:
            return math.nan
        return e / best


def _quiet_diffusers():
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
    except ImportError:  # pragma: no cover - diffusers is a declared dependency of the bench
        pass


#: Suffix of the grid variants that spend no evaluation at t_min (see :func:`open_grid`).
OPEN = "-open"


def grid_names(open_variants: bool = True) -> tuple[str, ...]:
    """The named grids of :mod:`fewstep.grids`, each followed by its ``-open`` variant."""
    if not open_variants:
        return tuple(_grids.NAMES)
    return tuple(g for name in _grids.NAMES for g in (name, name + OPEN))


def open_grid(name: str, schedule, points: int) -> torch.Tensor:
    """The named grid spaced for ``points + 1`` points with its last point (``t_min``) dropped.

    A named grid ends at ``t_min``, so one of the ``points`` evaluations is spent there, next to
    clean data, before the final step to zero noise. The open variant spends every evaluation above
    ``t_min`` and lets the final step (which uses the last prediction) land on zero noise from the
    previous point, as diffusers' schedulers with ``final_sigmas_type="zero"`` do.
    """
    return _grids.make(name, schedule, points + 1)[:-1]


def run_fewstep(target: _targets.Target, row: FewstepRow, nfe: int) -> tuple[float | None, str | None]:
    """RMSE of one fewstep configuration at ``nfe``; ``(None, reason)`` when it cannot run there."""
    try:
        solver_name = row.solver
        opts = row.kwargs()
        grid = row.grid
        if row.label == SEARCHED_LABEL:
            from ..search import bundled

            path = bundled(target.name, nfe)
            if path is None:
                return None, None  # nothing shipped for this target and NFE: an empty cell
            opts["path"] = str(path)
        if solver_name is not None:
            solver = _solvers.get(solver_name, **opts)
            if nfe < solver.min_nfe():
                return None, None
            if grid is not None and grid.endswith(OPEN) and row.start_logsnr is None:
                grid = open_grid(grid[: -len(OPEN)], target.schedule, solver.num_points(nfe))
        if row.start_logsnr is not None:
            opts["start_logsnr"] = row.start_logsnr
        with torch.no_grad():
            out, info = sample(target.model, target.noise, solver=solver_name, nfe=nfe, grid=grid,
                               return_info=True, **opts)
    except SamplingError as e:
        return math.nan, str(e)
    except ValueError as e:
        return None, str(e)
    if info.nfe > nfe:
        return math.nan, f"used {info.nfe} evaluations for nfe={nfe}"
    return target.rmse(out), None


def run_peer(target: _targets.Target, cfg: PeerConfig, nfe: int) -> tuple[float, str | None]:
    """RMSE of one diffusers configuration at ``nfe`` model calls; ``(nan, what)`` on a failure."""
    from .peers import make_scheduler, run_scheduler

    model = target.model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler = make_scheduler(cfg.cls_name, model, **cfg.kwargs())
            model.reset_counters()
            # only stochastic-capable schedulers take a generator (SA-Solver: drawn, times tau = 0)
            takes_generator = "generator" in inspect.signature(scheduler.step).parameters
            generator = torch.Generator().manual_seed(0) if takes_generator else None
            out = run_scheduler(scheduler, model, target.noise, nfe, generator=generator)
    except ImportError:  # a broken installation is not a property of the peer: fail loudly
        raise
    except Exception as e:  # a peer's own failure is a measurement, not a crash of the benchmark
        return math.nan, f"raised {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    calls = model.nfe
    if calls != nfe:
        return math.nan, f"made {calls} model calls for num_inference_steps={nfe}"
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).any(dim=tuple(range(1, out.dim()))).sum())
        return math.nan, f"returned NaN/Inf for {bad} of {out.shape[0]} samples"
    times = [float(t) for t in scheduler.timesteps]
    if len(set(times)) < len(times):
        # still scored: the result is finite, but steps of zero length waste model calls
        return target.rmse(out), f"repeats timesteps {_repeats(times)} (zero-length steps; still scored)"
    return target.rmse(out), None


def _repeats(times: list[float]) -> list[float]:
    seen, out = set(), []
    for t in times:
        if t in seen and t not in out:
            out.append(t)
        seen.add(t)
    return [int(t) if t == int(t) else t for t in out]


#: Peer options worth checking even though they are not in the comparison (reported as found).
EXTRA_CHECKS = (
    PeerConfig("check", "UniPCMultistepScheduler", (("solver_order", 2), ("use_lu_lambdas", True)),
               "UniPC 2, use_lu_lambdas=True"),
    PeerConfig("check", "DPMSolverMultistepScheduler",
               (("solver_order", 2), ("algorithm_type", "dpmsolver++"), ("use_lu_lambdas", True)),
               "DPM-Solver++ 2M, lu, 50 steps"),
)
EXTRA_CHECK_NFE = {"UniPC 2, use_lu_lambdas=True": 10, "DPM-Solver++ 2M, lu, 50 steps": 50}


def extra_checks(target: _targets.Target) -> list[Defect]:
    """Run :data:`EXTRA_CHECKS` on ``target``; a :class:`Defect` for each that fails or misbehaves."""
    _quiet_diffusers()
    out = []
    for cfg in EXTRA_CHECKS:
        nfe = EXTRA_CHECK_NFE[cfg.label]
        e, why = run_peer(target, cfg, nfe)
        if why is not None:
            out.append(Defect(target.name, cfg.label, nfe, why, _repro(cfg, nfe, target.name)))
    return out


def _show(value) -> str:
    return "lambda t: 0" if callable(value) else repr(value)


def _repro(cfg: PeerConfig, nfe: int, target: str) -> str:
    opts = ", ".join(f"{k}={_show(v)}" for k, v in cfg.options)
    return f"{cfg.cls_name}({opts}) on `{target}` (linear betas), num_inference_steps={nfe}"


#: an error this many times the RMS size of the reference is reported as a divergence
DIVERGED = 10.0


def _diverged(target: _targets.Target, e) -> str | None:
    scale = float(target.reference.pow(2).mean().sqrt())
    if e is not None and math.isfinite(e) and e > DIVERGED * scale:
        return f"diverged: RMSE {fmt(e)} is {fmt(e / scale)}x the RMS size of the data ({fmt(scale)})"
    return None


def measure(target: _targets.Target, nfes: Sequence[int], rows: Sequence[FewstepRow],
            peers: Sequence[PeerConfig], progress=None) -> TargetResult:
    """Run every row and peer at every NFE on one target."""
    _quiet_diffusers()
    res = TargetResult(target=target, nfes=list(nfes))
    for row in rows:
        errs: dict[int, float | None] = {}
        for nfe in nfes:
            e, why = run_fewstep(target, row, nfe)
            why = why or _diverged(target, e)
            errs[nfe] = e
            if why is not None and e is not None:
                res.defects.append(Defect(target.name, row.label, nfe, why, f"fewstep.sample(solver={row.solver!r}, "
                                                              f"nfe={nfe}, grid={row.grid!r}, **{row.kwargs()})"))
            elif why is not None and row.solver is None and f"`{row.label}`: {why}" not in res.notes:
                res.notes.append(f"`{row.label}`: {why}")
            if progress is not None:
                progress.update(1)
        res.fewstep[row.label] = errs
    for cfg in peers:
        errs2: dict[int, float] = {}
        for nfe in nfes:
            e, why = run_peer(target, cfg, nfe)
            why = why or _diverged(target, e)
            errs2[nfe] = e
            if why is not None:
                res.defects.append(Defect(target.name, cfg.label, nfe, why, _repro(cfg, nfe, target.name)))
            if progress is not None:
                progress.update(1)
        res.peers[cfg.label] = errs2
        res.peer_family[cfg.label] = cfg.family
    return res


# ------------------------------------------------------------------------------------------- tables
Rows = Sequence[tuple[str, str]]  # (label shown, label measured)


def merge_identical(results: TargetResult | Sequence[TargetResult], labels: Sequence[str],
                    rel: float = 1e-12) -> list[tuple[str, str]]:
    """``(shown, label)`` for each distinct row: rows whose errors agree at every NFE on every
    target (to ``rel``) are one method under several names (``dpm++ o1`` is ``ddim``) and are
    shown once, as ``"ddim = dpm++ o1"``. ``fewstep default`` is never merged."""
    results = [results] if isinstance(results, TargetResult) else list(results)

    def same(a: str, b: str) -> bool:
        for res in results:
            for n in res.nfes:
                x, y = res.fewstep[a][n], res.fewstep[b][n]
                if (x is None) != (y is None):
                    return False
                if x is not None and not (x == y or abs(x - y) <= rel * max(abs(x), abs(y))):
                    return False
        return True

    groups: list[list[str]] = []
    for label in labels:
        for g in groups:
            if label != DEFAULT_LABEL and g[0] != DEFAULT_LABEL and same(g[0], label):
                g.append(label)
                break
        else:
            groups.append([label])
    return [(_join(g), g[0]) for g in groups]


def _join(group: list[str]) -> str:
    """``["ddim @ logsnr", "dpm++ o1 @ logsnr"]`` -> ``"ddim = dpm++ o1 @ logsnr"`` (grid said once)."""
    grids = {g.split(" @ ")[1] if " @ " in g else None for g in group}
    if len(grids) == 1 and None not in grids:
        grid = grids.pop()
        return " = ".join(g.split(" @ ")[0] for g in group) + f" @ {grid}"
    return " = ".join(group)


def _cell(v) -> str:
    if v is None:
        return "—"
    return fmt(float(v))


def error_table(res: TargetResult, rows: Rows | Sequence[str]) -> str:
    """RMSE per row and NFE, then each peer family's best configuration and the best peer."""
    rows = _as_rows(rows)
    header = ["solver"] + [f"NFE {n}" for n in res.nfes]
    lines = []
    for shown, label in rows:
        errs = res.fewstep[label]
        lines.append([f"**{shown}**" if label == DEFAULT_LABEL else shown] + [_cell(errs[n]) for n in res.nfes])
    for fam in res.families():
        lines.append([f"diffusers {fam} (best config)"] + [_cell(res.best_in_family(fam, n)[0]) for n in res.nfes])
    if res.peers:
        lines.append([f"**{BEST_PEER}**"] + [_cell(res.best_peer(n)[0]) for n in res.nfes])
    return markdown_table(header, lines)


def _as_rows(rows) -> list[tuple[str, str]]:
    return [(r, r) if isinstance(r, str) else tuple(r) for r in rows]


def best_peer_table(res: TargetResult) -> str:
    rows = [[n, _cell(res.best_peer(n)[0]), res.best_peer(n)[1] or "—"] for n in res.nfes]
    return markdown_table(["NFE", "best peer RMSE", "configuration"], rows)


def full_peer_table(res: TargetResult) -> str:
    header = ["diffusers configuration"] + [f"NFE {n}" for n in res.nfes]
    rows = [[label] + [_cell(errs[n]) for n in res.nfes] for label, errs in res.peers.items()]
    return markdown_table(header, rows)


def winners_table(res: TargetResult, rows: Rows | Sequence[str]) -> str:
    """Per NFE: the best fewstep row among ``rows`` and its ratio to the best peer."""
    out = []
    for n in res.nfes:
        cands = [(res.fewstep[l][n], shown) for shown, l in _as_rows(rows)
                 if res.fewstep[l].get(n) is not None and math.isfinite(res.fewstep[l][n])]
        if not cands:
            out.append([n, "—", "—", "—"])
            continue
        e, shown = min(cands)
        best = res.best_peer(n)[0]
        out.append([n, shown, _cell(e), _cell(e / best if math.isfinite(best) and best > 0 else math.nan)])
    return markdown_table(["NFE", "best fewstep row", "RMSE", "/ best peer"], out)


def ratio_summary(results: Sequence[TargetResult], label: str = DEFAULT_LABEL,
                  headline: Sequence[int] = HEADLINE_NFES) -> tuple[str, float]:
    """Table of ``label / best peer`` per target and NFE, with geometric means over ``headline`` NFEs.

    Returns the markdown and the geometric mean over every (target, headline NFE) pair.
    """
    nfes = sorted({n for r in results for n in r.nfes})
    head = [n for n in headline if n in nfes]
    rows, pooled = [], []
    for r in results:
        ratios = [r.ratio(label, n) if n in r.nfes else math.nan for n in nfes]
        gm = geomean([r.ratio(label, n) for n in head])
        pooled += [r.ratio(label, n) for n in head]
        rows.append([r.target.name] + [_cell(v) for v in ratios] + [_cell(gm)])
    total = geomean(pooled)
    rows.append(["**all targets**"] + ["" for _ in nfes] + [f"**{_cell(total)}**"])
    header = ["target"] + [f"NFE {n}" for n in nfes] + [f"geomean NFE {','.join(map(str, head))}"]
    return markdown_table(header, rows), total


def grid_ranking(results: Sequence[TargetResult], rows: Rows | Sequence[str], top: int = 3) -> str:
    """Per NFE, the fewstep rows with the lowest geometric-mean ``error / best peer`` over targets."""
    nfes = sorted({n for r in results for n in r.nfes})
    out = []
    for n in nfes:
        scored = []
        for shown, l in _as_rows(rows):
            if l == DEFAULT_LABEL:
                continue
            g = geomean([r.ratio(l, n) for r in results if n in r.nfes])
            if math.isfinite(g):
                scored.append((g, shown))
        scored.sort()
        out.append([n] + [f"{shown} ({fmt(g)})" for g, shown in scored[:top]] + ["—"] * (top - len(scored[:top])))
    return markdown_table(["NFE"] + [f"#{i + 1} (geomean / best peer)" for i in range(top)], out)


# -------------------------------------------------------------------------------------------- plots
def plot(res: TargetResult, path, rows: Rows | Sequence[str]) -> None:
    """Error vs NFE (log-log): one line per fewstep solver, the peers' families thin, best peer bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 5.4), dpi=110)
    # tab10 without its grey (kept for the peers) plus two more, one colour per solver family
    palette = [plt.get_cmap("tab10")(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)] + ["navy", "olive"]
    # one colour per solver family, one line style per order within it
    families: dict[str, int] = {}
    styles = ["-", "--", "-.", ":", (0, (1, 1)), (0, (5, 1))]
    seen: dict[str, int] = {}
    for shown, label in _as_rows(rows):
        pts = [(n, e) for n, e in res.fewstep[label].items() if e is not None and math.isfinite(e) and e > 0]
        if not pts:
            continue
        xs, ys = zip(*pts)
        if label == DEFAULT_LABEL:
            ax.plot(xs, ys, "-o", color="crimson", lw=2.6, ms=5, label=label, zorder=5)
            continue
        family = label.split(" ")[0]
        colour = palette[families.setdefault(family, len(families)) % len(palette)]
        k = seen[family] = seen.get(family, -1) + 1
        ax.plot(xs, ys, linestyle=styles[k % len(styles)], marker=".", color=colour, lw=1.3, label=shown)
    for fam in res.families():
        pts = [(n, res.best_in_family(fam, n)[0]) for n in res.nfes]
        pts = [(n, e) for n, e in pts if math.isfinite(e)]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "--", color="0.65", lw=0.9)
    pts = [(n, res.best_peer(n)[0]) for n in res.nfes]
    pts = [(n, e) for n, e in pts if math.isfinite(e)]
    if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, "--s", color="black", lw=2.4, ms=5, label=f"{BEST_PEER} (diffusers)", zorder=4)
        ax.plot([], [], "--", color="0.65", lw=0.9, label="diffusers families (best config each)")
    if res.floor is not None:
        ax.axhline(res.floor, color="0.4", lw=0.8, ls=":", label="floor: exact state at t_min, then denoise")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # a diverging row must not squash the others: clip far above the best peer's worst error
    scale = [e for e in (res.best_peer(n)[0] for n in res.nfes) if math.isfinite(e)]
    if scale:
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, min(hi, 30 * max(scale)))
    ax.set_xticks(res.nfes)
    ax.set_xticklabels([str(n) for n in res.nfes])
    ax.minorticks_off()
    ax.set_xlabel("NFE (network evaluations)")
    ax.set_ylabel("RMSE to the reference end point")
    ax.set_title(f"accuracy on {res.target.name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- CLI
def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"nfe: expected a comma-separated list of integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise ValueError(f"nfe: expected positive integers, got {text!r}")
    return sorted(set(vals))


def add_arguments(parser) -> None:
    parser.add_argument("--target", default="gmm",
                        help="comma-separated: gmm (= gmm2d,gmm16,gmm64), gaussian, digits16, patches32")
    parser.add_argument("--nfe", default=",".join(map(str, DEFAULT_NFES)), help="comma-separated NFE budgets")
    parser.add_argument("--samples", type=int, default=None,
                        help="noise samples per target (default: 512 on testbeds, 32 on bundled models)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fixed noise")
    parser.add_argument("--grids", action="store_true",
                        help="also run every fewstep solver on each named grid and its -open variant "
                             "(no evaluation at t_min), in secondary tables")
    parser.add_argument("--starts", action="store_true",
                        help="also run the default's candidates from several start log-SNRs (a truncated "
                             "schedule), ranked in a secondary table: how the default was chosen")
    parser.add_argument("--no-peers", action="store_true", help="skip diffusers (fewstep rows only)")


def run(args) -> Report:
    from tqdm.auto import tqdm

    names = _targets.expand(args.target)
    nfes = _int_list(args.nfe)
    rows, row_notes = fewstep_rows((None,))
    grid_rows: list[FewstepRow] = fewstep_rows(grid_names())[0] if args.grids else []
    grid_rows += start_rows() if getattr(args, "starts", False) else []
    peers = [] if args.no_peers else peer_configs()
    report = Report(title="fewstep bench accuracy: endpoint RMSE against exact references")
    report.add("Setup", _setup_text(nfes, peers, row_notes))
    results: list[TargetResult] = []
    skipped: list[str] = []
    for name in names:
        try:
            target = _targets.build(name, samples=args.samples, seed=args.seed, progress=True)
        except _targets.TargetUnavailable as e:
            skipped.append(f"- `{name}` skipped: {e}")
            continue
        work = (len(rows) + len(grid_rows) + len(peers)) * len(nfes)
        with tqdm(total=work, desc=f"accuracy {name}", unit="run", leave=False) as bar:
            res = measure(target, nfes, rows + grid_rows, peers, progress=bar)
        res.floor = _targets.denoise_floor(target)
        results.append(res)
    main = merge_identical(results, [r.label for r in rows])
    by_grid = merge_identical(results, [r.label for r in grid_rows])
    if results and peers:
        table, total = ratio_summary(results)
        report.add(
            "Summary: fewstep default / best peer",
            "Ratio of the RMSE of `fewstep.sample(model, noise, nfe=N)` to the best diffusers configuration "
            "at the same NFE (below 1: fewstep is more accurate than every peer configuration). Geometric "
            f"mean over NFE {', '.join(map(str, HEADLINE_NFES))} per target and over all targets run "
            "(acceptance: at most 0.6 on the Gaussian-mixture testbeds and digits16).\n\n" + table
            + "\n\nBest fewstep solvers (default grid), ranked by the geometric mean over the targets of "
            "`error / best peer`:\n\n" + grid_ranking(results, main),
        )
        if any(r.label == SEARCHED_LABEL for r in rows):
            table, total = ratio_summary(results, label=SEARCHED_LABEL)
            report.add(
                "Summary: searched solvers / best peer",
                "Ratio of the RMSE of the searched solver fewstep ships for the target and NFE "
                "(`fewstep.sample(model, noise, solver=\"searched\", path=fewstep.search.bundled(target, N))`, "
                "searched on noise disjoint from this benchmark's) to the best diffusers configuration "
                "(acceptance: at most 0.3 on the same targets and NFE). nan: no searched solver shipped for that NFE.\n\n" + table,
            )
        if grid_rows:
            report.add("Which fewstep solver, grid and start (for `sample.py::_RECOMMENDED` and `default_grid`)",
                       "Each fewstep solver on each named grid, ranked per NFE by the geometric mean over the "
                       "targets of `error / best peer`. `NAME-open` is the named grid spaced for one more "
                       "point with its last point, t_min, dropped: no evaluation is spent next to clean "
                       "data, and the final step to zero noise starts from the point before (as diffusers' "
                       "`final_sigmas_type=\"zero\"` does). `from log-SNR L` (with `--starts`): the schedule "
                       "truncated, sampling starts from pure noise where the log-SNR is L "
                       "(`fewstep.sample(..., start_logsnr=L)`).\n\n" + grid_ranking(results, by_grid, top=5))
    for res in results:
        _add_target_sections(report, res, main, by_grid, args.out)
    if skipped:
        report.add("Targets not run", "\n".join(skipped))
    defects = [d for r in results for d in r.defects]
    if results and peers:
        defects += extra_checks(results[0].target)
    peer_names = {p.label for p in peers} | {c.label for c in EXTRA_CHECKS}
    report.add("Peer defects found on the way (diffusers)",
               _defects_text([d for d in defects if d.where in peer_names]))
    report.add("fewstep failures found on the way",
               _defects_text([d for d in defects if d.where not in peer_names]))
    return report


def _setup_text(nfes, peers, row_notes) -> str:
    fams = list(dict.fromkeys(p.family for p in peers))
    text = (
        f"NFE budgets: {', '.join(map(str, nfes))}. Metric: root mean square of `output - reference` over "
        "every sample and coordinate, float64 throughout. fewstep rows: every registered deterministic solver "
        "at its default options and default grid, one row per order (rows that are the same method, such as "
        "`dpm++ o1` and `ddim`, are merged), and `fewstep default` = `fewstep.sample(model, noise, nfe=N)` "
        f"(now: {_recommended_text(nfes)}). "
        f"Peers: diffusers {', '.join(fams) or '(none)'}, {len(peers)} configurations in all (every spacing "
        "option each supports); the best peer at an NFE is the minimum over all of them, chosen after "
        "the fact."
    )
    return text + "".join(f"\n\nNote: {n}." for n in row_notes)


def _recommended_text(nfes) -> str:
    from ..sample import _recommended_entry

    parts = []
    for n in nfes:
        _, name, opts, grid, start_logsnr = _recommended_entry(n)
        start = f", from log-SNR {start_logsnr:g}" if start_logsnr is not None else ""
        parts.append(f"{n}: {name}" + "".join(f" {k}={v}" for k, v in opts.items()) + f" on {grid}{start}")
    return "; ".join(parts)


def _add_target_sections(report: Report, res: TargetResult, main: Rows, by_grid: Rows, out) -> None:
    from pathlib import Path

    t = res.target
    lines = [t.description + ".", "", f"Reference: {t.reference_note}."]
    if res.floor is not None:
        lines.append(f"Floor: a solver that reaches the exact state at t_min and returns the data prediction "
                     f"there is off by RMSE {fmt(res.floor)} (the reference runs on to zero noise).")
    lines += [f"Note: {n}" for n in res.notes + t.notes]
    lines += ["", error_table(res, main)]
    if res.peers:
        lines += ["", "Best peer configuration per NFE:", "", best_peer_table(res)]
        others = [r for r in main if r[1] != DEFAULT_LABEL]
        if others:
            lines += ["", "Best fewstep solver per NFE (default grid):", "", winners_table(res, others)]
    png = Path(out) / f"accuracy_{t.name}.png"
    plot(res, png, main)
    lines += ["", f"![accuracy on {t.name}]({png.name})"]
    report.add(f"{t.name}: RMSE", "\n".join(lines))
    if by_grid:
        header = ["solver @ grid"] + [f"NFE {n}" for n in res.nfes]
        rows = [[shown] + [_cell(res.fewstep[l][n]) for n in res.nfes] for shown, l in by_grid]
        report.add(f"{t.name}: fewstep solvers on each named grid",
                   "Best per NFE:\n\n" + winners_table(res, by_grid)
                   + "\n\n<details><summary>RMSE of every solver on every grid</summary>\n\n"
                   + markdown_table(header, rows) + "\n\n</details>")
    if res.peers:
        report.add(f"{t.name}: every peer configuration",
                   "<details><summary>RMSE of each diffusers configuration</summary>\n\n"
                   + full_peer_table(res) + "\n\n</details>")


def _defects_text(defects: Sequence[Defect]) -> str:
    """One row per (configuration, kind of failure), with the targets and budgets where it happened."""
    if not defects:
        return "None."
    grouped: dict[tuple[str, str], list[Defect]] = {}
    for d in defects:
        kind = d.what.split(":")[0].split(" for ")[0]
        grouped.setdefault((d.where, kind), []).append(d)
    rows = []
    for (where, _), ds in grouped.items():
        at: dict[str, list[str]] = {}
        for d in ds:
            at.setdefault(d.target, []).append(str(d.nfe))
        where_text = "; ".join(f"{t} NFE {','.join(dict.fromkeys(n))}" for t, n in at.items())
        worst = ds[0]
        rows.append([where, where_text, worst.what, worst.repro])
    return markdown_table(["configuration", "where", "what happened (first case)", "input that shows it"], rows)
