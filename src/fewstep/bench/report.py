"""Report writing shared by every benchmark: markdown tables, PNG plots, atomic files."""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["Report", "markdown_table", "atomic_write_text", "atomic_path", "fmt", "geomean"]


def fmt(v) -> str:
    """Numbers for tables: 3 significant digits, scientific when small or large."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf"
        if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4):
            return f"{v:.2e}"
        return f"{v:.3g}"
    return str(v)


def geomean(values: Iterable[float]) -> float:
    vals = [float(v) for v in values]
    if not vals:
        return math.nan
    if any(v <= 0 or not math.isfinite(v) for v in vals):
        return math.nan
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(v) for v in r) + " |")
    return "\n".join(lines)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: never a partial file."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


class atomic_path:
    """Context manager yielding a temporary path that is renamed onto ``path`` on success only.

    Example::

        with atomic_path("out.png") as tmp:
            fig.savefig(tmp, format="png")
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __enter__(self) -> str:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                # mkstemp creates 0600, and writers such as safetensors recreate the file: give the
                # final file the permissions an ordinary open() would, just before it appears
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(self.tmp, 0o666 & ~umask)
                os.replace(self.tmp, self.path)
                return False
            except BaseException:  # Ctrl-C between the write and the rename: no leftover either
                self._discard()
                raise
        self._discard()
        return False

    def _discard(self) -> None:
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


@dataclass
class Report:
    """A benchmark's result: a title, markdown sections, and PNG files written beside it."""

    title: str
    command: str = ""
    sections: list[tuple[str, str]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)

    def add(self, heading: str, body: str) -> None:
        self.sections.append((heading, body))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        if self.command:
            out += ["Made by:", "", "```", self.command, "```", ""]
        for heading, body in self.sections:
            out += [f"## {heading}", "", body, ""]
        for img in self.images:
            out += [f"![{Path(img).stem}]({Path(img).name})", ""]
        return "\n".join(out)

    def write(self, folder: str | os.PathLike, name: str = "report.md") -> Path:
        path = Path(folder) / name
        atomic_write_text(path, self.markdown())
        return path
