"""The ``fewstep`` command line.

Each subcommand lives with the package that owns it and registers itself through a
``register(subparsers)`` function; this module only dispatches. A command whose module is not yet
present is simply not offered.

    fewstep solvers                       the solver table (orders, NFE per step)
    fewstep bench accuracy|order|...      benchmarks, markdown + PNG reports
    fewstep sample / demo / zoo ...       the bundled models
    fewstep search / edit                 solver search, sparse editing
"""
from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser"]

# module path -> provides register(subparsers)
COMMAND_MODULES = (
    "fewstep.cli",  # this module: `solvers`
    "fewstep.bench.cli",
    "fewstep.zoo.cli",
    "fewstep.search.cli",
    "fewstep.sparse.cli",
)


def register(subparsers) -> None:
    p = subparsers.add_parser("solvers", help="list the solvers with their orders and NFE per step")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.set_defaults(func=_cmd_solvers)


def _cmd_solvers(args) -> int:
    from . import solvers

    rows = solvers.table()
    cols = ["name", "aliases", "orders", "nfe_per_step", "stochastic", "summary"]
    if args.markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(str(r[c]) for c in cols) + " |")
        return 0
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fewstep",
        description="Few-step, training-free samplers for diffusion and flow models, measured against exact references.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in COMMAND_MODULES:
        if mod_name == __name__ or mod_name == "fewstep.cli":
            register(sub)
            continue
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and mod_name.startswith(e.name):
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"fewstep {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
