"""Solvers: pure numerics, one generator mechanism (see :mod:`fewstep.solvers.base`).

``available()`` lists the names accepted by ``fewstep.sample(solver=...)``; ``get(name, **options)``
builds one; ``table()`` gives the rows of ``fewstep solvers`` (order, NFE per step, paper).
"""
from __future__ import annotations

import importlib

from .base import ALIASES, REGISTRY, Solver, register

__all__ = ["available", "get", "table", "Solver", "register"]

# One module per family; each registers its solvers on import. Modules not yet present are skipped
# so that the package imports while families are being added.
_FAMILIES = ("ddim", "multistep", "unipc", "heun", "forward_value", "heroism", "sa", "sde", "searched", "mlem")
for _name in _FAMILIES:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _e:  # only a missing family module is tolerated, not a broken one
        if _e.name != f"{__name__}.{_name}":
            raise


def available() -> list[str]:
    """Names accepted by ``solver=`` (aliases included)."""
    return sorted(set(REGISTRY) | set(ALIASES))


def get(name: str, **options) -> Solver:
    """Build the solver ``name`` with ``options``; unknown names or options raise ``ValueError``."""
    if not isinstance(name, str):
        raise TypeError(f"solver: expected a name or a Solver instance, got {type(name).__name__}")
    key = ALIASES.get(name, name)
    if key not in REGISTRY:
        raise ValueError(f"solver: unknown name {name!r}; valid: {available()}")
    return REGISTRY[key](**options)


def table() -> list[dict]:
    """One row per solver: name, aliases, orders, evaluations per step, stochastic, paper."""
    rows = []
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        try:
            per_step = cls().evals_per_step()
        except (ValueError, TypeError):
            per_step = getattr(cls, "per_step_note", "?")
        rows.append(
            {
                "name": name,
                "aliases": ", ".join(a for a, n in ALIASES.items() if n == name),
                "orders": "-".join(str(o) for o in (min(cls.orders), max(cls.orders))) if len(cls.orders) > 1 else str(cls.orders[0]),
                "nfe_per_step": per_step,
                "stochastic": cls.stochastic,
                "summary": cls.summary,
                "paper": cls.paper,
            }
        )
    return rows
