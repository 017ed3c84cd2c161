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


def bundled() -> list[str]:
    """Names of the searched solvers shipped with fewstep (``path=`` accepts them)."""
    from ..solvers.searched import bundled_names

    return bundled_names()
