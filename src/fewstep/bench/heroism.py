"""HEROISM: empirical order, refinement sweeps, parallel depth under latency, and low-NFE accuracy.

Four parts (``--parts``, all by default):

* ``order`` – collocation mode with exact scores (a Gaussian and the ``gmm2d`` mixture, EDM
  schedule, log-SNR grid, ``N = K`` refinements): RMSE of the result against the exact data
  prediction at the last grid time, and the least-squares slope of ``-log(RMSE)`` against
  ``log(NFE)``; writes ``heroism-order.png``.
* ``refine`` – the error as refinement rounds are added (K = 3, fixed grid), Jacobi against
  Gauss–Seidel sweeps.
* ``parallel`` – a latency-bound network: every call sleeps a fixed time (5 ms) whatever its batch,
  as a GPU far from saturation does. Wall time against (network calls x latency): Jacobi sweeps batch
  the ``K - 1`` nodes of a round, so the wall time follows the sequential depth, not the NFE.
* ``lownfe`` – the default multistep mode against DPM-Solver++(3M) (and UniPC, DDIM, F-DDIM for
  context) at NFE 10–20 on the three mixtures, the same grid for every solver.

Example::

    fewstep bench heroism
    fewstep bench heroism --parts parallel --latency-ms 5
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from .. import schedules, testbeds
from ..sample import sample
from ..solvers import get as get_solver
from .report import Report, atomic_path, fmt, geomean, markdown_table

__all__ = ["add_arguments", "run", "order_runs", "LatencyBound", "PARTS", "SETTINGS"]

F64 = torch.float64
PARTS = ("order", "refine", "parallel", "lownfe")
#: low-NFE comparison settings: name -> (schedule factory, grid name, prediction type)
SETTINGS = {
    "edm-logsnr": (lambda: schedules.EDM(), "logsnr", "eps"),
    "edm-karras": (lambda: schedules.EDM(), "karras", "eps"),
    "discrete-logsnr": (lambda: schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000)), "logsnr", "eps"),
    "flow-logsnr": (lambda: schedules.RectifiedFlow(), "logsnr", "flow"),
}
LOW_NFE_SOLVERS = (
    ("heroism", "heroism", {}),
    ("dpm++ o3", "dpm++", {"order": 3}),
    ("unipc o3", "unipc", {"order": 3}),
    ("ddim", "ddim", {}),
    ("fv", "fv", {}),
)
ORDER_STEPS = {"gaussian": (8, 16, 32, 64), "gmm2d": (16, 32, 64, 128)}


def _noise(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def _slope(nfes, errors) -> float:
    pts = [(math.log(n), math.log(e)) for n, e in zip(nfes, errors) if e > 0 and math.isfinite(e)]
    if len(pts) < 2:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return -sum((p[0] - mx) * (p[1] - my) for p in pts) / sum((p[0] - mx) ** 2 for p in pts)


def _exact_at_end(tb, noise, sch):
    return tb.denoise(tb.reference(noise, sch, t_end=sch.t_min), sch, sch.t_min)


def _order_testbeds():
    return {"gaussian": testbeds.Gaussian(mean=0.3, std=0.5, dim=4), "gmm2d": testbeds.mixtures()["gmm2d"]}


# -------------------------------------------------------------------------------------- order
def order_runs(samples: int, seed: int, orders=(2, 3, 4)) -> list[dict]:
    """Collocation runs for the order table: one dict per (testbed, quantity, K)."""
    sch = schedules.EDM()
    out = []
    for name, tb in _order_testbeds().items():
        noise = _noise(samples, tb.dim, seed)
        target = _exact_at_end(tb, noise, sch)
        for quantity in ("x0", "score"):
            for k in orders:
                solver = get_solver("heroism", mode="collocation", order=k, quantity=quantity)
                nfes, errors = [], []
                for steps in ORDER_STEPS[name]:
                    x, info = sample(tb.model(sch, "eps"), noise, solver=solver, nfe=solver.nfe_for_points(steps + 1),
                                     return_info=True)
                    nfes.append(info.nfe)
                    errors.append(_rmse(x, target))
                out.append({"testbed": name, "quantity": quantity, "K": k, "steps": ORDER_STEPS[name],
                            "nfe": nfes, "rmse": errors, "slope": _slope(nfes, errors)})
    return out


def _order_plot(runs: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    names = sorted({r["testbed"] for r in runs}, key=lambda n: list(ORDER_STEPS).index(n))
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.3), dpi=110, squeeze=False)
    colors = {2: "tab:blue", 3: "tab:orange", 4: "tab:green", 5: "tab:red", 6: "tab:purple"}
    for ax, name in zip(axes[0], names):
        for r in (r for r in runs if r["testbed"] == name):
            style = "-o" if r["quantity"] == "x0" else "--s"
            ax.plot(r["nfe"], r["rmse"], style, ms=3.5, lw=1.3, color=colors.get(r["K"], "k"),
                    label=f"K={r['K']}, {r['quantity']} (slope {r['slope']:.2f})")
        n0, n1 = min(min(r["nfe"]) for r in runs if r["testbed"] == name), max(
            max(r["nfe"]) for r in runs if r["testbed"] == name)
        top = max(max(r["rmse"]) for r in runs if r["testbed"] == name)
        for p in (2, 3, 4):
            ax.plot([n0, n1], [top, top * (n0 / n1) ** p], ":", color="0.6", lw=0.8)
            ax.text(n1, top * (n0 / n1) ** p, f" {p}", fontsize=7, color="0.4", va="center")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # the decade labels only: minor ones overlap
        ax.set_xlabel("NFE (collocation, N = K refinements)")
        ax.set_ylabel("RMSE of the data prediction at t_min")
        ax.set_title(f"HEROISM order, {name} (EDM, log-SNR grid)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _order_part(report: Report, args) -> None:
    runs = order_runs(args.samples_order, args.seed)
    steps_cols = sorted({s for r in runs for s in r["steps"]})
    header = ["testbed", "quantity", "K", "fitted slope"] + [f"M={s}" for s in steps_cols]
    rows = []
    for r in runs:
        by = dict(zip(r["steps"], r["rmse"]))
        rows.append([r["testbed"], r["quantity"], r["K"], fmt(r["slope"])]
                    + [fmt(by[s]) if s in by else "—" for s in steps_cols])
    report.add(
        "Empirical order (collocation, N = K refinements)",
        f"Exact scores, EDM schedule, log-SNR grid of M steps, {args.samples_order} samples; RMSE of the "
        "result (the data prediction at t_min) against the exact one; slope: least squares of "
        "-log(RMSE) against log(NFE), NFE = (M + 1) + M K (K - 1).\n\n" + markdown_table(header, rows),
    )
    png = Path(args.out) / "heroism-order.png"
    _order_plot(runs, png)
    report.images.append(str(png))


# ------------------------------------------------------------------------------------- refine
def _refine_part(report: Report, args) -> None:
    sch = schedules.EDM()
    tb = testbeds.mixtures()["gmm2d"]
    noise = _noise(args.samples_order, tb.dim, args.seed)
    target = _exact_at_end(tb, noise, sch)
    grid = None
    rows = []
    for n in range(0, 6):
        row = [n]
        for sweep in ("jacobi", "gauss-seidel"):
            solver = get_solver("heroism", mode="collocation", order=3, refinements=n, sweep=sweep)
            nfe = solver.nfe_for_points(33)
            x, info = sample(tb.model(sch, "eps"), noise, solver=solver, nfe=nfe, return_info=True)
            if sweep == "jacobi":
                row += [info.nfe, info.calls]
            row.append(fmt(_rmse(x, target)))
            grid = info.grid
        rows.append(row)
    report.add(
        "Refinement rounds (K = 3, gmm2d, M = 32 steps)",
        f"Each round re-evaluates the K - 1 = 2 non-initial nodes of every step. Round 0 is the "
        f"first-order guess (DDIM at every node). EDM, log-SNR grid of {len(grid)} points.\n\n"
        + markdown_table(["N", "NFE", "calls (Jacobi)", "RMSE Jacobi", "RMSE Gauss-Seidel"], rows),
    )


# ----------------------------------------------------------------------------------- parallel
class LatencyBound:
    """Wrap a network so that every call takes ``latency`` seconds, whatever the batch.

    Models an accelerator far from saturation: the time of a call does not grow with its batch,
    so several nodes evaluated in one call cost one latency. ``late`` adds up how far past its
    deadline each call returned (the host woke up late): on a busy machine that is time the solver
    does not control.
    """

    #: the last part of the wait, in seconds, spent spinning instead of sleeping
    SPIN = 1e-3

    def __init__(self, net, latency: float):
        self.net = net
        self.latency = latency
        self.calls = 0
        self.late = 0.0

    def __call__(self, x, t, **cond):
        deadline = time.perf_counter() + self.latency
        out = self.net(x, t, **cond)
        self.calls += 1
        # sleep most of the wait, then spin: a sleeping process may wake up late
        left = deadline - time.perf_counter() - self.SPIN
        if left > 0:
            time.sleep(left)
        while time.perf_counter() < deadline:
            pass
        self.late += time.perf_counter() - deadline
        return out


def _load() -> str:
    try:
        return ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - platforms without getloadavg
        return "unknown"


def _parallel_part(report: Report, args) -> None:
    latency = args.latency_ms / 1000.0
    sch = schedules.EDM()
    tb = testbeds.Gaussian(mean=0.3, std=0.5, dim=16)
    noise = _noise(64, tb.dim, args.seed)
    configs = [
        ("collocation K=3 N=3 jacobi", dict(mode="collocation", order=3, sweep="jacobi"), 8),
        ("collocation K=3 N=3 gauss-seidel", dict(mode="collocation", order=3, sweep="gauss-seidel"), 8),
        ("collocation K=4 N=4 jacobi", dict(mode="collocation", order=4, sweep="jacobi"), 8),
        ("collocation K=4 N=4 gauss-seidel", dict(mode="collocation", order=4, sweep="gauss-seidel"), 8),
        ("multistep K=3 N=1", dict(), 20),
    ]
    rows, ratios = [], []
    for label, opts, steps in configs:
        solver = get_solver("heroism", **opts)
        model = tb.model(sch, "eps")
        device = LatencyBound(model.net, latency)
        model.net = device
        nfe = solver.nfe_for_points(steps + 1)
        sample(model, noise, solver=solver, nfe=nfe)  # warm-up (imports, allocator)
        best, late = math.inf, 0.0
        for _ in range(args.repeats):
            device.late = 0.0
            start = time.perf_counter()
            _, info = sample(model, noise, solver=solver, nfe=nfe, return_info=True)
            wall = time.perf_counter() - start
            if wall < best:
                best, late = wall, device.late
        depth_time = info.calls * latency
        ratios.append(best / depth_time)
        rows.append([label, info.nfe, info.calls, f"{best * 1e3:.1f}", f"{depth_time * 1e3:.1f}",
                     f"{info.nfe * latency * 1e3:.1f}", f"{best / depth_time:.3f}", f"{late * 1e3:.1f}",
                     f"{(best - late) / depth_time:.3f}"])
    report.add(
        f"Parallel depth under a latency-bound network ({args.latency_ms:g} ms per call)",
        f"Gaussian in {tb.dim}-D, 64 samples, EDM, log-SNR grid; wall time of the whole `fewstep.sample` "
        f"call (best of {args.repeats}). depth x latency = network calls x {args.latency_ms:g} ms; "
        "NFE x latency is what evaluating every node in its own call would cost. 'late' is the time the "
        "simulated device returned after its deadline (the host process woke up late), and the last "
        "column leaves it out.\n\n"
        + markdown_table(["mode", "NFE", "calls (depth)", "wall ms", "depth x latency ms", "NFE x latency ms",
                          "wall / (depth x latency)", "late ms", "(wall - late) / (depth x latency)"], rows)
        + f"\n\nLargest wall / (depth x latency): {max(ratios):.3f} (required: at most 1.3). "
        f"Machine load average during the run: {_load()} on {os.cpu_count()} cores.",
    )


def _lownfe_part(report: Report, args) -> None:
    nfes = [int(v) for v in args.nfe.split(",")]
    mixtures = testbeds.mixtures()
    summary = []
    for setting in [s.strip() for s in args.settings.split(",") if s.strip()]:
        if setting not in SETTINGS:
            raise ValueError(f"settings: unknown {setting!r}; valid: {sorted(SETTINGS)}")
        make_schedule, grid, prediction = SETTINGS[setting]
        sch = make_schedule()
        rows = []
        for name, gm in mixtures.items():
            noise = _noise(args.samples, gm.dim, args.seed + 2)
            target = _exact_at_end(gm, noise, sch)
            errors = {}
            for label, solver, opts in LOW_NFE_SOLVERS:
                errs = []
                for nfe in nfes:
                    x, info = sample(gm.model(sch, prediction), noise, solver=solver, nfe=nfe, grid=grid,
                                     return_info=True, **opts)
                    if info.nfe != nfe:
                        raise AssertionError(f"{label} spent {info.nfe} evaluations for nfe={nfe}")
                    errs.append(_rmse(x, target))
                errors[label] = errs
            base = geomean(errors["dpm++ o3"])
            for label, errs in errors.items():
                rows.append([name, label] + [fmt(e) for e in errs] + [fmt(geomean(errs) / base)])
            summary.append([setting, name, fmt(geomean(errors["heroism"]) / base)])
        report.add(
            f"Low NFE: {setting} ({grid} grid, {prediction} prediction)",
            f"RMSE against the exact data prediction at the last grid time, {args.samples} samples, "
            "every solver on the same grid for each NFE. Last column: geometric mean over the NFE, "
            "relative to DPM-Solver++(3M).\n\n"
            + markdown_table(["mixture", "solver"] + [f"NFE {n}" for n in nfes] + ["geomean / dpm++ o3"], rows),
        )
    report.add("Low NFE summary: heroism (multistep, K = 3, N = 1) / dpm++ o3",
               markdown_table(["setting", "mixture", "geomean ratio"], summary))


def add_arguments(parser) -> None:
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {list(PARTS)}")
    parser.add_argument("--samples-order", type=int, default=16, help="noise samples for the order and refine parts")
    parser.add_argument("--samples", type=int, default=256, help="noise samples for the low-NFE part")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"low-NFE settings, from {list(SETTINGS)}")
    parser.add_argument("--nfe", default="10,12,15,20", help="low-NFE budgets")
    parser.add_argument("--latency-ms", type=float, default=5.0, help="latency of one network call (parallel part)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (parallel part; the best is kept)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fixed noise")


def run(args) -> Report:
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"parts: unknown {unknown}; valid: {list(PARTS)}")
    for key in ("samples_order", "samples", "repeats"):
        if getattr(args, key) < 1:
            raise ValueError(f"{key.replace('_', '-')}: expected a positive integer, got {getattr(args, key)}")
    if not args.latency_ms > 0:
        raise ValueError(f"latency-ms: expected a positive number, got {args.latency_ms}")
    torch.set_num_threads(1)
    report = Report(title="fewstep bench heroism: order, refinement, parallel depth, low NFE")
    with torch.no_grad():
        if "order" in parts:
            _order_part(report, args)
        if "refine" in parts:
            _refine_part(report, args)
        if "parallel" in parts:
            _parallel_part(report, args)
        if "lownfe" in parts:
            _lownfe_part(report, args)
    return report
