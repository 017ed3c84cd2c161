"""``searched``: a solver searched for one model by ``fewstep search`` (DS-Solver, Wang et al. 2025).

The file (see :mod:`fewstep.search.fileformat`) holds the searched grid and multistep weights. This
solver rebuilds the step coefficients with the same function the search differentiated
(:func:`fewstep.search.parameterisation.step_table`) and runs them through the shared
:func:`~fewstep.solvers.base.run_multistep`, so what was searched is exactly what runs.

The solver carries its own grid: ``nfe`` must equal the budget it was searched for, and ``grid``
should be left unset (a named grid is ignored; a tensor that is not the searched grid is refused).
It refuses a model whose schedule differs from the one it was searched on
(:class:`fewstep.search.fileformat.ScheduleMismatch`).

``path`` is a file, or the name of a solver bundled with fewstep: ``fewstep.search.bundled_names()``
lists them (e.g. ``"digits16-nfe6"``), ``fewstep.search.bundled(target, nfe)`` finds one.

Example::

    x0 = fewstep.sample(model, noise, solver="searched", path="solver.safetensors", nfe=6)
"""
from __future__ import annotations

import os

import torch

from .. import grids as _grids
from .base import MultistepPlan, Solver, Step, register

__all__ = ["Searched", "resolve_path", "bundled_names", "bundled_file"]

_BUNDLED_SUFFIX = ".safetensors"


def _bundled_dir():
    from importlib import resources

    return resources.files("fewstep.zoo").joinpath("searched")


def bundled_names() -> list[str]:
    """Names of the searched solvers shipped in ``fewstep/zoo/searched`` (e.g. ``digits16-nfe6``)."""
    try:
        folder = _bundled_dir()
        return sorted(p.name[: -len(_BUNDLED_SUFFIX)] for p in folder.iterdir() if p.name.endswith(_BUNDLED_SUFFIX))
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        return []


def _aliases(name: str) -> list[str]:
    """``name`` and its spellings through the zoo's model aliases (``digits16-l-nfe6`` -> ``digits16-nfe6``)."""
    try:
        from ..zoo import ALIASES
    except ImportError:  # a build without the zoo
        ALIASES = {}
    out = [name]
    for alias, real in ALIASES.items():
        for a, b in ((real, alias), (alias, real)):
            if name.startswith(a + "-nfe"):
                out.append(b + name[len(a):])
    return out


def bundled_file(name: str) -> str | None:
    """The shipped file for a bundled name such as ``digits16-nfe6`` (``None`` if there is none)."""
    shipped = bundled_names()
    for candidate in _aliases(name):
        if candidate in shipped:
            return os.fspath(_bundled_dir().joinpath(candidate + _BUNDLED_SUFFIX))
    return None


def resolve_path(path) -> str:
    """A file path for ``path``: an existing file, or a bundled solver name."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path or a bundled solver name, got {type(path).__name__}")
    p = os.fspath(path)
    if os.path.isfile(p):
        return p
    name = p[: -len(_BUNDLED_SUFFIX)] if p.endswith(_BUNDLED_SUFFIX) else p
    found = bundled_file(name)
    if found is not None:
        return found
    raise FileNotFoundError(
        f"path: {p!r} is neither a file nor a bundled searched solver; bundled: {bundled_names() or 'none'}"
    )


@register
class Searched(Solver):
    """A solver loaded from a ``fewstep search`` file; one network evaluation per step."""

    name = "searched"
    needs_inputs = True  # runs only with path= (a searched file)
    summary = "grid + multistep weights searched for one model (fewstep search)"
    paper = "Wang et al., Differentiable Solver Search for Fast Diffusion Sampling, ICML 2025 (arXiv 2505.21114)"
    orders = (1,)
    options = {"path": None}
    per_step_note = "1"

    def check_options(self):
        from ..search import fileformat

        if self.opts["path"] is None:
            raise ValueError("path: solver='searched' needs path= (a file from `fewstep search` or a bundled name)")
        self.file = fileformat.load(resolve_path(self.opts["path"]))

    @property
    def order(self) -> int:
        return 1

    # ---- budget: exactly the searched NFE ----------------------------------------------------
    def min_nfe(self) -> int:
        # any other budget is refused by num_points, with the message that names the searched NFE
        return 1

    def num_points(self, nfe: int) -> int:
        if nfe != self.file.nfe:
            raise ValueError(
                f"nfe: this searched solver ({self.file.path}) was searched for nfe={self.file.nfe}, got nfe={nfe}"
            )
        return nfe

    def nfe_for_points(self, num_points: int) -> int:
        return num_points

    # ---- numerics --------------------------------------------------------------------------
    def table(self, schedule):
        """The step coefficients on ``schedule`` (float64), after checking it is the searched one."""
        from ..search import fileformat
        from ..search.parameterisation import step_table

        fileformat.check_schedule(self.file, schedule)
        with torch.no_grad():
            return step_table(self.file.params, schedule)

    def prepare(self, schedule, times):
        table = self.table(schedule)
        self._check_grid(schedule, times, table.times)
        n = table.nfe
        a = table.a.tolist()
        w = table.weights.tolist()
        # history entry k is the k-th newest prediction: row i lists D_i, D_{i-1}, ..., D_0
        steps = [Step(a=a[i], d=tuple(w[i][j] for j in range(i, -1, -1))) for i in range(n)]
        correctors = []
        if table.corrector_weights is not None:
            cw = table.corrector_weights.tolist()
            # node i's state again from node i - 1's, with D_i included (see parameterisation)
            correctors = [None] + [Step(a=a[i - 1], d=tuple(cw[i][j] for j in range(i, -1, -1))) for i in range(1, n)]
        # the network is asked at the searched evaluation times (the grid times plus the searched
        # offsets); the step coefficients use the grid times themselves
        start_sigma = None if table.start_sigma is None else float(table.start_sigma)
        return MultistepPlan(view=table.view, nodes=schedule.nodes(table.eval_times), predictors=steps,
                             correctors=correctors, history=n, start_sigma=start_sigma)

    def _check_grid(self, schedule, times, searched):
        times = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
        scale = max(1.0, abs(schedule.t_max))
        if times.numel() == searched.numel() and bool(((times - searched).abs() <= 1e-9 * scale).all()):
            return
        # fewstep.sample hands every solver a named grid (its default included): ignore those
        for name in _grids.NAMES:
            named = _grids.make(name, schedule, times.numel())
            if bool(((times - named).abs() <= 1e-9 * scale).all()):
                return
        raise ValueError(
            "grid: a searched solver evaluates at its own searched times; leave grid= unset "
            f"(searched grid: {[round(v, 4) for v in searched.tolist()]})"
        )
