"""What one ML-EM run did: per-level calls, FLOPs expected and realised, the probabilities used."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["MLEMStats"]


@dataclass
class MLEMStats:
    """Filled by ``solver="mlem"`` when passed as ``stats=``; all FLOPs are totals over the batch.

    Example::

        >>> s = MLEMStats()
        >>> # fewstep.sample(finest, noise, solver="mlem", family=fam, nfe=50, stats=s)
        >>> s.flops_ratio != s.flops_ratio    # nan until a run fills it
        True
    """

    costs: list[float] = field(default_factory=list)
    probabilities: list[list[float]] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    batch: int = 0
    steps: int = 0
    flops: float = 0.0
    expected_flops: float = 0.0
    pilot_flops: float = 0.0
    pilot_variances: list[list[float]] | None = None
    seed: int | None = None

    def reset(self, costs, batch: int, steps: int) -> None:
        k = len(costs)
        self.costs = [float(c) for c in costs]
        self.probabilities = []
        self.calls = [0] * k
        self.rows = [0] * k
        self.batch = int(batch)
        self.steps = int(steps)
        self.flops = 0.0
        self.expected_flops = 0.0
        self.pilot_flops = 0.0
        self.pilot_variances = None
        self.seed = None

    def record(self, level: int, rows: int, pilot: bool = False) -> None:
        """One call of network ``level`` on ``rows`` samples."""
        flops = rows * self.costs[level]
        if pilot:
            self.pilot_flops += flops
            return
        self.calls[level] += 1
        self.rows[level] += rows
        self.flops += flops

    @property
    def single_model_flops(self) -> float:
        """FLOPs of the same steps with the finest model alone (Euler–Maruyama / DDIM)."""
        return self.batch * self.steps * (self.costs[-1] if self.costs else float("nan"))

    @property
    def flops_ratio(self) -> float:
        """Realised sampling FLOPs over :attr:`single_model_flops` (the pilot excluded)."""
        single = self.single_model_flops
        return self.flops / single if single and single == single else float("nan")

    def summary(self) -> str:
        per = ", ".join(f"L{j + 1}: {c} calls / {r} rows" for j, (c, r) in enumerate(zip(self.calls, self.rows)))
        return (f"{per}; FLOPs {self.flops:.3g} (expected {self.expected_flops:.3g}, pilot {self.pilot_flops:.3g}), "
                f"{self.flops_ratio:.3f}x the finest model alone")
