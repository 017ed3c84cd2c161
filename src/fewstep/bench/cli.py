"""``fewstep bench NAME``: run one benchmark, print its markdown and write it with its plots."""
from __future__ import annotations

import importlib
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
    report = args.bench_module.run(args)
    if not report.command:
        report.command = "fewstep " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    path = report.write(args.out)
    print(report.markdown())
    print(f"\nreport written to {path}")
    return 0
