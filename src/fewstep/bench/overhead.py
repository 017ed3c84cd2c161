"""Overhead: microseconds per step spent outside the network, fewstep vs diffusers, in one run.

The "network" returns a precomputed tensor, so everything measured is the sampler's own work:
planning (fewstep's ``prepare`` / diffusers' ``set_timesteps``), the conversion of the output to the
solver's view, and the update. Latent 1x4x64x64 float32 on CPU, ``torch.set_num_threads(1)``,
50 steps. Each contender is timed in full runs; the repetitions are interleaved (contender A, B,
C, ..., then again) so that a slow moment of the machine hits every contender alike, and the median
is reported.

Two numbers per contender:

* *whole call*: ``fewstep.sample(...)`` (planning + loop + checks), or diffusers'
  ``set_timesteps`` + the ``scale_model_input``/``step`` loop; divided by the number of steps;
* *loop only*: the step loop with the plan (or ``set_timesteps``) made beforehand.

Also: tensor operators dispatched per step (``TorchDispatchMode`` counter; each one a kernel launch
and a pass over the latent on an accelerator), the diffusers adapter's ``step()`` loop when
:mod:`fewstep.integrations.diffusers` is importable, and a cProfile breakdown of the headline
solver when it misses its target (or with ``--profile``).

Example::

    fewstep bench overhead
    fewstep bench overhead --repeats 31 --profile
"""
from __future__ import annotations

import cProfile
import io
import math
import os
import pstats
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import grids as _grids
from .. import solvers as _solvers
from ..model import Model
from ..sample import default_grid, sample
from ..solvers.base import QUIET, Evaluate, REGISTRY
from . import targets as _targets
from .report import Report, fmt, markdown_table

__all__ = ["Contender", "contenders", "time_interleaved", "count_ops", "add_arguments", "run"]

SHAPE = (1, 4, 64, 64)
STEPS = 50
HEADLINE = "fewstep dpm++ o2"
HEADLINE_PEER = "diffusers DPMSolverMultistep 2M"
TARGET_US = 25.0
TARGET_RATIO = 1.0 / 6.0
ADAPTER_TARGET_US = 50.0

#: fewstep solvers timed (name, options), when registered
FEWSTEP_SOLVERS = (
    ("dpm++", {"order": 2}),
    ("ddim", {}),
    ("unipc", {"order": 2}),
    ("unipc", {"order": 3}),
    ("deis", {}),
    ("ipndm", {}),
    ("heun", {}),
)
#: the multistep solvers among them (the benchmark issue's overhead target names these)
MULTISTEP = ("fewstep dpm++ o2", "fewstep unipc o2", "fewstep unipc o3", "fewstep deis", "fewstep ipndm")
#: diffusers schedulers timed (label, class name, config)
PEERS = (
    (HEADLINE_PEER, "DPMSolverMultistepScheduler", {"solver_order": 2, "algorithm_type": "dpmsolver++"}),
    ("diffusers UniPCMultistep 2", "UniPCMultistepScheduler", {"solver_order": 2}),
    ("diffusers UniPCMultistep 3", "UniPCMultistepScheduler", {"solver_order": 3}),
    ("diffusers DDIM", "DDIMScheduler", {"clip_sample": False}),
    ("diffusers EulerDiscrete", "EulerDiscreteScheduler", {}),
)


@dataclass
class Contender:
    """A sampler to time: ``whole()`` runs a full sampling call, ``loop()`` the step loop only
    (its setup done by ``setup()``, outside the timing). ``steps`` is the number of network
    evaluations of one run (the divisor of "per step")."""

    label: str
    whole: Callable[[], torch.Tensor]
    setup: Callable[[], object]
    loop: Callable[[object], torch.Tensor]
    steps: int
    group: str
    whole_us: list[float] = field(default_factory=list)
    loop_us: list[float] = field(default_factory=list)
    setup_us: list[float] = field(default_factory=list)
    ops_per_step: float = math.nan

    @property
    def whole_median(self) -> float:
        return statistics.median(self.whole_us) if self.whole_us else math.nan

    @property
    def loop_median(self) -> float:
        return statistics.median(self.loop_us) if self.loop_us else math.nan

    @property
    def whole_min(self) -> float:
        return min(self.whole_us) if self.whole_us else math.nan

    @property
    def loop_min(self) -> float:
        return min(self.loop_us) if self.loop_us else math.nan

    @property
    def setup_median(self) -> float:
        """Planning time of one run (µs, not per step)."""
        return statistics.median(self.setup_us) if self.setup_us else math.nan


def _fixed_net(output: torch.Tensor):
    def net(x, model_time, **_):
        return output

    return net


