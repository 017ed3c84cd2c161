"""Order: empirical convergence orders of every deterministic solver against the exact Gaussian flow.

Each solver runs on the log-SNR grid at growing NFE on a Gaussian testbed (eps prediction, diffusers'
linear betas, float64). The error is measured *at the last grid time* ``t_last``, where the
discretisation stops: the data prediction the solver's last evaluation produced, against the exact
one, ``gm.denoise(gm.reference(noise, sch, t_end=t_last), sch, t_last)``. (The final jump to zero
noise is one step of fixed size at every NFE, so measuring after it would floor the curves.) For a
predictor-corrector the last evaluation sits at the predicted point of the last step, whose local
error is one order higher than the global one, so it shows the corrected order too.

The fitted order is the least-squares slope of ``log(error)`` against ``log(steps)`` over the finest
half of the runs (runs below a 1e-12 floor are left out), where ``steps`` is the number of grid
intervals between ``t_max`` and ``t_last`` (the step size is ``Delta lambda / steps``).

Example::

    fewstep bench order
    fewstep bench order --nfe 8,16,32,64,128 --samples 16
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .. import solvers as _solvers
from ..sample import SamplingError, sample
from ..solvers.base import REGISTRY
from ..testbeds import Gaussian
from . import targets as _targets
from .report import Report, atomic_path, fmt, markdown_table

__all__ = ["OrderResult", "fitted_order", "theoretical_order", "measure_order", "add_arguments", "run"]

DEFAULT_NFES = (8, 11, 16, 23, 32, 45, 64, 90, 128)
#: errors below this are rounding, not discretisation
FLOOR = 1e-12


def fitted_order(steps: Sequence[float], errors: Sequence[float], floor: float = FLOOR) -> float:
    """Least-squares slope of ``-log(error)`` against ``log(steps)`` over the finest half of the runs.

    Runs at or below ``floor`` (or not finite) are dropped; at least two runs must remain.

    Example::

        >>> round(fitted_order([10, 20, 40, 80], [1e-2, 2.5e-3, 6.25e-4, 1.5625e-4]), 6)
        2.0
    """
    pts = sorted((math.log(s), math.log(e)) for s, e in zip(steps, errors)
                 if e is not None and math.isfinite(e) and e > floor and s > 0)
    keep = min(len(pts), max(3, (len(pts) + 1) // 2))
    pts = pts[len(pts) - keep:]
    if len(pts) < 2:
        return math.nan
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    return -sxy / sxx if sxx > 0 else math.nan


def theoretical_order(solver) -> int:
    """The global order a solver is built for: its ``order``, plus one for UniPC's corrector
    (Zhao et al. 2023, Theorem 3.3); a solver may state it itself as ``accuracy_order``."""
    stated = getattr(solver, "accuracy_order", None)
    if isinstance(stated, int):
        return stated
    order = solver.order
    if solver.opts.get("corrector") is True:
        order += 1
    return order


@dataclass
class OrderResult:
    label: str
    theory: int
    steps: list[int] = field(default_factory=list)
    nfes: list[int] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def fitted(self) -> float:
        return fitted_order(self.steps, self.errors)


def _configs() -> list[tuple[str, str, dict]]:
    out = []
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        if cls.stochastic:
            continue
        orders = list(cls.orders) if "order" in cls.options else [None]
        for order in orders:
            opts = {} if order is None else {"order": order}
            try:
                _solvers.get(name, **opts)
            except (ValueError, TypeError):
                break
            out.append((name if order is None else f"{name} o{order}", name, opts))
    return out


def measure_order(gm: Gaussian, noise: torch.Tensor, label: str, name: str, opts: dict,
                  nfes: Sequence[int], progress=None) -> OrderResult:
    """Errors at the last grid time for one solver at each NFE (log-SNR grid)."""
    sch = _targets.linear_schedule()
    model = gm.model(sch, prediction="eps", dtype=torch.float64)
    solver = _solvers.get(name, **opts)
    res = OrderResult(label, theoretical_order(solver))
    exact_cache: dict[float, torch.Tensor] = {}
    for nfe in nfes:
        if progress is not None:
            progress.update(1)
        if nfe < solver.min_nfe():
            continue
        last: dict = {}

        def keep_last(d):
            last.update(d)

        try:
            with torch.no_grad():
                _, info = sample(model, noise, solver=solver, nfe=nfe, grid="logsnr", callback=keep_last,
                                 return_info=True)
        except (SamplingError, ValueError) as e:
            res.note = f"NFE {nfe}: {e}"
            continue
        t_last = info.grid[-1]
        if t_last not in exact_cache:
            exact_cache[t_last] = gm.denoise(gm.reference(noise, sch, t_end=t_last), sch, t_last)
        x0 = last.get("x0")
        if x0 is None:
            res.note = "the callback gave no data prediction"
            continue
        err = float((x0.to(torch.float64) - exact_cache[t_last]).pow(2).mean().sqrt())
        res.steps.append(len(info.grid) - 1)
        res.nfes.append(nfe)  # the budget (a multi-evaluation solver may spend less)
        res.errors.append(err)
    return res


def merge_identical(results: Sequence[OrderResult]) -> list[OrderResult]:
    """One entry per distinct method: results with equal errors at every NFE (``dpm++ o1`` and
    ``ddim``) are shown once, their labels joined with ``=``."""
    out: list[OrderResult] = []
    for r in results:
        for m in out:
            if m.nfes == r.nfes and m.theory == r.theory and all(
                    a == b or abs(a - b) <= 1e-12 * max(abs(a), abs(b)) for a, b in zip(m.errors, r.errors)):
                m.label = f"{m.label} = {r.label}"
                break
        else:
            out.append(OrderResult(r.label, r.theory, list(r.steps), list(r.nfes), list(r.errors), r.note))
    return out


def plot(results: Sequence[OrderResult], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5.4), dpi=110)
    # one colour per solver family, one line style per order within it (as in the accuracy plots)
    palette = [plt.get_cmap("tab10")(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)] + ["navy", "olive"]
    styles = ["-", "--", "-.", ":", (0, (1, 1)), (0, (5, 1))]
    families: dict[str, int] = {}
    seen: dict[str, int] = {}
    for r in results:
        pts = [(s, e) for s, e in zip(r.steps, r.errors) if math.isfinite(e) and e > 0]
        if not pts:
            continue
        xs, ys = zip(*pts)
        family = r.label.split(" ")[0]
        colour = palette[families.setdefault(family, len(families)) % len(palette)]
        k = seen[family] = seen.get(family, -1) + 1
        ax.plot(xs, ys, linestyle=styles[k % len(styles)], marker="o", ms=3, lw=1.2, color=colour,
                label=f"{r.label} (fit {fmt(r.fitted)}, theory {r.theory})")
    # guide slopes through a common anchor
    all_steps = sorted({s for r in results for s in r.steps})
    if all_steps:
        s0, s1 = all_steps[0], all_steps[-1]
        for p in (1, 2, 3, 4):
            ax.plot([s0, s1], [1e-1, 1e-1 * (s0 / s1) ** p], ":", color="0.6", lw=0.8)
            ax.text(s1, 1e-1 * (s0 / s1) ** p, f" slope {p}", fontsize=7, color="0.4", va="center")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("steps (grid intervals, log-SNR grid)")
    ax.set_ylabel("RMSE of the data prediction at t_last")
    ax.set_title("empirical order on the Gaussian testbed")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def add_arguments(parser) -> None:
    parser.add_argument("--nfe", default=",".join(map(str, DEFAULT_NFES)), help="comma-separated NFE budgets")
    parser.add_argument("--samples", type=int, default=64, help="noise samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fixed noise")


def run(args) -> Report:
    from pathlib import Path

    from tqdm.auto import tqdm

    from .accuracy import _int_list

    nfes = _int_list(args.nfe)
    if args.samples < 1:
        raise ValueError(f"samples: expected a positive integer, got {args.samples}")
    gm = _targets.exact_testbed("gaussian")
    noise = _targets.fixed_noise(args.samples, (gm.dim,), args.seed)
    configs = _configs()
    results = []
    with tqdm(total=len(configs) * len(nfes), desc="order", unit="run", leave=False) as bar:
        for label, name, opts in configs:
            results.append(measure_order(gm, noise, label, name, opts, nfes, progress=bar))
    report = Report(title="fewstep bench order: empirical convergence orders")
    report.add(
        "Setup",
        f"Gaussian N(0.3, 0.5^2 I) in {gm.dim}-D, eps prediction, DiscreteVP linear betas, float64, "
        f"{args.samples} samples, log-SNR grid. Error: RMSE of the data prediction of the last evaluation "
        "against the exact one at the last grid time. Fit: slope over the finest half of the runs "
        f"(errors below {FLOOR:g} dropped). 'theory' is the solver's order (UniPC: order + 1 with its "
        "corrector).",
    )
    results = merge_identical(results)
    header = ["solver", "theory", "fitted", "fitted - theory"] + [f"NFE {n}" for n in nfes]
    rows = []
    for r in results:
        by_nfe = dict(zip(r.nfes, r.errors))
        cells = [fmt(by_nfe[n]) if n in by_nfe else "—" for n in nfes]
        diff = r.fitted - r.theory if math.isfinite(r.fitted) else math.nan
        rows.append([r.label, r.theory, fmt(r.fitted), fmt(diff)] + cells)
    report.add("Fitted orders (RMSE at t_last by NFE budget)", markdown_table(header, rows))
    notes = [f"- `{r.label}`: {r.note}" for r in results if r.note]
    if notes:
        report.add("Notes", "\n".join(notes))
    png = Path(args.out) / "order.png"
    plot(results, png)
    report.images.append(str(png))
    return report
