"""Distribution: how close stochastic samplers' samples are to the data, in sliced W2 and MMD.

Stochastic samplers do not follow one trajectory, so they are scored on distributions: 4096 samples
against 4096 exact draws of the target, on the Gaussian-mixture testbeds (diffusers' linear betas,
eps prediction, float64), at NFE 10, 20 and 50. Rows: every registered stochastic fewstep solver
(``cls.stochastic``) at its defaults, diffusers' ``SASolverScheduler`` at its default ``tau``, and,
for scale, the deterministic ``fewstep default``. The *floor* row scores a second independent exact
draw: no sampler can be told apart from the data below it.

Metrics (reusable: :func:`sliced_w2`, :func:`mmd`, :func:`median_bandwidth`):

* sliced Wasserstein-2: the root mean of squared 1-D W2 distances over random unit directions,
  each computed exactly from the sorted projections;
* MMD^2 (unbiased) with a Gaussian kernel whose bandwidth is the median pairwise distance (the
  median heuristic) of the exact data, one kernel per target so the rows compare;
* FD-digits (Fréchet distance of classifier features, ``fewstep.zoo.classifier``) on ``digits16``
  when the zoo provides the model and its classifier.

Example::

    fewstep bench distribution
    fewstep bench distribution --target gmm2d --nfe 10,20 --samples 2048
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .. import solvers as _solvers
from ..sample import SamplingError, sample
from ..solvers.base import REGISTRY
from . import targets as _targets
from .report import Report, fmt, markdown_table

__all__ = ["sliced_w2", "mmd", "MMDTo", "median_bandwidth", "w2_1d", "stochastic_solvers", "add_arguments", "run"]

F64 = torch.float64
DEFAULT_NFES = (10, 20, 50)


# ------------------------------------------------------------------------------------------ metrics
def w2_1d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact squared W2 between the empirical measures of the columns of ``a`` ``(n, L)`` and ``b`` ``(m, L)``.

    ``W2^2 = int_0^1 (F_a^{-1}(u) - F_b^{-1}(u))^2 du``; both quantile functions are step functions,
    so the integral is an exact sum over the merged breakpoints ``k/n`` and ``k/m``. Returns ``(L,)``.
    """
    n, m = a.shape[0], b.shape[0]
    sa, _ = torch.sort(a, dim=0)
    sb, _ = torch.sort(b, dim=0)
    if n == m:
        return (sa - sb).pow(2).mean(0)
    cuts = torch.unique(torch.cat([torch.arange(1, n + 1, dtype=F64) / n, torch.arange(1, m + 1, dtype=F64) / m]))
    widths = torch.diff(torch.cat([torch.zeros(1, dtype=F64), cuts]))
    mids = cuts - 0.5 * widths
    ia = torch.clamp((mids * n).floor().long(), 0, n - 1)
    ib = torch.clamp((mids * m).floor().long(), 0, m - 1)
    return ((sa[ia] - sb[ib]).pow(2) * widths[:, None].to(sa.dtype)).sum(0)