def _fewstep_contender(label, name, opts, model, noise, steps) -> Contender:
    solver = _solvers.get(name, **opts)
    nfe = steps  # a "step" is one network evaluation, for every contender

    def whole():
        return sample(model, noise, solver=solver, nfe=nfe)

    def setup():
        times = _grids.make(default_grid(model.schedule), model.schedule, solver.num_points(nfe))
        return solver.prepare(model.schedule, times)

    view = None

    def loop(plan):
        # the driver of fewstep.sample without its checks and callbacks: what an integration does
        nonlocal view
        view = view or solver.view(plan)
        run = solver.run(plan, noise * model.schedule.initial_scale, None)
        msg = next(run)
        try:
            while True:
                if type(msg) is Evaluate:
                    msg = run.send(model.evaluate(msg.xs, msg.nodes, view, scaled=msg.scaled))
                else:
                    msg = run.send(QUIET)  # no callback: as fewstep.sample answers StepDone then
        except StopIteration as stop:
            return stop.value

    return Contender(label, whole, setup, loop, steps=steps, group="fewstep")


def _scheduler_contender(label, scheduler, noise, output, steps, group) -> Contender:
    """A diffusers-style scheduler driven the way pipelines drive it (``scale_model_input``, the
    network, ``step``), on the fixed network output."""
    net = _fixed_net(output)

    def loop(_):
        x = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            xin = scheduler.scale_model_input(x, t)
            x = scheduler.step(net(xin, t), t, x, return_dict=False)[0]
        return x

    def setup():
        scheduler.set_timesteps(steps)

    def whole():
        setup()
        return loop(None)

    return Contender(label, whole, setup, loop, steps=steps, group=group)


def _diffusers_contender(label, cls_name, config, model, noise, output, steps) -> Contender:
    from .peers import make_scheduler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = make_scheduler(cls_name, model, **config)
    return _scheduler_contender(label, scheduler, noise, output, steps, "diffusers")


def _adapter_contender(label, name, opts, noise, output, steps) -> Contender | None:
    """fewstep's own diffusers scheduler (``fewstep.integrations.diffusers``), when importable."""
    try:
        from ..integrations.diffusers import FewstepScheduler
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = FewstepScheduler(solver=name, order=opts.get("order"), beta_schedule="linear",
                                     beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)
    return _scheduler_contender(label, scheduler, noise, output, steps, "adapter")


def contenders(steps: int = STEPS, shape=SHAPE, peers: bool = True) -> list[Contender]:
    """Every contender on the same noise, output tensor and schedule (diffusers' linear betas)."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(shape, generator=g, dtype=torch.float32)
    output = torch.randn(shape, generator=g, dtype=torch.float32)
    model = Model(_fixed_net(output), schedule=_targets.linear_schedule(), prediction="eps")
    out = []
    for name, opts in FEWSTEP_SOLVERS:
        if name not in REGISTRY:
            continue
        label = f"fewstep {name}" + (f" o{opts['order']}" if "order" in opts else "")
        out.append(_fewstep_contender(label, name, opts, model, noise, steps))
    if peers:
        for label, cls_name, config in PEERS:
            out.append(_diffusers_contender(label, cls_name, config, model, noise, output, steps))
        adapter = _adapter_contender("fewstep adapter FewstepScheduler dpm++ o2", "dpm++", {"order": 2},
                                     noise, output, steps) if "dpm++" in REGISTRY else None
        if adapter is not None:
            out.append(adapter)
    return out


def time_interleaved(items: list[Contender], repeats: int, warmup: int = 2, progress=None) -> None:
    """Fill ``whole_us``, ``loop_us`` (µs per step) and ``setup_us`` (µs per run) with interleaved
    repetitions: every contender once per round, ``warmup`` rounds discarded."""
    for r in range(warmup + repeats):
        for c in items:
            t0 = time.perf_counter()
            c.whole()
            t1 = time.perf_counter()
            plan = c.setup()
            t2 = time.perf_counter()
            c.loop(plan)
            t3 = time.perf_counter()
            if r >= warmup:
                c.whole_us.append((t1 - t0) * 1e6 / c.steps)
                c.loop_us.append((t3 - t2) * 1e6 / c.steps)
                c.setup_us.append((t2 - t1) * 1e6)
        if progress is not None:
            progress.update(1)


def count_ops(c: Contender) -> float:
    """Tensor operators dispatched per step by the whole call (NaN when dispatch modes are missing)."""
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
    except ImportError:  # pragma: no cover - private API of torch
        return math.nan

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    counter = Counter()
    with counter:
        c.whole()
    return counter.n / c.steps


def profile_text(fn: Callable[[], object], runs: int = 20, top: int = 16) -> str:
    """cProfile of ``runs`` calls of ``fn``: the functions where the time goes (own time first)."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(runs):
        fn()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    text = buf.getvalue()
    start = text.find("   ncalls")
    text = text[start:] if start >= 0 else text
    return text.replace(str(_SRC_ROOT), "")


_SRC_ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _load() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg()) + f" on {os.cpu_count()} cores"
    except OSError:  # pragma: no cover - not on every platform
        return "unknown"


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, default=STEPS, help="steps per run (network evaluations)")
    parser.add_argument("--repeats", type=int, default=21, help="timed repetitions per contender (interleaved)")
    parser.add_argument("--profile", action="store_true", help="always add a cProfile of the headline solver")


