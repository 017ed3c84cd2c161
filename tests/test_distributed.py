"""torch.distributed with the gloo backend on CPU: two real processes on loopback."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fewstep import distributed, schedules, testbeds

F64 = torch.float64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    sch = schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000))
    return testbeds.mixtures()["gmm16"].model(sch, "eps")


def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    return distributed.context("gloo")


def _sample_worker(rank, world, port, out, solver):
    ctx = _init(rank, world, port)
    try:
        distributed.sample_job(_model(), num=11, batch_size=3, seed=7, out=out, ctx=ctx, dtype=F64,
                               solver=solver, nfe=6)
    finally:
        distributed.shutdown()


@pytest.mark.parametrize("solver", ["ddim", "sa"])
def test_sharded_sampling_equals_single_process(tmp_path, solver):
    if solver not in __import__("fewstep").solvers.available():
        pytest.fail(f"solver {solver} is not registered")
    single = distributed.sample_job(_model(), num=11, batch_size=3, seed=7, out=None, dtype=F64, solver=solver, nfe=6)
    out = tmp_path / "samples.pt"
    mp.spawn(_sample_worker, args=(2, _free_port(), str(out), solver), nprocs=2, join=True)
    merged = torch.load(out, weights_only=True)
    assert merged.shape == (11, 16)
    assert torch.equal(merged, single)
    index = (tmp_path / "samples.pt.shards" / "index.json").read_text()
    assert '"num": 11' in index


def test_restart_skips_finished_shards(tmp_path):
    out = tmp_path / "s.pt"
    model = _model()
    full = distributed.sample_job(model, num=10, batch_size=4, seed=1, out=out, dtype=F64, solver="ddim", nfe=5)
    # a killed job: one shard and the merged file never written
    (tmp_path / "s.pt.shards" / "batch-00001.pt").unlink()
    out.unlink()
    model.reset_counters()
    again = distributed.sample_job(model, num=10, batch_size=4, seed=1, out=out, dtype=F64, solver="ddim", nfe=5)
    assert torch.equal(full, again)
    assert model.nfe == 5  # only the missing batch was recomputed


def test_samples_do_not_depend_on_batch_size():
    model = _model()
    a = distributed.sample_job(model, num=7, batch_size=7, seed=3, out=None, dtype=F64, solver="ddim", nfe=5)
    b = distributed.sample_job(model, num=7, batch_size=2, seed=3, out=None, dtype=F64, solver="ddim", nfe=5)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)


def _grad_worker(rank, world, port, data, result):
    ctx = _init(rank, world, port)
    try:
        w = torch.nn.Parameter(torch.linspace(-1, 1, 4, dtype=F64))
        mine = data[rank::world]
        loss = ((mine @ w).sin() ** 2).mean()
        loss.backward()
        distributed.all_reduce_grads([w], weight=mine.shape[0] / data.shape[0], ctx=ctx)
        if rank == 0:
            result.copy_(w.grad)
    finally:
        distributed.shutdown()


def test_all_reduced_gradient_equals_single_process_gradient():
    data = torch.randn(10, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    w = torch.nn.Parameter(torch.linspace(-1, 1, 4, dtype=F64))
    ((data @ w).sin() ** 2).mean().backward()
    result = torch.zeros(4, dtype=F64).share_memory_()
    mp.spawn(_grad_worker, args=(2, _free_port(), data, result), nprocs=2, join=True)
    assert float((result - w.grad).abs().max()) < 1e-12


def test_bad_job_arguments():
    with pytest.raises(ValueError, match="num"):
        distributed.batches(0, 4)
    with pytest.raises(ValueError, match="batch_size"):
        distributed.batches(4, 0)
