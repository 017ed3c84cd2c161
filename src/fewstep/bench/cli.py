"""``fewstep bench NAME``: run one benchmark, print its markdown and write it with its plots.

Under ``torchrun`` only the benchmarks whose module sets ``SHARDED = True`` run (every rank takes
part, rank 0 alone writes the report); the others stop at once with an error naming them, rather
than leaving ranks idle.
"""
from __future__ import annotations

import importlib
import os
import shlex
import sys

from . import BENCHMARKS


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks: accuracy, order, overhead, distribution, ...")
    sub = p.add_subparsers(dest="bench", metavar="BENCHMARK")
    for name, mod_name in BENCHMARKS.items():
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and mod_name.startswith(e.name):
                continue
            raise
        bp = sub.add_parser(name, help=(mod.__doc__ or name).strip().splitlines()[0])
        bp.add_argument("--out", default=f"bench-out/{name}", help="folder for report.md and plots")
        mod.add_arguments(bp)
        bp.set_defaults(func=_run, bench_module=mod)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def _run(args) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not getattr(args.bench_module, "SHARDED", False):
        raise ValueError(f"bench {args.bench}: runs in one process; launch it without torchrun "
                         f"(benchmarks that run under torchrun: {', '.join(_sharded_names())})")
    report = args.bench_module.run(args)
    if report is None or int(os.environ.get("RANK", "0")) != 0:
        return 0  # a torchrun rank other than 0: rank 0 prints and writes the report
    if not report.command:
        report.command = "fewstep " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    path = report.write(args.out)
    print(report.markdown())
    print(f"\nreport written to {path}")
    return 0


def _sharded_names() -> list[str]:
    names = []
    for name, mod_name in BENCHMARKS.items():
        mod = sys.modules.get(mod_name)
        if mod is not None and getattr(mod, "SHARDED", False):
            names.append(name)
    return names
