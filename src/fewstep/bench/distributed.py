"""Distributed sampling speed-up: N gloo processes against 1, one thread each, same job.

The model is a small convolutional network whose call costs at least 10 ms on one CPU thread (the
regime where sharding pays off; a testbed call is too cheap to measure anything but overhead). Both
runs sample the same batches with the same seeds and their outputs are checked equal.

Two ways to run it:

* ``fewstep bench distributed --procs 2``: spawns its own 1 and N processes on this machine.
* ``torchrun --nproc-per-node N [--nnodes ...] -m fewstep bench distributed``: the sharded run is
  torchrun's world (all nodes); rank 0 first runs the 1-process baseline alone while the other
  ranks wait at a barrier, then writes the report.
"""
from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp

from .report import Report, markdown_table

__all__ = ["add_arguments", "run", "SHARDED"]

#: Runs under torchrun (``fewstep bench`` refuses the benchmarks without this flag there).
SHARDED = True


def add_arguments(p) -> None:
    p.add_argument("--procs", type=int, default=2, help="processes in the sharded run (default 2)")
    # -n as well: under torchrun, `--num` collides with torchrun's own --numa-binding
    p.add_argument("-n", "--num", type=int, default=48, help="samples in the job")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--nfe", type=int, default=8)


class _ConvNet(torch.nn.Module):
    """A fixed random conv net (about 10-20 ms per call at batch 4, 3x32x32, one thread)."""

    def __init__(self, width: int = 96, depth: int = 6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        layers = [torch.nn.Conv2d(3, width, 3, padding=1)]
        for _ in range(depth - 2):
            layers += [torch.nn.SiLU(), torch.nn.Conv2d(width, width, 3, padding=1)]
        layers += [torch.nn.SiLU(), torch.nn.Conv2d(width, 3, 3, padding=1)]
        self.body = torch.nn.Sequential(*layers)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)

    def forward(self, x, t):
        return self.body(x) * 0.1


def _model():
    import fewstep
    from fewstep import schedules

    net = _ConvNet().eval()
    sch = schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000))
    return fewstep.Model(net, schedule=sch, prediction="eps", sample_shape=(3, 32, 32))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_seconds(ctx, model, args, out) -> float:
    """Wall time of the whole job on ``ctx``'s ranks (all start together; gathering included)."""
    from fewstep import distributed

    ctx.barrier()
    t0 = time.perf_counter()
    with torch.no_grad():
        distributed.sample_job(model, num=args.num, batch_size=args.batch_size, seed=0, out=out, ctx=ctx,
                               solver="ddim", nfe=args.nfe)
    ctx.barrier()
    return time.perf_counter() - t0


def _worker(rank, world, port, out, args, timing):
    from fewstep import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        ctx = distributed.context("gloo")
        seconds = _sharded_seconds(ctx, _model(), args, out)
        if rank == 0:
            timing[0] = seconds
    finally:
        distributed.shutdown()


def _timed_job(world, folder, args) -> tuple[float, torch.Tensor]:
    out = os.path.join(folder, f"world{world}.pt")
    timing = torch.zeros(1, dtype=torch.float64).share_memory_()
    # only the job's numbers travel to the children (the parsed arguments hold the benchmark module)
    job = argparse.Namespace(num=args.num, batch_size=args.batch_size, nfe=args.nfe)
    mp.spawn(_worker, args=(world, _free_port(), out, job, timing), nprocs=world, join=True)
    return float(timing[0]), torch.load(out, weights_only=True)


def _under_torchrun(args) -> tuple[float, torch.Tensor, float, torch.Tensor, int] | None:
    """Baseline on rank 0 alone, then the job on every rank; ``None`` on ranks other than 0."""
    from fewstep import distributed

    with distributed.launched("gloo") as ctx:
        model = _model()
        with tempfile.TemporaryDirectory() as folder:
            t1 = x1 = None
            if ctx.is_main:
                out = os.path.join(folder, "world1.pt")
                t1 = _sharded_seconds(distributed.Context(0, 1), model, args, out)
                x1 = torch.load(out, weights_only=True)
            ctx.barrier()  # the other ranks wait here while rank 0 runs the baseline
            out = os.path.join(folder, f"world{ctx.world}.pt")  # written by rank 0 only
            tn = _sharded_seconds(ctx, model, args, out)
            if not ctx.is_main:
                return None
            return t1, x1, tn, torch.load(out, weights_only=True), ctx.world


def _call_ms(model, batch_size: int) -> float:
    x = torch.randn(batch_size, 3, 32, 32)
    mt = torch.full((batch_size,), 500.0)
    with torch.no_grad():
        model.net(x, mt)
        t0 = time.perf_counter()
        for _ in range(5):
            model.net(x, mt)
    return (time.perf_counter() - t0) / 5 * 1e3


def run(args) -> Report | None:
    """The report (rank 0, or a plain process); ``None`` on the other torchrun ranks."""
    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        measured = _under_torchrun(args)
        if measured is None:
            return None
        t1, x1, tn, xn, world = measured
        how = f"{world} ranks launched by torchrun"
    else:
        if args.procs < 2:
            raise ValueError(f"--procs: need at least 2 processes to measure a speed-up, got {args.procs}")
        with tempfile.TemporaryDirectory() as folder:
            t1, x1 = _timed_job(1, folder, args)
            tn, xn = _timed_job(args.procs, folder, args)
        world = args.procs
        how = f"{world} processes spawned on this machine"
    per_call_ms = _call_ms(_model(), args.batch_size)
    same = torch.equal(x1, xn)
    rows = [
        ["1 process", f"{t1:.2f}", "1.00", "-"],
        [f"{world} processes (gloo)", f"{tn:.2f}", f"{t1 / tn:.2f}", "yes" if same else "NO"],
    ]
    rep = Report("Distributed sampling speed-up")
    rep.add(
        "Set-up",
        f"{args.num} samples in batches of {args.batch_size}, `ddim` at NFE {args.nfe}, a conv net costing "
        f"{per_call_ms:.1f} ms per call on one thread; one thread per process; gloo backend on CPU; {how}.",
    )
    rep.add("Wall time", markdown_table(["run", "seconds", "speed-up", "identical samples"], rows))
    return rep
