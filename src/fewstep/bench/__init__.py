"""Benchmarks: accuracy against exact references, empirical orders, per-step overhead,
distribution metrics, and each method's own measurements.

Each benchmark is a module in this package exposing ``add_arguments(parser)`` and
``run(args) -> Report``; :data:`BENCHMARKS` maps the ``fewstep bench NAME`` to its module.
Timings live here, never in tests.
"""
from __future__ import annotations

BENCHMARKS = {
    "accuracy": "fewstep.bench.accuracy",
    "order": "fewstep.bench.order",
    "overhead": "fewstep.bench.overhead",
    "distribution": "fewstep.bench.distribution",
    "heroism": "fewstep.bench.heroism",
    "mlem": "fewstep.bench.mlem",
    "sparse": "fewstep.bench.sparse",
    "distributed": "fewstep.bench.distributed",
}
