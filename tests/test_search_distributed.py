"""Data-parallel solver search (torchrun ... -m fewstep search): two gloo processes on the CPU must
see the loss and gradient one process sees on the same total noise, take the same steps, and write
the same file."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from fewstep import schedules, testbeds
from fewstep.distributed import Context
from fewstep.search import fileformat, loop, parameterisation as P, rollout as R, save, teacher as T

F64 = torch.float64
WORLD = 2
SAMPLES, VAL_SAMPLES, NFE = 30, 10, 4  # 30 = 15 + 15: the ranks' shards differ from a split in halves


def _problem():
    """A 3-D two-component mixture on diffusers' linear betas, with its exact flow map as teacher end."""
    sch = schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=F64))
    gm = testbeds.GaussianMixture([[0.6, 0.2, 0.0], [-0.5, -0.3, 0.2]], [0.6, 0.4], 0.35)
    model = R.differentiable_testbed(gm, sch)
    return sch, gm, model


def _params(sch):
    """Parameters away from any training-free solver, so every gradient entry is non-trivial."""
    g = torch.Generator().manual_seed(7)
    return P.SolverParameters("x0", 2, torch.randn(NFE, generator=g, dtype=F64),
                              0.2 * torch.randn(NFE, NFE, generator=g, dtype=F64),
                              0.05 * torch.randn(NFE, generator=g, dtype=F64))


def _search(model, gm, sch, ctx=None):
    return loop.search(model, NFE, samples=SAMPLES, val_samples=VAL_SAMPLES, iterations=12, teacher_steps=24,
                       starts=1, eval_every=4, exact_end=lambda n: gm.reference(n, sch), exact_name="exact-3d",
                       use_cache=False, ctx=ctx)


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                                         world_size=world)
    try:
        ctx = Context(rank, world)
        sch, gm, model = _problem()
        noise = loop.search_noise(SAMPLES, (3,), seed=0)
        mine = loop.shard(SAMPLES, ctx)
        # this rank's teacher trajectories only, as the search computes them
        traj = T.solve(model, noise[mine], 24, exact_end=lambda n: gm.reference(n, sch))
        loss, grads = loop.training_loss(model, _params(sch), noise[mine], traj, global_samples=SAMPLES, ctx=ctx)
        res = _search(model, gm, sch, ctx)
        if ctx.is_main:
            save(os.path.join(folder, "searched.safetensors"), res, model, model_name="two-process")
        torch.save({"mine": mine, "loss": loss, "grads": grads, "val_rmse": res.val_rmse,
                    "train_rmse": res.train_rmse, "evals": res.iterations,
                    "params": [t.detach() for t in res.params.tensors()]},
                   os.path.join(folder, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search-gloo")
    mp.spawn(_worker, args=(WORLD, str(folder)), nprocs=WORLD, join=True)
    return folder, [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


def test_sharded_gradient_equals_the_single_process_gradient(two_process_run):
    _, ranks = two_process_run
    sch, gm, model = _problem()
    noise = loop.search_noise(SAMPLES, (3,), seed=0)
    traj = T.solve(model, noise, 24, exact_end=lambda n: gm.reference(n, sch))
    loss, grads = loop.training_loss(model, _params(sch), noise, traj)
    # the ranks held disjoint samples covering the set
    assert sorted(torch.cat([r["mine"] for r in ranks]).tolist()) == list(range(SAMPLES))
    assert [r["mine"].numel() for r in ranks] == [15, 15]
    for r in ranks:
        assert r["loss"] == pytest.approx(loss, rel=1e-12)
        for got, want in zip(r["grads"], grads):
            assert float(want.abs().max()) > 1e-6  # a real gradient, not zeros
            assert float((got - want).abs().max()) <= 1e-6 * max(1.0, float(want.abs().max()))
            assert float((got - want).abs().max()) <= 1e-12 * max(1.0, float(want.abs().max()))


def test_two_process_search_equals_the_single_process_search(two_process_run):
    folder, ranks = two_process_run
    sch, gm, model = _problem()
    single = _search(model, gm, sch)
    # every rank took the same steps: identical parameters on both
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)
    assert ranks[0]["evals"] == ranks[1]["evals"] == single.iterations
    written = fileformat.load(folder / "searched.safetensors")
    assert written.model == "two-process" and written.search["samples"] == SAMPLES
    assert math.isclose(written.search["val_rmse"], single.val_rmse, rel_tol=1e-9)
    assert math.isclose(written.search["train_rmse"], single.train_rmse, rel_tol=1e-9)
    for got, want in zip(written.params.tensors(), single.params.tensors()):
        assert float((got - want.detach()).abs().max()) < 1e-9
    assert single.val_rmse < single.val_rmse_init  # the search did move