def sliced_w2(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between sample sets ``a`` ``(n, ...)`` and ``b`` ``(m, ...)``.

    ``SW2 = sqrt(mean_theta W2^2(theta . a, theta . b))`` over ``projections`` directions drawn
    uniformly on the unit sphere from ``seed`` (the same directions for every call with that seed,
    so rows of a table are compared on equal terms). Two sets shifted by a vector ``c`` in ``R^d``
    have ``SW2 = |c| / sqrt(d)``.

    Example::

        >>> import torch
        >>> x = torch.randn(1000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> sliced_w2(x, x)
        0.0
        >>> shifted = x + torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
        >>> abs(sliced_w2(x, shifted, projections=4096) - 3 / 3 ** 0.5) < 0.03
        True
    """
    a = _flat(a, "a")
    b = _flat(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a, b: sample dimensions differ ({a.shape[1]} vs {b.shape[1]})")
    if not isinstance(projections, int) or projections < 1:
        raise ValueError(f"projections: expected a positive integer, got {projections!r}")
    d = a.shape[1]
    theta = torch.randn(d, projections, generator=torch.Generator().manual_seed(seed), dtype=F64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    return float(w2_1d(a @ theta, b @ theta).mean().clamp_min(0).sqrt())


def median_bandwidth(a: torch.Tensor, b: torch.Tensor | None = None, max_points: int = 2048, seed: int = 0) -> float:
    """The median heuristic: median pairwise Euclidean distance of the pooled samples (``a`` alone
    when ``b`` is None). At most ``max_points`` pooled points (a fixed random subset) enter the median.
    """
    pooled = _flat(a, "a") if b is None else torch.cat([_flat(a, "a"), _flat(b, "b")])
    if pooled.shape[0] > max_points:
        idx = torch.randperm(pooled.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]
        pooled = pooled[idx]
    dist = torch.cdist(pooled, pooled)
    iu = torch.triu_indices(pooled.shape[0], pooled.shape[0], offset=1)
    med = float(dist[iu[0], iu[1]].median())
    if not med > 0:
        raise ValueError("a, b: all points coincide, the median bandwidth is zero; pass bandwidth=")
    return med


def mmd(a: torch.Tensor, b: torch.Tensor, bandwidth: float | None = None, chunk: int = 1024) -> float:
    """Unbiased MMD^2 with the Gaussian kernel ``exp(-|x - y|^2 / (2 h^2))``.

    ``h`` is ``bandwidth`` or, by default, :func:`median_bandwidth` of the pooled samples. The
    unbiased estimator leaves out the diagonal terms, so it is centred on 0 when ``a`` and ``b`` come
    from one distribution (and may dip slightly below 0). Computed in row chunks (memory ``chunk x n``).

    Example::

        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(2000, 1, dtype=torch.float64, generator=g)
        >>> y = torch.randn(2000, 1, dtype=torch.float64, generator=g)
        >>> abs(mmd(x, y, bandwidth=1.0)) < 2e-3
        True
    """
    a = _flat(a, "a")
    b = _flat(b, "b")
    h = median_bandwidth(a, b) if bandwidth is None else bandwidth
    return MMDTo(b, h, chunk)(a)


class MMDTo:
    """Unbiased MMD^2 of sample sets against one fixed set ``data``, with one kernel for all of them.

    The data's own kernel sum is computed once, and every set is scored with the same bandwidth
    (default: the median pairwise distance within ``data``), so the numbers of a table compare.

    Example::

        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> data = torch.randn(500, 2, dtype=torch.float64, generator=g)
        >>> other = torch.randn(500, 2, dtype=torch.float64, generator=g)
        >>> score = MMDTo(data)
        >>> score(other + 1.0) > score(other + 0.3) > abs(score(other))
        True
    """

    def __init__(self, data: torch.Tensor, bandwidth: float | None = None, chunk: int = 1024):
        self.data = _flat(data, "data")
        m = self.data.shape[0]
        if m < 2:
            raise ValueError(f"data: need at least 2 samples, got {m}")
        h = median_bandwidth(self.data) if bandwidth is None else float(bandwidth)
        if not h > 0:
            raise ValueError(f"bandwidth: expected a positive number, got {bandwidth!r}")
        self.bandwidth = h
        self.gamma = 1.0 / (2.0 * h * h)
        self.chunk = int(chunk)
        # the diagonal of k(x, x) is exactly 1: remove m ones for the unbiased estimator
        self.self_term = (self._kernel_sum(self.data, self.data) - m) / (m * (m - 1))

    def _kernel_sum(self, x: torch.Tensor, y: torch.Tensor) -> float:
        total = 0.0
        for i in range(0, x.shape[0], self.chunk):
            total += float(torch.exp(torch.cdist(x[i:i + self.chunk], y).pow_(2).mul_(-self.gamma)).sum())
        return total

    def __call__(self, samples: torch.Tensor) -> float:
        x = _flat(samples, "samples")
        n, m = x.shape[0], self.data.shape[0]
        if n < 2:
            raise ValueError(f"samples: need at least 2, got {n}")
        if x.shape[1] != self.data.shape[1]:
            raise ValueError(f"samples: dimension {x.shape[1]} differs from the data's {self.data.shape[1]}")
        kxx = (self._kernel_sum(x, x) - n) / (n * (n - 1))
        kxd = self._kernel_sum(x, self.data) / (n * m)
        return kxx + self.self_term - 2.0 * kxd


def _flat(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of samples, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"{name}: expected a batch of samples (n, ...), got shape {tuple(x.shape)}")
    return x.detach().reshape(x.shape[0], -1).to(F64)


# ------------------------------------------------------------------------------------------ rows
def stochastic_solvers(notes: list[str] | None = None) -> list[str]:
    """Registered fewstep solvers that draw noise (``cls.stochastic``) and run at their defaults, in
    name order. Those that need options (``mlem`` needs a model family) are left out, with a line
    in ``notes`` when given."""
    out = []
    for name in sorted(REGISTRY):
        if not REGISTRY[name].stochastic:
            continue
        try:
            _solvers.get(name)
        except (ValueError, TypeError) as e:
            if notes is not None:
                notes.append(f"`{name}` left out: it cannot run at its defaults ({e})")
            continue
        out.append(name)
    return out


@dataclass
class Cell:
    sw2: float = math.nan
    mmd: float = math.nan
    fd: float = math.nan
    note: str = ""


@dataclass
class DistResult:
    target: str
    nfes: list[int]
    rows: dict[str, dict[int, Cell]] = field(default_factory=dict)
    floor: Cell = field(default_factory=Cell)
    floor_label: str = "floor: a second exact draw"
    notes: list[str] = field(default_factory=list)


def _score(x: torch.Tensor, data: torch.Tensor, projections: int, mmd_to: MMDTo) -> Cell:
    if not torch.isfinite(x).all():
        return Cell(note="non-finite samples")
    return Cell(sliced_w2(x, data, projections), mmd_to(x))


def _run_fewstep(model, noise, name, nfe, seed):
    return sample(model, noise, solver=name, nfe=nfe, generator=torch.Generator().manual_seed(seed))


def _run_diffusers_sa(model, noise, nfe, seed):
    from .peers import make_scheduler, run_scheduler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = make_scheduler("SASolverScheduler", model)
        return run_scheduler(scheduler, model, noise, nfe, generator=torch.Generator().manual_seed(seed))


DIFFUSERS_SA = "diffusers SASolverScheduler (default tau)"
ODE_ROW = "fewstep default (ODE, for scale)"


def measure_testbed(name: str, nfes: Sequence[int], samples: int, seed: int, projections: int,
                    progress=None) -> DistResult:
    gm = _targets.exact_testbed(name)
    sch = _targets.linear_schedule()
    model = gm.model(sch, prediction="eps", dtype=F64)
    noise = _targets.fixed_noise(samples, (gm.dim,), seed)
    data = gm.sample_data(samples, torch.Generator().manual_seed(seed + 1))
    second = gm.sample_data(samples, torch.Generator().manual_seed(seed + 2))
    res = DistResult(name, list(nfes))
    mmd_to = MMDTo(data)
    res.floor = _score(second, data, projections, mmd_to)
    runners = [(s, lambda nfe, s=s: _run_fewstep(model, noise, s, nfe, seed + 3)) for s in stochastic_solvers()]
    runners.append((DIFFUSERS_SA, lambda nfe: _run_diffusers_sa(model, noise, nfe, seed + 3)))
    runners.append((ODE_ROW, lambda nfe: sample(model, noise, nfe=nfe)))
    for label, fn in runners:
        cells = {}
        for nfe in nfes:
            try:
                with torch.no_grad():
                    x = fn(nfe)
                cells[nfe] = _score(x, data, projections, mmd_to)
            except (SamplingError, ValueError, TypeError, RuntimeError) as e:
                cells[nfe] = Cell(note=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
            if progress is not None:
                progress.update(1)
        res.rows[label] = cells
    return res


def measure_digits(nfes: Sequence[int], samples: int, seed: int, progress=None) -> DistResult:
    """FD-digits of class-conditional samples (labels cycling 0-9) from the bundled digits model."""
    model = _targets.load_zoo_model("digits16")
    try:
        from ..zoo import classifier as zc
        from ..zoo import data as zd
        from ..zoo import load as zload

        clf = zload("digits-classifier")
        heldout = zd.digits16("heldout").images
    except (ImportError, ValueError, FileNotFoundError, OSError) as e:
        raise _targets.TargetUnavailable(
            f"digits16: no digit classifier or held-out digits in fewstep.zoo ({e})") from e
    labels = torch.arange(samples) % 10
    model = model.with_cond(label=labels)
    noise = _targets.fixed_noise(samples, model.sample_shape, seed)
    res = DistResult("digits16", list(nfes), floor_label="floor: training digits vs held-out digits")
    train = zd.digits16("train").images
    res.floor = Cell(fd=zc.fd_digits(train[:samples], heldout, clf))
    runners = [(s, lambda nfe, s=s: _run_fewstep(model, noise, s, nfe, seed + 3)) for s in stochastic_solvers()]
    runners.append((DIFFUSERS_SA, lambda nfe: _run_diffusers_sa(model, noise, nfe, seed + 3)))
    runners.append((ODE_ROW, lambda nfe: sample(model, noise, nfe=nfe)))
    for label, fn in runners:
        cells = {}
        for nfe in nfes:
            try:
                with torch.no_grad():
                    x = fn(nfe)
                cells[nfe] = Cell(fd=zc.fd_digits(x.float(), heldout, clf))
            except (SamplingError, ValueError, TypeError, RuntimeError) as e:
                cells[nfe] = Cell(note=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
            if progress is not None:
                progress.update(1)
        res.rows[label] = cells
    res.notes.append(f"FD-digits against the {heldout.shape[0]} held-out digits; {samples} samples per row, "
                     f"labels 0-9 in turn, no guidance; floor: {min(samples, train.shape[0])} training digits")
    return res


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("--target", default="gmm,digits16",
                        help="comma-separated: gmm (= gmm2d,gmm16,gmm64), gaussian, digits16")
    parser.add_argument("--nfe", default=",".join(map(str, DEFAULT_NFES)), help="comma-separated NFE budgets")
    parser.add_argument("--samples", type=int, default=4096, help="samples per set (digits16: at most 1000)")
    parser.add_argument("--projections", type=int, default=256, help="random directions of sliced W2")
    parser.add_argument("--seed", type=int, default=0, help="seed of noise, data draws and solver noise")


def _table(res: DistResult, metric: str) -> str:
    header = ["sampler"] + [f"NFE {n}" for n in res.nfes]
    rows = []
    for label, cells in res.rows.items():
        rows.append([label] + [fmt(getattr(cells[n], metric)) if not cells[n].note else "fails" for n in res.nfes])
    rows.append([res.floor_label] + [fmt(getattr(res.floor, metric))] * len(res.nfes))
    return markdown_table(header, rows)


def run(args) -> Report:
    from tqdm.auto import tqdm

    from .accuracy import _int_list

    names = _targets.expand(args.target)
    nfes = _int_list(args.nfe)
    if args.samples < 2:
        raise ValueError(f"samples: expected at least 2, got {args.samples}")
    left_out: list[str] = []
    stoch = stochastic_solvers(left_out)
    report = Report(title="fewstep bench distribution: stochastic samplers against exact data")
    report.add(
        "Setup",
        f"{args.samples} samples per set; NFE {', '.join(map(str, nfes))}. Stochastic fewstep solvers found: "
        f"{', '.join(f'`{s}`' for s in stoch) or 'none registered yet'}; peer: {DIFFUSERS_SA}; "
        f"and `{ODE_ROW}`. Sliced W2 over {args.projections} fixed random directions; MMD^2 unbiased, Gaussian "
        "kernel with the median-distance bandwidth of the data. Lower is better; the floor row is an independent "
        "exact draw." + "".join(f"\n\nNote: {n}." for n in left_out),
    )
    skipped = []
    rows_per = len(stoch) + 2
    for name in names:
        if name in _targets.ZOO_MODELS and name != "digits16":
            skipped.append(f"- `{name}`: no distribution metric for this model yet")
            continue
        try:
            with tqdm(total=rows_per * len(nfes), desc=f"distribution {name}", unit="run", leave=False) as bar:
                if name == "digits16":
                    res = measure_digits(nfes, min(args.samples, 1000), args.seed, progress=bar)
                else:
                    res = measure_testbed(name, nfes, args.samples, args.seed, args.projections, progress=bar)
        except _targets.TargetUnavailable as e:
            skipped.append(f"- `{name}` skipped: {e}")
            continue
        notes = [f"- `{label}` NFE {n}: {c.note}" for label, cells in res.rows.items()
                 for n, c in cells.items() if c.note]
        if name == "digits16":
            body = "FD-digits (lower is better):\n\n" + _table(res, "fd")
        else:
            body = ("Sliced W2:\n\n" + _table(res, "sw2") + "\n\nMMD^2 (unbiased, median bandwidth):\n\n"
                    + _table(res, "mmd"))
        if notes or res.notes:
            body += "\n\n" + "\n".join(notes + [f"- {n}" for n in res.notes])
        report.add(name, body)
    if skipped:
        report.add("Targets not run", "\n".join(skipped))
    return report
