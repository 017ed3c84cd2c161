"""Distributed sampling speed-up: N gloo processes against 1, one thread each, same job.

The model is a small convolutional network whose call costs at least 10 ms on one CPU thread (the
regime where sharding pays off; a testbed call is too cheap to measure anything but overhead). Both
runs sample the same batches with the same seeds and their outputs are checked equal.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp

from .report import Report, markdown_table

__all__ = ["add_arguments", "run"]


def add_arguments(p) -> None:
    p.add_argument("--procs", type=int, default=2, help="processes in the sharded run (default 2)")
    p.add_argument("--num", type=int, default=48, help="samples in the job")
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


def _worker(rank, world, port, out, num, batch_size, nfe, timing):
    from fewstep import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    ctx = distributed.context("gloo")
    model = _model()
    try:
        ctx.barrier()
        t0 = time.perf_counter()
        with torch.no_grad():
            distributed.sample_job(model, num=num, batch_size=batch_size, seed=0, out=out, ctx=ctx,
                                   solver="ddim", nfe=nfe)
        ctx.barrier()
        if rank == 0:
            timing[0] = time.perf_counter() - t0
    finally:
        distributed.shutdown()


def _timed_job(world, folder, args) -> tuple[float, torch.Tensor]:
    out = os.path.join(folder, f"world{world}.pt")
    timing = torch.zeros(1, dtype=torch.float64).share_memory_()
    mp.spawn(_worker, args=(world, _free_port(), out, args.num, args.batch_size, args.nfe, timing), nprocs=world,
             join=True)
    return float(timing[0]), torch.load(out, weights_only=True)


def run(args) -> Report:
    if args.procs < 2:
        raise ValueError(f"--procs: need at least 2 processes to measure a speed-up, got {args.procs}")
    torch.set_num_threads(1)
    model = _model()
    x = torch.randn(args.batch_size, 3, 32, 32)
    mt = torch.full((args.batch_size,), 500.0)
    with torch.no_grad():
        model.net(x, mt)
        t0 = time.perf_counter()
        for _ in range(5):
            model.net(x, mt)
    per_call_ms = (time.perf_counter() - t0) / 5 * 1e3
    with tempfile.TemporaryDirectory() as folder:
        t1, x1 = _timed_job(1, folder, args)
        tn, xn = _timed_job(args.procs, folder, args)
    same = torch.equal(x1, xn)
    rows = [
        ["1 process", f"{t1:.2f}", "1.00", "-"],
        [f"{args.procs} processes (gloo)", f"{tn:.2f}", f"{t1 / tn:.2f}", "yes" if same else "NO"],
    ]
    rep = Report("Distributed sampling speed-up")
    rep.add(
        "Set-up",
        f"{args.num} samples in batches of {args.batch_size}, `ddim` at NFE {args.nfe}, a conv net costing "
        f"{per_call_ms:.1f} ms per call on one thread; one thread per process; gloo backend on CPU.",
    )
    rep.add("Wall time", markdown_table(["run", "seconds", "speed-up", "identical samples"], rows))
    return rep
