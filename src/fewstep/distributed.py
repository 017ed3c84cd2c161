"""Scale out with ``torch.distributed``: sharded sampling with resumable shards, and gradient all-reduce.

Launch with the engine PyTorch users already run::

    torchrun --nproc-per-node 2 -m fewstep sample --model digits16 --num 10000 --out samples.pt

The work is a fixed list of batches of sample indices. Sample ``i`` draws its noise (and its SDE
noise) from its own generator seeded by ``(seed, i)``, and every batch is computed whole by one rank,
so the union of the ranks' outputs is *exactly* the single-process output (same batches, same
arithmetic). Each finished batch is written to ``<out>.shards/batch-NNNNN.pt`` (temp name, then
rename) and listed in ``index.json``; a restarted job skips the batches already on disk. Rank 0
merges the shards into the final file.

Example (single process, no torchrun needed)::

    >>> import torch, fewstep
    >>> from fewstep import schedules, testbeds, distributed
    >>> model = testbeds.Gaussian(0.0, 1.0, dim=2).model(schedules.EDM(), "x0")
    >>> x = distributed.sample_job(model, num=5, batch_size=2, seed=0, out=None, solver="ddim", nfe=4)
    >>> tuple(x.shape)
    (5, 2)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .bench.report import atomic_path, atomic_write_text

__all__ = ["Context", "context", "shutdown", "batches", "sample_generators", "sample_job", "all_reduce_grads"]


@dataclass(frozen=True)
class Context:
    """This process's place in the job: ``rank`` of ``world`` (1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def context(backend: str | None = None) -> Context:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ...).

    gloo on CPU, NCCL when CUDA is available; a plain single process gets ``Context(0, 1)``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context(0, 1)
    dist = torch.distributed
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return Context(dist.get_rank(), dist.get_world_size())


def shutdown() -> None:
    """Leave the process group if this process joined one (safe to call in any process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def batches(num: int, batch_size: int) -> list[range]:
    """The fixed list of batches (index ranges) a job of ``num`` samples is cut into."""
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num: expected a positive number of samples, got {num!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    return [range(s, min(s + batch_size, num)) for s in range(0, num, batch_size)]


def sample_generators(seed: int, indices: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per sample index, seeded from ``(seed, index)`` only (batch- and rank-invariant)."""
    gens = []
    for i in indices:
        g = torch.Generator(device=device)
        g.manual_seed((int(seed) * 1_000_003 + int(i)) % (2**63 - 1))
        gens.append(g)
    return gens


def _noise(shape, gens, dtype, device):
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype, device=device) for g in gens])


def sample_job(
    model,
    *,
    num: int,
    batch_size: int,
    seed: int,
    out: str | os.PathLike | None,
    ctx: Context | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = False,
    cond_for: Callable[[range], dict] | None = None,
    **sample_kwargs: Any,
) -> torch.Tensor | None:
    """Sample ``num`` samples in batches shared out over the ranks; rank 0 returns them all.

    Args:
        model: a :class:`fewstep.Model` with ``sample_shape`` set.
        out: the final ``.pt`` file (shards go to ``<out>.shards/``); ``None`` keeps everything in memory
            (single process only).
        cond_for: maps a batch's index range to the network's keyword arguments (e.g. labels).
        **sample_kwargs: passed to :func:`fewstep.sample` (``solver=``, ``nfe=``, ``grid=``, ...).

    Other ranks return ``None``. A restarted job skips the batches whose shard files exist.
    """
    from .sample import sample

    ctx = ctx or context()
    if model.sample_shape is None:
        raise ValueError("model: sample_shape must be set to draw noise (bundled models set it)")
    work = batches(num, batch_size)
    mine = [k for k in range(len(work)) if k % ctx.world == ctx.rank]
    shard_dir = None
    if out is None:
        if ctx.world > 1:
            raise ValueError("out: a distributed job needs an output file to gather its shards")
    else:
        shard_dir = Path(str(out) + ".shards")
        shard_dir.mkdir(parents=True, exist_ok=True)
    results: dict[int, torch.Tensor] = {}
    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc=f"batches (rank 0 of {ctx.world})", unit="batch")
    for k in mine:
        rows = work[k]
        shard = shard_dir / f"batch-{k:05d}.pt" if shard_dir is not None else None
        if shard is not None and shard.exists():
            if bar is not None:
                bar.update(1)
            continue  # finished before a restart
        gens = sample_generators(seed, rows, device)
        noise = _noise(model.sample_shape, gens, dtype, device)
        cond = cond_for(rows) if cond_for is not None else None
        x = sample(model, noise, generator=gens, cond=cond, **sample_kwargs)
        if shard is not None:
            with atomic_path(shard) as tmp:
                torch.save({"indices": list(rows), "samples": x.cpu()}, tmp)
        else:
            results[k] = x.cpu()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    ctx.barrier()
    if not ctx.is_main:
        return None
    if shard_dir is None:
        return torch.cat([results[k] for k in range(len(work))])
    parts = []
    index = []
    for k in range(len(work)):
        shard = shard_dir / f"batch-{k:05d}.pt"
        if not shard.exists():
            raise RuntimeError(f"shard {shard} is missing after all ranks finished; rerun the job to resume it")
        data = torch.load(shard, weights_only=True)
        parts.append(data["samples"])
        index.append({"file": shard.name, "indices": [work[k].start, work[k].stop]})
    atomic_write_text(shard_dir / "index.json", json.dumps({"num": num, "batch_size": batch_size, "seed": seed,
                                                            "shards": index}, indent=1))
    merged = torch.cat(parts)
    with atomic_path(out) as tmp:
        torch.save(merged, tmp)
    return merged


def all_reduce_grads(params: Sequence[torch.Tensor], weight: float, ctx: Context | None = None) -> None:
    """Data-parallel gradients: ``grad <- sum over ranks of (weight_rank * grad_rank)``.

    Each rank passes ``weight`` = its share of the global batch (local count / global count), so the
    result equals the gradient of the global mean loss computed in one process.
    """
    ctx = ctx or context()
    for p in params:
        if p.grad is None:
            continue
        p.grad.mul_(weight)
        if ctx.world > 1:
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
