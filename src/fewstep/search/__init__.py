"""Differentiable solver search (DS-Solver, Wang et al. 2025): a solver fitted to one model in minutes.

``search(model, nfe)`` fits a grid and the weights of a linear multistep method to the model's own
high-accuracy trajectories; ``save`` writes it; ``fewstep.sample(..., solver="searched", path=...)``
runs it. The command line is ``fewstep search``.

Example::

    import fewstep
    from fewstep import search
    result = search.search(model, nfe=6)                    # model: a fewstep.Model (torch network)
    search.save("solver.safetensors", result, model)
    x0 = fewstep.sample(model, noise, solver="searched", path="solver.safetensors", nfe=6)
    x0 = fewstep.sample(model, noise, solver="searched", path="digits16-nfe6", nfe=6)   # shipped

Modules: :mod:`~fewstep.search.parameterisation` (the search space and the coefficient formula
shared with the solver), :mod:`~fewstep.search.rollout` (its differentiable twin of the step loop),
:mod:`~fewstep.search.teacher` (cached teacher trajectories), :mod:`~fewstep.search.loop` (the
optimisation), :mod:`~fewstep.search.fileformat` (the file), :mod:`~fewstep.search.cli`.
"""
from __future__ import annotations

from .fileformat import ScheduleMismatch, SearchedFile, load
from .loop import SearchResult, evaluate_rmse, search
from .parameterisation import SolverParameters, StepTable, step_table
from .rollout import differentiable_testbed

__all__ = [
    "search",
    "save",
    "load",
    "bundled",
    "bundled_names",
    "SearchResult",
    "SearchedFile",
    "ScheduleMismatch",
    "SolverParameters",
    "StepTable",
    "step_table",
    "differentiable_testbed",
    "evaluate_rmse",
]


def save(path, result: SearchResult, model, *, model_name: str | None = None, extra: dict | None = None):
    """Write a :class:`SearchResult` found for ``model`` to ``path`` (atomic)."""
    from . import fileformat

    info = {**result.summary(), **(extra or {})}
    return fileformat.save(path, result.params, model.schedule, prediction=model.prediction,
                           model=model_name or model.name, search=info)


def bundled(target: str, nfe: int):
    """The searched solver fewstep ships for ``target`` at ``nfe``, as a ``pathlib.Path``, or ``None``.

    ``target`` is a benchmark target / model name (``"digits16"``, ``"gmm16"``, ...; zoo aliases such
    as ``digits16-l`` for ``digits16`` are accepted). Each file was searched for exactly the model
    call ``fewstep bench`` makes on that target (class-conditional models: labels 0..9 in turn, no
    guidance), on noise disjoint from the benchmark's.

    Example::

        >>> from fewstep import search
        >>> search.bundled("digits16", 6).name
        'digits16-nfe6.safetensors'
        >>> search.bundled("digits16", 7) is None
        True
    """
    from pathlib import Path

    from ..solvers.searched import bundled_file

    if not isinstance(target, str):
        raise TypeError(f"target: expected a model or benchmark target name, got {type(target).__name__}")
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe: expected a positive integer, got {nfe!r}")
    found = bundled_file(f"{target}-nfe{nfe}")
    return Path(found) if found is not None else None


def bundled_names() -> list[str]:
    """Names of the searched solvers shipped with fewstep (``path=`` accepts them), e.g. ``digits16-nfe6``."""
    from ..solvers.searched import bundled_names as names

    return names()
