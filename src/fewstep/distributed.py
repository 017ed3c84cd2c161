"""Scale out with ``torch.distributed``: sharded sampling with resumable shards, and gradient all-reduce.

Launch with the engine PyTorch users already run (guide: ``docs/guides/distributed.md``)::

    torchrun --standalone --nproc-per-node 2 -m fewstep sample --model digits16 --num 10000 --out samples.pt

The work is a fixed list of batches of sample indices (:func:`batches`, set by ``num`` and
``batch_size`` only, never by the number of processes). Sample ``i`` draws its noise, and its SDE
noise, from its own CPU generator seeded by ``(seed, i)``; its conditioning comes from a hook that
receives the batch's global indices; and every batch is computed whole by one rank (batch ``k`` by
rank ``k mod world``). So the union of the ranks' outputs is *exactly* the single-process output:
same batches, same noise, same arithmetic. Rank 0 gathers the other ranks' samples over the process
group (no shared filesystem needed) and returns them all.

With ``shards=DIR`` each finished batch is also written to ``DIR/batch-NNNNN.pt`` (temp name, then
rename) next to ``DIR/index.json`` (the job's parameters and its list of shards); a restarted job,
with any number of processes, skips the batches already on disk, and refuses a folder holding the
shards of a different job.

Example (single process, no torchrun needed)::

    >>> import torch, fewstep
    >>> from fewstep import schedules, testbeds, distributed
    >>> model = testbeds.Gaussian(0.0, 1.0, dim=2).model(schedules.EDM(), "x0")
    >>> x = distributed.sample_job(model, num=5, batch_size=2, seed=0, solver="ddim", nfe=4)
    >>> tuple(x.shape)
    (5, 2)
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .bench.report import atomic_path, atomic_write_text

__all__ = [
    "Context", "JobInfo", "context", "launched", "shutdown", "batches", "owned_batches", "sample_generators",
    "sample_job", "all_reduce_grads",
]


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


def _launched_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected an integer (torchrun sets it), got {os.environ['WORLD_SIZE']!r}") from None


def context(backend: str | None = None) -> Context:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ...).

    ``backend`` defaults to NCCL when CUDA is available, else gloo; with NCCL each rank takes the GPU
    numbered by its ``LOCAL_RANK`` (one device per rank). A plain single process (no ``WORLD_SIZE``,
    or 1) gets ``Context(0, 1)`` and no process group is created.

    Example::

        ctx = distributed.context()          # under torchrun: Context(rank=1, world=2), say
    """
    world = _launched_world()
    if world <= 1:
        return Context(0, 1)
    dist = torch.distributed
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not isinstance(backend, str):
            raise TypeError(f"backend: expected a name such as 'gloo' or 'nccl', got {type(backend).__name__}")
        if backend == "nccl":
            # torchrun numbers the processes of one node 0..nproc-1 in LOCAL_RANK: one GPU each
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return Context(dist.get_rank(), dist.get_world_size())


def shutdown() -> None:
    """Leave the process group if this process joined one (safe to call in any process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def launched(backend: str | None = None) -> Iterator[Context]:
    """:func:`context` for the length of a command: the group is left afterwards if this call joined it.

    A caller that already joined the group (a test, a notebook) keeps it.

    Example::

        with distributed.launched("gloo") as ctx:
            x = distributed.sample_job(model, num=1000, batch_size=100, seed=0, ctx=ctx, nfe=6)
    """
    joined_here = _launched_world() > 1 and not torch.distributed.is_initialized()
    ctx = context(backend)
    try:
        yield ctx
    finally:
        if joined_here:
            shutdown()


def batches(num: int, batch_size: int) -> list[range]:
    """The fixed list of batches (index ranges) a job of ``num`` samples is cut into."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num: expected a positive number of samples, got {num!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    return [range(s, min(s + batch_size, num)) for s in range(0, num, batch_size)]


