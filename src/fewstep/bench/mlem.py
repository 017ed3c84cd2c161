"""ML-EM: distribution error against FLOPs, multilevel Euler–Maruyama vs the finest model alone.

For a family of models (cheapest first) the benchmark measures:

* each member's FLOPs per call (``FlopCounterMode``) and the family's ``gamma`` (error ∝ cost^(-1/gamma)),
  fitted on the pilot's level differences (:func:`fewstep.multilevel.level_errors`, eps view);
* Euler–Maruyama with the finest model alone (and with each coarser member, for context) at several
  step counts, and ML-EM (``solver="mlem"``) at the same step counts and several FLOP budgets, all
  from the same initial noise and the same Brownian increments (``generator`` seeds);
* the distribution error of each sample set (``digits16``: FD-digits and MMD to the held-out digits;
  testbeds: sliced W2 and MMD to exact draws), FLOPs per sample (realised, counted per network call
  and sample) and wall time per sample;
* the FLOP ratio at equal error: for each ML-EM point, the FLOPs Euler–Maruyama with the finest model
  needs for the same error, interpolated log-log on its measured curve (made monotone by a running
  minimum), and the ratio of the two.

The pilot that sets the probabilities (``fewstep.multilevel.calibrate``) runs once per step count on
a separate noise batch; its cost is reported and not included in the curves (it is amortised over all
later batches, as the probabilities are reusable).

Families: ``digits16`` (the zoo's ``digits16-s/-m/-l``, class-conditional, labels cycling 0-9), a
comma-separated list of zoo names or ``.safetensors`` paths, or a testbed (``gmm2d``, ``gmm16``,
``gmm64``: the exact model with data-prediction errors 0.3, 0.17, 0.1 from
:func:`fewstep.testbeds.perturbed`, nominal costs 1 : 4 : 16 since the testbeds count no FLOPs, so a
nominal gamma of 2.5, the paper's measured value).

Example::

    fewstep bench mlem                                     # digits16 family, 500 samples
    fewstep bench mlem --family gmm16 --steps 10,12,14,16,20,40 --mlem-steps 20,40,80,160 --budgets 0.15,0.3
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import multilevel, testbeds
from ..sample import sample
from .report import Report, atomic_path, fmt, markdown_table

__all__ = ["add_arguments", "run", "equal_error_flops", "FamilySetup", "build_family"]

F64 = torch.float64
TESTBED_ERRORS = (0.3, 0.17, 0.1)  # x4 cost per level, error / 4^(1/2.5): nominal gamma 2.5 (the paper's)
TESTBED_COSTS = (1.0, 4.0, 16.0)
DIGITS_FAMILY = ("digits16-s", "digits16-m", "digits16-l")


# ------------------------------------------------------------------------------------------ family
@dataclass
class FamilySetup:
    """A family ready to sample: models (conditioned), costs, noise, and an error scorer."""

    name: str
    names: list[str]
    models: list
    costs: list[float]
    cost_note: str
    noise: torch.Tensor
    pilot_noise: torch.Tensor
    metrics: tuple[str, ...]
    score: Callable[[torch.Tensor], dict]
    notes: list[str] = field(default_factory=list)
    parameters: list[int | None] = field(default_factory=list)
    floor: Callable[[], "Floor"] | None = None  # the metrics on real data: their floor and noise


@dataclass
class Floor:
    """The error metrics of real data (several independent sets of the same size): mean and spread."""

    what: str
    mean: dict
    sd: dict


def _floor(what: str, sets) -> Floor:
    scores = list(sets)
    keys = scores[0].keys()
    mean = {k: sum(s[k] for s in scores) / len(scores) for k in keys}
    sd = {k: math.sqrt(sum((s[k] - mean[k]) ** 2 for s in scores) / (len(scores) - 1)) for k in keys}
    return Floor(what, mean, sd)


FLOOR_SETS = 5


def _parse_list(text: str, kind, name: str):
    try:
        vals = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name}: expected comma-separated numbers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise ValueError(f"--{name}: expected positive numbers, got {text!r}")
    return vals


def build_family(spec: str, samples: int, seed: int, guidance: float = 1.0) -> FamilySetup:
    """``digits16``, a testbed name, or comma-separated zoo names/paths (cheapest first)."""
    from ..bench.distribution import MMDTo, sliced_w2

    gen = torch.Generator().manual_seed(seed)
    if spec in testbeds.mixtures():
        from .targets import linear_schedule

        gm = testbeds.mixtures()[spec]
        sch = linear_schedule()
        models = [gm.model(sch, error=testbeds.perturbed(gm, d, seed=s)) for s, d in enumerate(TESTBED_ERRORS)]
        data = gm.sample_data(4096, torch.Generator().manual_seed(seed + 101))
        mmd = MMDTo(data)

        def score(x):
            return {"sw2": sliced_w2(x, data, projections=256), "mmd": mmd(x)}

        noise = torch.randn(samples, gm.dim, dtype=F64, generator=gen)
        pilot = torch.randn(samples, gm.dim, dtype=F64, generator=gen)
        names = [f"{spec}+error {d}" for d in TESTBED_ERRORS]

        def floor():
            return _floor(f"{samples} independent exact draws, mean ± sd of {FLOOR_SETS} sets",
                          (score(gm.sample_data(samples, torch.Generator().manual_seed(seed + 202 + r)))
                           for r in range(FLOOR_SETS)))

        return FamilySetup(spec, names, models, list(TESTBED_COSTS),
                           "nominal 1:4:16 (testbeds have no network FLOPs)", noise, pilot, ("sw2", "mmd"), score,
                           notes=[f"error metrics: sliced W2 (256 directions) and MMD^2 to 4096 exact draws of {spec}"],
                           parameters=[None] * 3, floor=floor)

    from .. import zoo
    from ..zoo import classifier as zc
    from ..zoo import data as zd

    members = list(DIGITS_FAMILY) if spec == "digits16" else [s.strip() for s in spec.split(",") if s.strip()]
    if len(members) < 2:
        raise ValueError(f"--family: expected 'digits16', a testbed {sorted(testbeds.mixtures())}, or at least two "
                         f"comma-separated zoo names/paths, got {spec!r}")
    raw = [zoo.load(m) for m in members]
    shape = raw[0].sample_shape
    labels = torch.arange(samples) % 10
    models = [zoo.conditioned(m, labels, guidance) for m in raw]
    costs = multilevel.family_flops(models)
    clf = zoo.load("digits-classifier")
    heldout = zd.digits16("heldout").images
    mmd = MMDTo(heldout)

    def score(x):
        x = x.float().clamp(-1, 1)
        return {"fd": zc.fd_digits(x, heldout, clf), "mmd": mmd(x)}

    noise = torch.randn(samples, *shape, generator=gen)
    pilot = torch.randn(samples, *shape, generator=gen)
    train = zd.digits16("train").images

    def floor():
        # random subsets: the digits are stored grouped by writer, so the first ones are not typical
        n = min(samples, train.shape[0])
        picks = (torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed + 303 + r))[:n]
                 for r in range(FLOOR_SETS))
        return _floor(f"{n} random training digits, mean ± sd of {FLOOR_SETS} sets", (score(train[p]) for p in picks))

    return FamilySetup(spec, [m.name for m in raw], models, costs,
                       "measured with FlopCounterMode (guided calls count both halves)", noise, pilot, ("fd", "mmd"),
                       score, notes=[
                           f"labels cycle 0-9, guidance {guidance:g}; FD-digits and MMD^2 (pixels, median bandwidth) "
                           f"to the {heldout.shape[0]} held-out digits; FD-digits has a sample-size bias "
                           f"(training digits vs held-out: see the floor row)"],
                       parameters=[int(sum(p.numel() for p in m.net.parameters())) for m in raw], floor=floor)


# -------------------------------------------------------------------------------- equal-error cost
PLATEAU_MARGIN = 1.25


def equal_error_flops(curve: list[tuple[float, float]], error: float, margin: float = PLATEAU_MARGIN,
                      resolution: float = 0.0) -> float | None:
    """FLOPs the reference method needs for ``error``: log-log interpolation on its ``(flops, error)``
    points, made monotone by a running minimum of the error. ``None`` when ``error`` lies outside the
    measured range: above the cheapest point's error, below ``margin`` times the best error (on the
    reference's plateau, where sampling noise decides which step count reaches an error first), or
    below ``resolution`` (the metric's own noise level, e.g. its value on real data).

    Example::

        >>> round(equal_error_flops([(100.0, 0.4), (400.0, 0.1), (800.0, 0.05)], 0.2), 6)
        200.0
    """
    pts = sorted((f, e) for f, e in curve if f > 0 and e > 0 and math.isfinite(e))
    env = []
    for f, e in pts:
        best = min(e, env[-1][1]) if env else e
        env.append((f, best))
    if not env or error > env[0][1] or error < max(margin * env[-1][1], resolution):
        return None
    for (f0, e0), (f1, e1) in zip(env, env[1:]):
        if e1 <= error <= e0:
            if e0 == e1:
                return f0
            u = (math.log(error) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return math.exp(math.log(f0) + u * (math.log(f1) - math.log(f0)))
    return env[0][0]


# ---------------------------------------------------------------------------------------- arguments
def add_arguments(parser) -> None:
    parser.add_argument("--family", default="digits16",
                        help="digits16 (zoo digits16-s/-m/-l), gmm2d|gmm16|gmm64 (testbed family), or zoo names/paths")
    parser.add_argument("--samples", type=int, default=None, help="samples per set (default 500 digits, 2048 testbed)")
    parser.add_argument("--steps", default="8,9,10,11,12,14,16,20,30,40",
                        help="step counts of Euler–Maruyama with each member alone")
    parser.add_argument("--mlem-steps", default="12,16,20,30,40,80", help="step counts of ML-EM")
    parser.add_argument("--budgets", default="0.15,0.2,0.25,0.35",
                        help="ML-EM expected FLOPs as fractions of the finest model alone on the same steps")
    parser.add_argument("--form", default="sde", choices=["sde", "ode", "ddpm"],
                        help="base update (sde = Euler–Maruyama)")
    parser.add_argument("--pattern", default="per_sample", choices=["per_sample", "shared"],
                        help="level draws per sample, or one per step for the whole batch")
    parser.add_argument("--draws", default="systematic", choices=["independent", "systematic"],
                        help="systematic along time (default) or independent per step (the paper's)")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance (zoo families)")
    parser.add_argument("--pilot-samples", type=int, default=64)
    parser.add_argument("--pilot-points", type=int, default=8)
    parser.add_argument("--no-levels", action="store_true", help="skip Euler–Maruyama with the coarser members alone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot", default="mlem.png", help="file name of the plot inside --out")


@dataclass
class Row:
    method: str
    steps: int
    budget: float | None
    flops: float  # per sample, realised
    finest_calls: float  # per sample
    seconds: float  # wall time per sample
    errors: dict
    expected: float | None = None


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(args) -> Report:
    torch.set_num_threads(max(1, int(args.threads)))
    steps = [int(s) for s in _parse_list(args.steps, int, "steps")]
    ml_steps = [int(s) for s in _parse_list(args.mlem_steps, int, "mlem-steps")] if args.mlem_steps else steps
    budgets = _parse_list(args.budgets, float, "budgets")
    samples = args.samples or (2048 if args.family in testbeds.mixtures() else 500)
    fam = build_family(args.family, samples, args.seed, args.guidance)
    k = len(fam.models)
    finest = fam.models[-1]
    rows: list[Row] = []

    def em(level: int, n: int) -> Row:
        x, secs = _timed(lambda: sample(fam.models[level], fam.noise, solver=args.form_base, nfe=n,
                                        generator=torch.Generator().manual_seed(args.seed + 7)))
        calls = n if level == k - 1 else 0
        return Row(f"{_base_name(args.form)} {fam.names[level]}", n, None, n * fam.costs[level], calls,
                   secs / samples, fam.score(x))

    args.form_base = {"sde": "em", "ode": "ddim", "ddpm": "ddpm"}[args.form]
    for n in steps:
        rows.append(em(k - 1, n))
    if not args.no_levels:
        for level in range(k - 1):
            for n in steps:
                rows.append(em(level, n))

    pilots = {}
    for n in ml_steps:
        cal = multilevel.calibrate(fam.models, fam.pilot_noise, nfe=n, form=args.form, costs=fam.costs,
                                   budget=budgets[0], points=args.pilot_points, samples=args.pilot_samples)
        pilots[n] = cal
        for b in budgets:
            table = cal.with_budget(b)
            stats = multilevel.MLEMStats()
            x, secs = _timed(lambda: sample(finest, fam.noise, solver="mlem", family=fam.models, costs=fam.costs,
                                            nfe=n, form=args.form, pattern=args.pattern, draws=args.draws,
                                            probabilities=table.probabilities, seed=args.seed + 11, stats=stats,
                                            generator=torch.Generator().manual_seed(args.seed + 7)))
            rows.append(Row("ML-EM", n, b, stats.flops / samples, stats.rows[-1] / samples, secs / samples,
                            fam.score(x), expected=table.expected_flops))

    floor = fam.floor() if fam.floor is not None else None
    report = Report(f"ML-EM on {fam.name}: error against FLOPs")
    report.add("Family", _family_section(fam, pilots[max(ml_steps)]))
    report.add("Runs", _runs_section(fam, rows, samples, args, floor))
    report.add("Equal-error FLOPs", _equal_error_section(fam, rows, floor))
    pilot = pilots[max(ml_steps)]
    report.add("Pilot", _pilot_section(fam, pilot, args))
    if args.plot:
        path = Path(args.out if getattr(args, "out", None) else ".") / args.plot
        try:
            _plot(fam, rows, floor, path)
            report.images.append(str(path))
        except ImportError as e:  # pragma: no cover - matplotlib is a dev dependency
            report.add("Plot", f"not drawn: {e}")
    return report


def _base_name(form: str) -> str:
    return {"sde": "EM", "ode": "DDIM", "ddpm": "DDPM"}[form]


# ------------------------------------------------------------------------------------------ report
def _family_section(fam: FamilySetup, cal) -> str:
    head = ["level", "model", "parameters", "FLOPs/call", "relative"]
    body = [[j + 1, fam.names[j], fam.parameters[j] if fam.parameters[j] is not None else "-", fam.costs[j],
             fam.costs[j] / fam.costs[0]] for j in range(len(fam.models))]
    errs = multilevel.level_errors(cal.variances.eps_mean_square())
    lines = [markdown_table(head, body), "",
             f"Costs: {fam.cost_note}.", "",
             "Level error proxy (eps view, root mean square over the pilot's nodes of f_(l+1) - f_l): "
             + ", ".join(f"level {j + 1}: {fmt(e)}" for j, e in enumerate(errs)), ""]
    if len(errs) >= 2:
        fit = multilevel.estimate_gamma(fam.costs[:-1], errs)
        regime = "harder than Monte Carlo, gamma > 2" if fit.gamma > 2 else "not in the HTMC regime, gamma <= 2"
        lines.append(f"gamma (error ∝ cost^(-1/gamma), {fit.points} points): **{fmt(fit.gamma)}** ({regime}).")
    else:
        lines.append("gamma: needs at least 3 levels (two level differences) to fit.")
    return "\n".join(lines + [""] + fam.notes)


def _runs_section(fam, rows, samples, args, floor) -> str:
    head = (["method", "steps", "budget", "FLOPs/sample", "x finest alone", "finest calls/sample"]
            + list(fam.metrics) + ["wall ms/sample"])
    body = []
    for r in rows:
        same_steps = r.steps * fam.costs[-1]
        body.append([r.method, r.steps, "-" if r.budget is None else r.budget, r.flops, r.flops / same_steps,
                     r.finest_calls] + [r.errors[m] for m in fam.metrics] + [1e3 * r.seconds])
    note = (f"{samples} samples per set, form={args.form!r}, pattern={args.pattern!r}, draws={args.draws!r}, "
            f"seed {args.seed}; the same "
            f"initial noise and Brownian increments for every row. FLOPs/sample are realised (per network call and "
            f"sample); 'x finest alone' divides by the finest model alone on the same steps. Wall time: one thread, "
            f"{args.threads} torch thread(s), on a shared machine.")
    if floor is not None:
        body.append([f"floor: {floor.what}", "-", "-", "-", "-", "-"]
                    + [f"{fmt(floor.mean[m])} ± {fmt(floor.sd[m])}" for m in fam.metrics] + ["-"])
    return markdown_table(head, body) + "\n\n" + note


def _noise_band(floor, best: float, metric: str) -> float:
    """Errors below this cannot be told apart from the finest model's best: at least ``PLATEAU_MARGIN``
    times its best error, its best plus two standard deviations of the metric on real data of the same
    size, and the metric's magnitude on real data (MMD^2 is unbiased and scatters around 0)."""
    band = best + (PLATEAU_MARGIN - 1.0) * abs(best)
    if floor is None:
        return band
    return max(band, best + 2.0 * floor.sd[metric], abs(floor.mean[metric]))


def _equal_error_section(fam, rows, floor) -> str:
    base = [r for r in rows if r.budget is None and r.method.endswith(fam.names[-1])]
    mlem_rows = [r for r in rows if r.budget is not None]
    head = ["steps", "budget", "ML-EM FLOPs/sample"]
    for m in fam.metrics:
        head += [m, "finest-alone FLOPs", "ratio"]
    body = []
    ratios: dict[str, list] = {m: [] for m in fam.metrics}
    bands = {m: _noise_band(floor, min(b.errors[m] for b in base), m) for m in fam.metrics}
    for r in mlem_rows:
        line = [r.steps, r.budget, r.flops]
        for m in fam.metrics:
            curve = [(b.flops, b.errors[m]) for b in base]
            need = equal_error_flops(curve, r.errors[m], resolution=bands[m])
            ratio = None if need is None else r.flops / need
            if ratio is not None:
                ratios[m].append((ratio, r))
            line += [r.errors[m], "-" if need is None else need, "-" if ratio is None else ratio]
        body.append(line)
    lines = ["**Above the noise band** (the part of the curves where errors can be told apart):", "",
             markdown_table(head, body), ""]
    for m in fam.metrics:
        if ratios[m]:
            best, r = min(ratios[m], key=lambda t: t[0])
            med = sorted(t[0] for t in ratios[m])[len(ratios[m]) // 2]
            lines.append(f"* {m}: best ratio **{fmt(best)}** (ML-EM {r.steps} steps, budget {r.budget}); median over "
                         f"the {len(ratios[m])} comparable points {fmt(med)}.")
        else:
            lines.append(f"* {m}: no ML-EM point falls above the noise band and inside the finest model's curve.")
    lines += ["",
              "ratio = ML-EM FLOPs / FLOPs that Euler–Maruyama with the finest model alone needs for the same error "
              "(below 1: ML-EM is cheaper), interpolated log-log between its measured step counts after a running "
              "minimum. '-': the error is above that curve's cheapest point, or inside the noise band.", "",
              "**Reaching the noise band** (the finest model's converged quality, within the metric's noise): the "
              "fewest FLOPs per sample among the measured points whose error is inside the band.", ""]
    budgets = sorted({r.budget for r in mlem_rows})
    head2 = ["metric", "band (<=)", "finest alone"] + [f"ML-EM budget {b:g}" for b in budgets]
    body2 = []
    for m in fam.metrics:
        def first(rs):
            inside = [r.flops for r in rs if r.errors[m] <= bands[m]]
            return min(inside) if inside else None

        ref = first(base)
        line = [m, bands[m], "not reached" if ref is None else f"{fmt(ref)}"]
        for b in budgets:
            got = first([r for r in mlem_rows if r.budget == b])
            if got is None:
                line.append("not reached")
            else:
                line.append(f"{fmt(got)}" + ("" if ref is None else f" ({fmt(got / ref)}x)"))
        body2.append(line)
    lines += [markdown_table(head2, body2), "",
              f"The band is the largest of: {PLATEAU_MARGIN:g}x the finest model's best error, that error plus two "
              "standard deviations of the metric on real data of the same size (the floor row), and the floor's "
              "magnitude."]
    return "\n".join(lines)


def _pilot_section(fam, cal, args) -> str:
    lv = cal.variances
    head = ["node t"] + [f"V_{j + 1} (x0 view)" for j in range(len(fam.models))]
    body = [[t] + row for t, row in zip(lv.times, lv.mean_square)]
    return (markdown_table(head, body) + "\n\n"
            f"Pilot: {lv.samples} samples x {len(lv.indices)} nodes x all levels = {fmt(cal.pilot_flops * lv.samples)} "
            f"FLOPs per step count (not in the curves; the probabilities are reused for every batch). "
            f"Probabilities at the largest step count and the first budget, every 8th step: "
            + "; ".join("(" + ", ".join(f"{p:.3g}" for p in row) + ")" for row in cal.probabilities[::8]))


def _plot(fam, rows, floor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = fam.metrics
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.4 * len(metrics), 4.8), dpi=110, squeeze=False)
    groups: dict[str, list[Row]] = {}
    for r in rows:
        label = r.method if r.budget is None else f"ML-EM, budget {r.budget:g}"
        groups.setdefault(label, []).append(r)
    cmap = plt.get_cmap("tab10")
    names = {"fd": "FD-digits to held-out digits", "sw2": "sliced W2 to exact data", "mmd": "MMD^2 to the data"}
    for ax, metric in zip(axes[0], metrics):
        for i, (label, rs) in enumerate(groups.items()):
            rs = sorted(rs, key=lambda r: r.flops)
            xs = [r.flops for r in rs]
            ys = [r.errors[metric] for r in rs]
            finest = label.endswith(fam.names[-1])
            style = dict(lw=2.4, ms=6, marker="o", color="black") if finest else \
                dict(lw=1.6, ms=5, marker="s" if label.startswith("ML-EM") else "^",
                     ls="-" if label.startswith("ML-EM") else ":", color=cmap(i % 10))
            ax.plot(xs, ys, label=label, **style)
            for r in rs:
                ax.annotate(str(r.steps), (r.flops, r.errors[metric]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points", color=style["color"])
        if floor is not None:
            lo, hi = floor.mean[metric] - 2 * floor.sd[metric], floor.mean[metric] + 2 * floor.sd[metric]
            ax.axhspan(lo, hi, color="grey", alpha=0.2, label=f"real data ± 2 sd ({floor.what})")
        noise = abs(floor.mean[metric]) + 2 * floor.sd[metric] if floor is not None else 1e-6
        ax.set_xscale("log")
        if metric == "mmd":  # unbiased MMD^2 scatters around 0: linear inside the noise, log above it
            ax.set_yscale("symlog", linthresh=max(noise, 1e-6))
            ax.set_ylim(bottom=-noise)
        else:
            ax.set_yscale("log")
        ax.set_xlabel("FLOPs per sample (realised)")
        ax.set_ylabel(names.get(metric, metric))
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"ML-EM vs single-model Euler–Maruyama on {fam.name} (point labels: steps)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
