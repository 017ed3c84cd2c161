"""torch.distributed with the gloo backend on CPU: two real processes on loopback."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fewstep import distributed, schedules, testbeds, zoo
from fewstep.cli import main

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
        distributed.sample_job(_model(), num=11, batch_size=3, seed=7, out=out, shards=out + ".shards", ctx=ctx,
                               dtype=F64, solver=solver, nfe=6)
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
    index = json.loads((tmp_path / "samples.pt.shards" / "index.json").read_text())
    assert index["job"]["num"] == 11 and index["complete"] is True
    assert [s["indices"] for s in index["shards"]] == [[0, 3], [3, 6], [6, 9], [9, 11]]


def test_restart_skips_finished_shards(tmp_path):
    out, shards = tmp_path / "s.pt", tmp_path / "shards"
    model = _model()
    job = dict(num=10, batch_size=4, seed=1, out=out, shards=shards, dtype=F64, solver="ddim", nfe=5)
    full = distributed.sample_job(model, **job)
    # a killed job: one shard and the merged file never written
    (shards / "batch-00001.pt").unlink()
    out.unlink()
    model.reset_counters()
    again, info = distributed.sample_job(model, return_info=True, **job)
    assert torch.equal(full, again) and torch.equal(torch.load(out, weights_only=True), full)
    assert model.nfe == 5  # only the missing batch was recomputed
    assert (info.computed, info.resumed, info.batches, info.nfe) == (1, 2, 3, 5)
    with pytest.raises(ValueError, match=r"shards: .* different job \(differing: sample\.nfe\)"):
        distributed.sample_job(model, **{**job, "nfe": 6})


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
    with pytest.raises(ValueError, match="generator: sample_job seeds one generator per sample"):
        distributed.sample_job(_model(), num=2, batch_size=2, seed=0, nfe=4, generator=torch.Generator())
    assert distributed.owned_batches(5, 1, 2) == [1, 3] and distributed.owned_batches(1, 1, 2) == []


# ------------------------------------------------------------------- `fewstep sample` under torchrun

_REAL_LOAD = zoo.load


class _SimulatedKill(RuntimeError):
    pass


class _CountingNet:
    """Wraps the loaded network: counts calls, and dies like a killed job after ``fail_after`` calls."""

    def __init__(self, fail_after=None):
        self.net, self.calls, self.fail_after = None, 0, fail_after

    def __call__(self, x, t, **cond):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise _SimulatedKill("simulated kill")
        self.calls += 1
        return self.net(x, t, **cond)

    def load(self, name, **kw):
        model = _REAL_LOAD(name, **kw)
        self.net, model.net = model.net, self
        return model


# conditional digits16, a label per sample (cycled 0..9), guidance, a stochastic solver (SDE noise per sample)
SAMPLE_ARGS = ["sample", "--model", "digits16", "--solver", "sa", "--nfe", "4", "--label", "all", "--guidance", "2",
               "--seed", "5", "-n", "11", "--batch-size", "3", "--no-progress"]


def _with(argv, flag, value):
    """``argv`` with the value after ``flag`` replaced."""
    i = argv.index(flag)
    return argv[:i + 1] + [value] + argv[i + 2:]


def _cli_worker(rank, world, port, argvs, calls):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    counter = _CountingNet()
    zoo.load = counter.load  # this spawned process only
    try:
        for argv in argvs:
            assert main(argv) == 0
        calls[rank] = counter.calls
    finally:
        distributed.shutdown()


def _spawn_cli(argvs, world=2):
    calls = torch.zeros(world, dtype=torch.int64).share_memory_()
    mp.spawn(_cli_worker, args=(world, _free_port(), argvs, calls), nprocs=world, join=True)
    return calls.tolist()


def test_sample_command_under_two_processes_writes_the_single_process_files(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    counter = _CountingNet()
    monkeypatch.setattr(zoo, "load", counter.load)
    assert main(SAMPLE_ARGS + ["--out", str(tmp_path / "one.pt")]) == 0
    assert main(SAMPLE_ARGS + ["--out", str(tmp_path / "one.png")]) == 0
    assert not torch.distributed.is_initialized()  # a plain process creates no process group
    single_calls = counter.calls
    calls = _spawn_cli([SAMPLE_ARGS + ["--out", str(tmp_path / "two.pt")],
                        SAMPLE_ARGS + ["--out", str(tmp_path / "two.png")]])
    one, two = torch.load(tmp_path / "one.pt", weights_only=True), torch.load(tmp_path / "two.pt", weights_only=True)
    assert one.shape == (11, 1, 16, 16)
    assert torch.equal(one, two)
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()
    # 4 batches of 3: each rank sampled 2 of them, half the network calls of one process
    assert single_calls > 0 and calls == [single_calls // 2, single_calls // 2]
    # sample i keeps its label and noise whatever batch it is in: one batch of 11 agrees up to the
    # network's float32 rounding in a larger batch (7e-5 measured); a shifted label or seed moves
    # every sample by more than 1.7 at some pixel
    assert main(_with(SAMPLE_ARGS, "--batch-size", "11") + ["--out", str(tmp_path / "whole.pt")]) == 0
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    (tmp_path / "whole.pt").unlink()
    assert float((whole - one).abs().max()) < 1e-2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "one.pt", "two.png", "two.pt"]  # no temp files


def test_killed_sample_command_resumes_on_two_processes_without_redoing_finished_shards(tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    shards = tmp_path / "shards"
    counter = _CountingNet()
    monkeypatch.setattr(zoo, "load", counter.load)
    assert main(SAMPLE_ARGS + ["--out", str(tmp_path / "reference.pt")]) == 0
    per_batch = counter.calls // 4
    assert per_batch * 4 == counter.calls

    # killed in the middle of its third batch (one process)
    killer = _CountingNet(fail_after=2 * per_batch + 1)
    monkeypatch.setattr(zoo, "load", killer.load)
    out = tmp_path / "out.pt"
    with pytest.raises(_SimulatedKill):
        main(SAMPLE_ARGS + ["--out", str(out), "--shards", str(shards)])
    assert sorted(p.name for p in shards.iterdir()) == ["batch-00000.pt", "batch-00001.pt", "index.json"]
    assert not out.exists()
    finished = {name: (shards / name).stat().st_mtime_ns for name in ("batch-00000.pt", "batch-00001.pt")}

    # rerun on 2 processes: rank 0 owns batches 0 and 2, rank 1 owns 1 and 3; only 2 and 3 are sampled
    calls = _spawn_cli([SAMPLE_ARGS + ["--out", str(out), "--shards", str(shards)]])
    assert calls == [per_batch, per_batch]
    assert {name: (shards / name).stat().st_mtime_ns for name in finished} == finished
    assert torch.equal(torch.load(out, weights_only=True), torch.load(tmp_path / "reference.pt", weights_only=True))
    index = json.loads((shards / "index.json").read_text())
    assert index["complete"] is True and len(index["shards"]) == 4
    assert index["job"]["label"] == "all" and index["job"]["guidance"] == 2.0

    # the same folder with another job's arguments is refused, naming what differs
    assert main(_with(SAMPLE_ARGS, "--guidance", "3") + ["--out", str(out), "--shards", str(shards)]) == 2
    assert "holds the shards of a different job (differing: guidance)" in capsys.readouterr().err


# ------------------------------------------------------------------- `fewstep bench` under torchrun

def _bench_worker(rank, world, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    try:
        argv = ["bench", "distributed", "-n", "4", "--batch-size", "2", "--nfe", "2", "--out", f"{folder}/rank{rank}"]
        assert main(argv) == 0
    finally:
        distributed.shutdown()


def test_bench_distributed_under_two_ranks_reports_on_rank_0_only(tmp_path):
    mp.spawn(_bench_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [p.name for p in tmp_path.iterdir()] == ["rank0"]
    report = (tmp_path / "rank0" / "report.md").read_text()
    assert "2 ranks launched by torchrun" in report
    row = next(line for line in report.splitlines() if line.startswith("| 2 processes (gloo)"))
    assert row.endswith("| yes |")


def test_bench_refuses_a_one_process_benchmark_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["bench", "order"]) == 2
    err = capsys.readouterr().err
    assert "bench order: runs in one process; launch it without torchrun" in err
    assert "run under torchrun: distributed" in err
    assert not torch.distributed.is_initialized()