def run(args) -> Report:
    from tqdm.auto import tqdm

    if args.steps < 2 or args.repeats < 1:
        raise ValueError(f"steps, repeats: need steps >= 2 and repeats >= 1, got {args.steps}, {args.repeats}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        items = contenders(args.steps)
        with torch.no_grad():
            with tqdm(total=args.repeats + 2, desc="overhead", unit="round", leave=False) as bar:
                time_interleaved(items, args.repeats, progress=bar)
            for c in items:
                c.ops_per_step = count_ops(c)
        by = {c.label: c for c in items}
        head = by.get(HEADLINE)
        peer = by.get(HEADLINE_PEER)
        report = Report(title="fewstep bench overhead: sampler time per step, network excluded")
        report.add(
            "Setup",
            f"Latent {'x'.join(map(str, SHAPE))} float32, CPU, torch.set_num_threads(1), {args.steps} steps, "
            f"eps-prediction network that returns a precomputed tensor. {args.repeats} interleaved repetitions "
            f"(after 2 warm-up rounds), medians and minimums. torch {torch.__version__}. Machine load average "
            f"at the start: {_load()}.",
        )
        rows = []
        ref = peer.whole_median if peer else math.nan
        ref_loop = peer.loop_median if peer else math.nan
        for c in items:
            rows.append([c.label, fmt(c.whole_median), fmt(c.whole_min), fmt(c.loop_median), fmt(c.loop_min),
                         fmt(c.setup_median), fmt(c.whole_median / ref), fmt(c.loop_median / ref_loop),
                         fmt(c.ops_per_step)])
        report.add("µs per step", markdown_table(
            ["sampler", "whole call (median)", "whole call (min)", "loop only (median)", "loop only (min)",
             "planning, µs per run (median)", "whole / DPMSolverMultistep", "loop / DPMSolverMultistep",
             "tensor ops per step (whole call)"], rows)
            + "\n\nOn a shared machine a longer interval is more likely to include a pause of the process, "
            "which inflates medians of whole calls most; the minimum is the least disturbed run.")
        verdict = []
        profile_needed = bool(getattr(args, "profile", False))
        if head is not None and peer is not None:
            for what, mine, theirs in (("whole call, medians", head.whole_median, peer.whole_median),
                                       ("whole call, minimums", head.whole_min, peer.whole_min),
                                       ("loop only, medians", head.loop_median, peer.loop_median),
                                       ("loop only, minimums", head.loop_min, peer.loop_min)):
                r = mine / theirs
                ok_abs, ok_rel = mine <= TARGET_US, r <= TARGET_RATIO
                verdict.append(f"- {what}: {HEADLINE} {fmt(mine)} µs/step (target ≤ {TARGET_US:g}: "
                               f"{'met' if ok_abs else 'NOT met'}); {fmt(r)} of {HEADLINE_PEER} "
                               f"(target ≤ 1/6: {'met' if ok_rel else 'NOT met'}; diffusers {fmt(1 / r)}x slower).")
                profile_needed |= not (ok_abs and ok_rel)
            multistep = [c for c in items if c.group == "fewstep" and c.label in MULTISTEP]
            for what, key in (("whole call", "whole_median"), ("loop only", "loop_median")):
                if multistep:
                    worst = max(multistep, key=lambda c: getattr(c, key))
                    r = getattr(worst, key) / getattr(peer, key)
                    verdict.append(f"- every multistep solver ({', '.join(c.label[len('fewstep '):] for c in multistep)}), "
                                   f"{what}, medians: at most {fmt(r)} of {HEADLINE_PEER} ({worst.label}; target "
                                   f"≤ 1/6: {'met' if r <= TARGET_RATIO else 'NOT met'}).")
        adapter = next((c for c in items if c.group == "adapter"), None)
        adapter_slow = False
        if adapter is not None and head is not None:
            extra = adapter.loop_median - head.loop_median
            adapter_slow = extra > ADAPTER_TARGET_US
            verdict.append(f"- diffusers adapter `FewstepScheduler` step() loop: {fmt(adapter.loop_median)} µs/step, "
                           f"{fmt(extra)} µs/step more than the bare solver loop (target ≤ {ADAPTER_TARGET_US:g}: "
                           f"{'NOT met' if adapter_slow else 'met'}).")
        if verdict:
            report.add("Targets", "\n".join(verdict))
        if profile_needed and head is not None:
            report.add(f"Where the time goes: cProfile of `{HEADLINE}`, 20 whole calls of {args.steps} steps",
                       "```\n" + profile_text(head.whole) + "```")
            plan = head.setup()
            report.add(f"Where the time goes: cProfile of `{HEADLINE}`, 20 step loops only (plan made before)",
                       "```\n" + profile_text(lambda: head.loop(plan)) + "```")
        if (adapter_slow or getattr(args, "profile", False)) and adapter is not None:
            adapter.setup()
            report.add("Where the time goes: cProfile of the adapter's step() loop, 20 loops",
                       "```\n" + profile_text(lambda: adapter.loop(None)) + "```")
        return report
    finally:
        torch.set_num_threads(threads)