def owned_batches(num_batches: int, rank: int, world: int) -> list[int]:
    """The batch numbers rank ``rank`` of ``world`` computes: ``k`` with ``k mod world == rank``."""
    return list(range(rank, num_batches, world))


def sample_generators(seed: int, indices: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per sample index, seeded from ``(seed, index)`` only (batch- and rank-invariant)."""
    gens = []
    for i in indices:
        g = torch.Generator(device=device)
        g.manual_seed((int(seed) * 1_000_003 + int(i)) % (2**63 - 1))
        gens.append(g)
    return gens


def _noise(shape, gens, dtype):
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in gens])


@dataclass
class JobInfo:
    """What :func:`sample_job` did, all ranks together (returned with ``return_info=True``)."""

    solver: str
    nfe: int  # network evaluations per sample trajectory
    calls: int  # network calls, all computed batches and ranks together
    batches: int  # batches in the job
    computed: int  # batches sampled by this run
    resumed: int  # batches found finished in the shard folder and not recomputed
    world: int


def sample_job(
    model,
    *,
    num: int,
    batch_size: int,
    seed: int,
    out: str | os.PathLike | None = None,
    shards: str | os.PathLike | None = None,
    ctx: Context | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = False,
    cond_for: Callable[[range], dict] | None = None,
    model_for: Callable[[range], Any] | None = None,
    describe: dict | None = None,
    return_info: bool = False,
    **sample_kwargs: Any,
):
    """Sample ``num`` samples in batches shared out over the ranks; rank 0 returns them all.

    Args:
        model: a :class:`fewstep.Model` with ``sample_shape`` set.
        num, batch_size, seed: the job; the output depends on these (and the sampling options) only,
            not on the number of processes.
        out: optional ``.pt`` file rank 0 writes the ``(num, *sample_shape)`` tensor to (atomically).
        shards: optional folder for per-batch shard files and ``index.json``, for resuming a killed job.
        ctx: the process group (default: :func:`context`, i.e. torchrun's if launched by it).
        dtype, device: of the noise and the samples (noise is always drawn on the CPU, so it is the
            same on every device).
        progress: a progress bar on rank 0 (network evaluations of the batches this rank computes).
        cond_for: maps a batch's global index range to extra network keyword arguments.
        model_for: maps a batch's global index range to the model to sample it with, e.g.
            ``lambda rows: zoo.conditioned(model, labels[rows.start:rows.stop], 2.0)``.
        describe: extra json-able entries identifying the job in ``index.json`` (default: the model name).
        return_info: also return a :class:`JobInfo` (on every rank).
        **sample_kwargs: passed to :func:`fewstep.sample` (``solver=``, ``nfe=``, ``grid=``, ...).

    Returns:
        On rank 0 the samples (on the CPU), on other ranks ``None``; with ``return_info`` a pair.
    """
    from .sample import sample

    ctx = ctx or context()
    if model.sample_shape is None:
        raise ValueError("model: sample_shape must be set to draw noise (bundled models set it)")
    if "generator" in sample_kwargs:
        raise ValueError("generator: sample_job seeds one generator per sample from `seed`; leave generator out")
    work = batches(num, batch_size)
    mine = owned_batches(len(work), ctx.rank, ctx.world)
    shard_dir = None
    if shards is not None:
        shard_dir = Path(shards)
        _open_shards(shard_dir, ctx, work, _job_record(model, num, batch_size, seed, dtype, sample_kwargs, describe))

    results: dict[int, torch.Tensor] = {}
    computed = resumed = calls = nfe_sum = 0
    solver_name = None
    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        todo = sum(1 for k in mine if shard_dir is None or not (shard_dir / _shard_name(k)).exists())
        nfe = sample_kwargs.get("nfe")
        if todo:
            bar = tqdm(total=todo * nfe if isinstance(nfe, int) else None, unit="nfe",
                       desc=f"sampling (rank 0 of {ctx.world})" if ctx.world > 1 else "sampling")
    try:
        for k in mine:
            rows = work[k]
            shard = shard_dir / _shard_name(k) if shard_dir is not None else None
            if shard is not None and shard.exists():
                results[k] = _load_shard(shard, rows)  # finished before a restart
                resumed += 1
                continue
            gens = sample_generators(seed, rows)
            noise = _noise(model.sample_shape, gens, dtype).to(device)
            m = model_for(rows) if model_for is not None else model
            extra = {"cond": cond_for(rows)} if cond_for is not None else {}
            x, info = sample(m, noise, generator=gens, progress=bar if bar is not None else False, return_info=True,
                             **extra, **sample_kwargs)
            x = x.cpu()
            if shard is not None:
                with atomic_path(shard) as tmp:
                    torch.save({"indices": [rows.start, rows.stop], "samples": x}, tmp)
            results[k] = x
            computed += 1
            calls += info.calls
            nfe_sum += info.nfe
            solver_name = info.solver
    finally:
        if bar is not None:
            bar.total = bar.n  # the budget is an upper bound: some solvers spend less
            bar.refresh()
            bar.close()

    merged = _gather(ctx, work, mine, results, (*model.sample_shape,), dtype)
    totals = _sum_over_ranks(ctx, [computed, resumed, calls, nfe_sum])
    # every batch spends the same evaluations; a fully resumed job reports the budget it was run with
    nfe = totals[3] // totals[0] if totals[0] else int(sample_kwargs.get("nfe") or 0)
    info = JobInfo(solver=solver_name or _solver_name(sample_kwargs), nfe=nfe,
                   calls=totals[2], batches=len(work), computed=totals[0], resumed=totals[1], world=ctx.world)
    if ctx.is_main:
        if shard_dir is not None:
            _close_shards(shard_dir, work, merged)
        if out is not None:
            with atomic_path(out) as tmp:
                torch.save(merged, tmp)
    return (merged, info) if return_info else merged


# ---------------------------------------------------------------------------------------- shards

def _shard_name(k: int) -> str:
    return f"batch-{k:05d}.pt"


def _plain(value):
    """A json-able, run-to-run stable description of a sampling option (for comparing jobs)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "name") and hasattr(value, "opts"):  # a Solver instance
        return {"solver": value.name, "options": _plain(dict(value.opts))}
    return getattr(value, "__qualname__", type(value).__name__)


def _job_record(model, num, batch_size, seed, dtype, sample_kwargs, describe) -> dict:
    record = {"num": num, "batch_size": batch_size, "seed": int(seed), "dtype": _plain(dtype),
              "sample": {k: _plain(v) for k, v in sorted(sample_kwargs.items()) if k not in ("callback",)}}
    record.update(_plain(describe) if describe is not None else {"model": getattr(model, "name", None)})
    return json.loads(json.dumps(record))  # the form it has when read back from index.json


def _differing(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The (dotted) keys whose values differ between two job records."""
    names = []
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            names += _differing(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            names.append(prefix + key)
    return names


def _index(work: Sequence[range]) -> list[dict]:
    return [{"file": _shard_name(k), "indices": [r.start, r.stop]} for k, r in enumerate(work)]


def _open_shards(folder: Path, ctx: Context, work, job: dict) -> None:
    """Check that ``folder`` is empty or holds this very job, and record the job in ``index.json``."""
    index_file = folder / "index.json"
    if index_file.exists():
        try:
            recorded = json.loads(index_file.read_text()).get("job")
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(f"shards: {index_file} is not a fewstep shard index; use another folder") from None
        if recorded != job:
            differ = _differing(recorded if isinstance(recorded, dict) else {}, job)
            raise ValueError(f"shards: {folder} holds the shards of a different job (differing: {', '.join(differ)}); "
                             "use a new folder, or delete this one to start over")
    else:
        if folder.exists() and any(folder.glob("batch-*.pt")):
            raise ValueError(f"shards: {folder} holds shard files but no index.json; use a new folder")
        folder.mkdir(parents=True, exist_ok=True)
        # every rank writes the same text (atomically): on nodes without a shared filesystem each
        # node's folder gets its own copy
        atomic_write_text(index_file, json.dumps({"job": job, "complete": False, "shards": _index(work)}, indent=1))
    ctx.barrier()  # no rank samples before every rank has checked the folder


def _load_shard(path: Path, rows: range) -> torch.Tensor:
    data = torch.load(path, weights_only=True)
    if list(data.get("indices", [])) != [rows.start, rows.stop]:
        raise ValueError(f"shards: {path} holds samples {data.get('indices')}, expected [{rows.start}, {rows.stop}]")
    return data["samples"]


def _close_shards(folder: Path, work, merged: torch.Tensor) -> None:
    # shards computed on other nodes (no shared filesystem) arrive here over the process group:
    # write them too, so that rank 0's folder alone holds the whole job
    for k, rows in enumerate(work):
        shard = folder / _shard_name(k)
        if not shard.exists():
            with atomic_path(shard) as tmp:
                torch.save({"indices": [rows.start, rows.stop], "samples": merged[rows.start:rows.stop].clone()}, tmp)
    index = json.loads((folder / "index.json").read_text())
    index["complete"] = True
    atomic_write_text(folder / "index.json", json.dumps(index, indent=1))


# ---------------------------------------------------------------------------------- collectives

def _comm_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo moves CPU tensors
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather(ctx: Context, work, mine, results, shape, dtype) -> torch.Tensor | None:
    """Rank 0 receives each rank's batches (one message per rank) and puts them in index order."""
    if ctx.world == 1:
        return torch.cat([results[k] for k in range(len(work))])
    dist = torch.distributed
    comm = _comm_device()
    if not ctx.is_main:
        if mine:  # both sides know the sizes: they follow from (num, batch_size, rank, world)
            dist.send(torch.cat([results[k] for k in mine]).to(device=comm, dtype=dtype).contiguous(), dst=0)
        return None
    parts = dict(results)
    for r in range(1, ctx.world):
        owned = owned_batches(len(work), r, ctx.world)
        if not owned:
            continue
        buf = torch.empty((sum(len(work[k]) for k in owned), *shape), dtype=dtype, device=comm)
        dist.recv(buf, src=r)
        buf = buf.cpu()
        offset = 0
        for k in owned:
            parts[k] = buf[offset:offset + len(work[k])]
            offset += len(work[k])
    return torch.cat([parts[k] for k in range(len(work))])


def _sum_over_ranks(ctx: Context, values: list[int]) -> list[int]:
    if ctx.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=_comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return [int(v) for v in t.cpu()]


def _solver_name(sample_kwargs) -> str:
    """The solver's name when this rank sampled nothing (all its batches were resumed)."""
    from .sample import recommended
    from .solvers import get as get_solver

    solver = sample_kwargs.get("solver")
    if solver is None and isinstance(sample_kwargs.get("nfe"), int):
        return recommended(sample_kwargs["nfe"])[0]
    if isinstance(solver, str):
        try:
            return get_solver(solver).name
        except (TypeError, ValueError):
            return solver
    return getattr(solver, "name", str(solver))


def all_reduce_grads(params: Sequence[torch.Tensor], weight: float, ctx: Context | None = None) -> None:
    """Data-parallel gradients: ``grad <- sum over ranks of (weight_rank * grad_rank)``.

    Each rank passes ``weight`` = its share of the global batch (local count / global count), so the
    result equals the gradient of the global mean loss computed in one process.

    Example::

        loss_on_my_shard.backward()
        distributed.all_reduce_grads(model.parameters(), weight=len(my_shard) / total, ctx=ctx)
    """
    ctx = ctx or context()
    for p in params:
        if p.grad is None:
            continue
        p.grad.mul_(weight)
        if ctx.world > 1:
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
