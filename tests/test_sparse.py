"""Spatially sparse inference (fewstep.sparse): exactness, masks, bad input, the edit pipeline, the CLI."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fewstep
from fewstep import sparse
from fewstep.sparse import MaskPlan, MissingCacheError, SparseEngine, UnsupportedLayerError, UnsupportedOperation
from fewstep.sparse.edit import EditSession, edit_grid
from fewstep.zoo.unet import SelfAttention, UNet, UNetConfig

from diffusers import UNet2DModel  # a dev dependency
from diffusers.models.attention_processor import Attention


# ------------------------------------------------------------------------------------ networks
def _randomize(net: nn.Module, seed: int) -> nn.Module:
    # zoo UNets start with zero output layers; random weights everywhere make every path count
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() > 1 else 0.3))
    return net.eval()


def unet2d(seed=0):
    net = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                      block_out_channels=(16, 32, 32), norm_num_groups=4, attention_head_dim=8,
                      down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    net = _randomize(net, seed)
    t = torch.tensor([300.0, 300.0])
    return net, lambda x: net(x, t[: x.shape[0]]).sample


def fewstep_unet(seed=0):
    net = _randomize(UNet(UNetConfig(in_channels=3, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
                                     attention_levels=(1,), num_classes=10, groups=4)), seed)
    t, label = torch.tensor([250.0, 700.0]), torch.tensor([3, 10])
    return net, lambda x: net(x, t[: x.shape[0]], label=label[: x.shape[0]])


class Ladder(nn.Module):
    """Down-sampling, up-sampling, a skip concatenation and GroupNorm, no attention."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        h = F.silu(self.norm(self.conv_in(x)))
        m = self.mid(F.silu(self.down(h))) + 0.5
        u = self.up(F.interpolate(m, scale_factor=2.0, mode="nearest"))
        return self.out(torch.cat([u, h], dim=1))


def rect_mask(top, left, h, w, size=32):
    m = torch.zeros(size, size, dtype=torch.bool)
    m[top:top + h, left:left + w] = True
    return m


def scattered_mask(seed, n=3, size=32):
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(size * size, dtype=torch.bool)
    m[torch.randperm(size * size, generator=g)[:n]] = True
    return m.view(size, size)


def edited_input(x, mask, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.where(mask, x + torch.randn(x.shape, generator=g), x)


# ------------------------------------------------------------------------------ the reference
_REFERENCE_KINDS = (nn.Conv2d, nn.GroupNorm, nn.AvgPool2d, nn.MaxPool2d, nn.BatchNorm2d, Attention, SelfAttention)


def _first(args, kwargs):
    return args[0] if args else kwargs.get("hidden_states")


def masked_dense_reference(net, call, x_orig, x_edit, trace):
    """An independent dense computation of what sparse mode promises (see fewstep.sparse.engine):
    run ``x_edit`` densely with every GroupNorm using the original run's statistics, and the input of
    every layer in ``trace`` replaced by the original run's input outside that layer's traced mask."""
    names = {m: n for n, m in net.named_modules()}
    captured, counts, handles = {}, {}, []

    def capture(m, args, kwargs):
        n = names[m]
        k = counts.get(n, 0)
        counts[n] = k + 1
        captured[(n, k)] = _first(args, kwargs).detach().clone()

    for m in net.modules():
        if isinstance(m, _REFERENCE_KINDS):
            handles.append(m.register_forward_pre_hook(capture, with_kwargs=True))
    with torch.no_grad():
        out_orig = call(x_orig)
    for h in handles:
        h.remove()
    handles.clear()
    counts.clear()

    def blend(m, args, kwargs):
        n = names[m]
        k = counts.get(n, 0)
        counts[n] = k + 1
        mask = trace.get((n, k), trace.get((n, k, 0)))
        if mask is None:
            return None
        x = _first(args, kwargs)
        xb = torch.where(mask, x, captured[(n, k)])
        if args:
            return (xb,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": xb}

    def original_statistics(m, args, out):
        xo = captured[(names[m], counts[names[m]] - 1)].double()
        b, c = xo.shape[:2]
        var, mean = torch.var_mean(xo.reshape(b, m.num_groups, -1), dim=2, unbiased=False)
        per = c // m.num_groups
        scale = m.weight.double() * (var + m.eps).rsqrt().repeat_interleave(per, 1)
        shift = m.bias.double() - mean.repeat_interleave(per, 1) * scale
        view = (b, c) + (1,) * (args[0].dim() - 2)
        return (args[0].double() * scale.view(view) + shift.view(view)).to(out.dtype)

    for m in net.modules():
        if isinstance(m, _REFERENCE_KINDS):
            handles.append(m.register_forward_pre_hook(blend, with_kwargs=True))
        if isinstance(m, nn.GroupNorm):
            handles.append(m.register_forward_hook(original_statistics))
    with torch.no_grad():
        out = call(x_edit)
    for h in handles:
        h.remove()
    if "<output>" in trace:
        out = torch.where(trace["<output>"], out, out_orig)
    return out, out_orig


def run_engine(net, call, x, xe, mask, **options):
    with SparseEngine(net, **options) as engine:
        engine.record_trace = True
        with torch.no_grad():
            with engine.full():
                y_full = call(x)
            with engine.sparse(mask):
                y_sparse = call(xe)
        return y_full, y_sparse, engine.report(), dict(engine.trace)


# --------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("builder", [unet2d, fewstep_unet], ids=["diffusers-UNet2DModel", "fewstep-UNet"])
@pytest.mark.parametrize("mask_kind", ["rectangle", "scattered"])
def test_sparse_equals_masked_dense_reference(builder, mask_kind):
    net, call = builder(seed=0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    mask = rect_mask(5, 19, 4, 7) if mask_kind == "rectangle" else scattered_mask(3)
    xe = edited_input(x, mask)
    y_full, y_sparse, report, trace = run_engine(net, call, x, xe, mask, tile=4, dilation=1)
    ref, orig = masked_dense_reference(net, call, x, xe, trace)
    assert (y_full - orig).abs().max().item() == 0.0  # full mode is the unmodified network
    assert (y_sparse - ref).abs().max().item() < 1e-4
    # the test is not vacuous: the edit changed the output, and work was skipped at every sparse level
    assert (y_sparse - orig).abs().max().item() > 1e-2
    sparse_levels = [r for r in report["resolutions"] if not r["dense"]]
    assert {r["height"] for r in sparse_levels} >= {32, 16}
    assert all(0 < r["fraction"] < 0.5 for r in sparse_levels if r["height"] == 32)
    assert report["macs"] < 0.5 * report["dense_macs"]
    assert report["fallbacks"] == {}
    kinds = report["converted"]
    assert kinds["attention"] >= 2 and kinds["conv"] >= 20 and kinds["norm"] >= 10


def test_unchanged_input_reproduces_the_cached_output():
    net, call = unet2d(seed=1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    _, y_sparse, _, _ = run_engine(net, call, x, x.clone(), rect_mask(8, 8, 9, 9), tile=4, dilation=2)
    with torch.no_grad():
        y = call(x)
    assert (y_sparse - y).abs().max().item() < 1e-5


def test_empty_mask_returns_the_cached_output_without_work():
    net, call = fewstep_unet(seed=3)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    y_full, y_sparse, report, _ = run_engine(net, call, x, x + 1.0, torch.zeros(32, 32, dtype=torch.bool))
    assert torch.equal(y_sparse, y_full)
    assert report["macs"] == 0 and report["dense_macs"] > 0


def test_margin_covering_the_reach_equals_dense_with_original_statistics():
    net = _randomize(Ladder(), 3)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    mask = rect_mask(30, 31, 2, 3, size=64)
    xe = edited_input(x, mask)
    # the change spreads 1 px per 3x3 convolution: 3 px at 32x32, then 2 * 3 + 1 at 64x64
    _, y_sparse, report, _ = run_engine(net, net, x, xe, mask, tile=4, dilation={64: 8, 32: 4}, dense_fraction=1.0)
    assert [(r["height"], r["fraction"] < 0.3) for r in report["resolutions"]] == [(64, True), (32, True)]
    # dense run with the GroupNorm statistics of the original input, nothing masked
    stats = {}
    h = net.norm.register_forward_pre_hook(lambda m, a: stats.setdefault("x", a[0].detach()))
    with torch.no_grad():
        net(x)
    h.remove()
    scale, shift = sparse.group_norm_affine(stats["x"], net.norm)
    h = net.norm.register_forward_hook(lambda m, a, o: a[0] * scale[..., None, None] + shift[..., None, None])
    with torch.no_grad():
        reference = net(xe)
    h.remove()
    assert (y_sparse - reference).abs().max().item() < 1e-5
    assert (reference - net(x)).abs().max().item() > 1e-2


def test_large_edit_runs_densely_with_original_statistics():
    net, call = unet2d(seed=2)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    mask = rect_mask(0, 0, 24, 24)
    xe = edited_input(x, mask)
    _, y_sparse, report, trace = run_engine(net, call, x, xe, mask, tile=4, dilation=1, dense_fraction=0.5)
    assert [r["dense"] for r in report["resolutions"]] == [True, True, True]
    assert report["macs"] == report["dense_macs"]
    assert all(v is None for v in trace.values())  # nothing was masked
    ref, _ = masked_dense_reference(net, call, x, xe, trace)  # = dense run with original statistics
    assert (y_sparse - ref).abs().max().item() < 1e-4


# ------------------------------------------------------------------------------------- masks
def test_mask_plan_dilates_downsamples_and_tiles():
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[10, 21] = True
    plan = MaskPlan(mask, tile=4, dilation=2, dense_fraction=0.5)
    g32 = plan.geometry(32, 32)  # 5x5 block rows 8..12, cols 19..23 -> tile rows 2..3, cols 4..5
    assert sorted(map(tuple, g32.tiles.tolist())) == [(2, 4), (2, 5), (3, 4), (3, 5)]
    assert g32.fraction == 4 / 64
    assert plan.pixels(32, 32).sum().item() == 25
    g16 = plan.geometry(16, 16)  # (5, 10) -> rows 3..7, cols 8..12 -> tiles rows 0..1, cols 2..3
    assert sorted(map(tuple, g16.tiles.tolist())) == [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert plan.geometry(8, 8) is None  # (2, 5) dilated touches all 4 tiles: 100% > 50%
    assert MaskPlan(mask, tile=4, dilation=2, dense_fraction=1.0).geometry(8, 8).num_tiles == 4
    assert plan.geometry(12, 10) is None  # not a multiple of the tile
    # storage order: positions are exactly the active tiles' pixels; up-sampling doubles each tile
    assert torch.equal(g16.pixel_mask().view(-1).nonzero().view(-1), g16.positions.sort().values)
    up = g16.upsampled(2)
    assert torch.equal(up.pixel_mask(), g16.pixel_mask().repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_difference_mask_and_mask_shapes():
    a = torch.zeros(1, 3, 8, 8)
    b = a.clone()
    b[0, 1, 2, 5] = 0.5
    b[0, 2, 6, 1] = 0.01  # below the threshold
    m = sparse.difference_mask(a, b, threshold=0.02)
    assert m.shape == (8, 8) and m.sum().item() == 1 and m[2, 5]
    assert torch.equal(sparse.as_mask(b != a), (b != a).any(1)[0])
    with pytest.raises(ValueError, match=r"mask: expected shape \(H, W\)"):
        sparse.as_mask(torch.zeros(8))
    with pytest.raises(ValueError, match="edited: shape"):
        sparse.difference_mask(a, b[..., :4])


# --------------------------------------------------------------------------------- bad input
def _recorded_engine(**options):
    net, call = unet2d(seed=0)
    engine = SparseEngine(net, **options)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), engine.full():
        call(x)
    return engine, call, x


def test_mask_of_the_wrong_size_is_rejected():
    engine, call, x = _recorded_engine()
    with pytest.raises(ValueError, match=r"mask: shape \(16, 16\) does not match the input's spatial size \(32, 32\)"):
        with torch.no_grad(), engine.sparse(torch.ones(16, 16, dtype=torch.bool)):
            call(x)
    with pytest.raises(ValueError, match="x: shape"):
        with torch.no_grad(), engine.sparse(rect_mask(0, 0, 4, 4)):
            call(torch.cat([x, x]))
    engine.restore()


def test_sparse_mode_without_a_recorded_cache_is_rejected():
    net, call = unet2d(seed=0)
    engine = SparseEngine(net)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="sparse mode needs a mask"):
        engine.mode = "sparse"
    with pytest.raises(MissingCacheError, match="no recorded cache for cache_id=0; run the original input in full mode"):
        with torch.no_grad(), engine.sparse(rect_mask(0, 0, 4, 4)):
            call(x)
    with torch.no_grad(), engine.full(cache_id="t=300"):
        call(x)
    with pytest.raises(MissingCacheError, match="cache_id=7"):
        with torch.no_grad(), engine.sparse(rect_mask(0, 0, 4, 4), cache_id=7):
            call(x)
    with torch.no_grad(), engine.sparse(rect_mask(0, 0, 4, 4), cache_id="t=300"):
        assert call(x).shape == x.shape
    engine.restore()
    assert isinstance(MissingCacheError("x"), RuntimeError)


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        return self.conv_out(F.silu(self.bn(self.conv_in(x))))


class Flipper(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(x).flip(-1)


def test_unsupported_layer_raises_naming_it_or_runs_densely_and_is_reported():
    net = _randomize(WithBatchNorm(), 0)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = rect_mask(4, 4, 5, 5)
    xe = edited_input(x, mask)
    with pytest.raises(UnsupportedLayerError, match=r"layer 'bn' \(BatchNorm2d\) received a sparse feature map"):
        run_engine(net, net, x, xe, mask)
    _, y_sparse, report, trace = run_engine(net, net, x, xe, mask, unsupported="dense", dilation=1)
    assert report["fallbacks"] == {"bn": "no sparse implementation; run densely"}
    ref, _ = masked_dense_reference(net, net, x, xe, trace)
    assert (y_sparse - ref).abs().max().item() < 1e-5
    # a container whose forward does something sparse maps cannot: the error names the op and the module
    seq = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Flipper(), nn.Conv2d(4, 3, 3, padding=1)), 0)
    with pytest.raises(UnsupportedOperation, match=r"torch.Tensor.flip is not supported on a sparse feature map \(in module '1'\)"):
        run_engine(seq, seq, x, xe, mask)
    _, y_sparse, report, trace = run_engine(seq, seq, x, xe, mask, dense=["1"])
    assert "1" in report["fallbacks"]
    ref, _ = masked_dense_reference(seq, seq, x, xe, trace)
    assert (y_sparse - ref).abs().max().item() < 1e-5


def test_engine_options_are_validated():
    net, _ = unet2d()
    with pytest.raises(TypeError, match="net: expected an nn.Module"):
        SparseEngine(lambda x: x)
    with pytest.raises(ValueError, match="unsupported: expected 'error' or 'dense'"):
        SparseEngine(net, unsupported="skip")
    with pytest.raises(ValueError, match=r"dense: no module named \['nope'\]"):
        SparseEngine(net, dense=["nope"])
    with pytest.raises(ValueError, match="tile: expected an integer >= 1"):
        SparseEngine(net, tile=0)
    with pytest.raises(ValueError, match="dense_fraction: expected a number in"):
        SparseEngine(net, dense_fraction=1.5)
    engine = SparseEngine(net)
    with pytest.raises(ValueError, match="already converted"):
        SparseEngine(net)
    with pytest.raises(ValueError, match="mode: expected one of"):
        engine.mode = "fast"
    engine.restore()
    assert "forward" not in net.conv_in.__dict__  # restored


# ------------------------------------------------------------------------------ edit pipeline
def _model(seed=0):
    net, _ = unet2d(seed)
    sch = fewstep.schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000))
    return fewstep.Model(net, schedule=sch, prediction="eps", sample_shape=(3, 32, 32))


@pytest.mark.parametrize("solver,options", [("ddim", {}), ("dpm++", {"order": 2}), ("ddpm", {})])
def test_edit_changes_only_the_active_region(solver, options):
    model = _model()
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = rect_mask(10, 4, 6, 8)
    with EditSession(model, image, strength=0.6, solver=solver, nfe=4, dilation=1, **options) as session:
        calls0 = model.calls
        result = session.edit(mask=mask)
        assert model.calls - calls0 == 4 and result.nfe == 4
        same = session.edit(image.clone(), mask=mask)
        active = session.engine.mask_plan.geometry(32, 32).pixel_mask()
    assert result.times[0] == pytest.approx(0.6 * 999) and result.times[-1] == 0.0
    diff = (result.image - result.original).abs()
    assert diff[..., ~active].max().item() == 0.0  # both trajectories agree exactly outside
    assert diff[..., mask].max().item() > 1e-2
    assert (same.image - same.original).abs().max().item() < 1e-4
    assert result.report["macs"] < 0.6 * result.report["dense_macs"]
    assert "forward" not in model.net.conv_in.__dict__  # the session restored the network


def test_edit_rejects_bad_input():
    model = _model()
    image = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"strength: expected a number in \(0, 1\]"):
        EditSession(model, image, strength=0.0)
    with pytest.raises(ValueError, match="cannot start an edit at an intermediate time"):
        EditSession(model, image, solver="fv", nfe=4)
    with pytest.raises(ValueError, match=r"image: this model takes images of shape \(3, 32, 32\)"):
        EditSession(model, torch.zeros(1, 3, 16, 16))
    with EditSession(model, image, nfe=2) as session:
        with pytest.raises(ValueError, match=r"mask: shape \(16, 16\) does not match the image's size \(32, 32\)"):
            session.edit(mask=torch.ones(16, 16, dtype=torch.bool))
        with pytest.raises(ValueError, match="mask: required when no edited image"):
            session.edit()


def test_edit_grids_start_at_the_strength():
    sch = fewstep.schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000))
    t = edit_grid(sch, 0.5, 5, "uniform")
    assert torch.allclose(t, torch.linspace(499.5, 0.0, 5, dtype=torch.float64))
    t = edit_grid(sch, 0.8, 6, "logsnr")
    lam = sch.lambda_(t)
    steps = lam[1:] - lam[:-1]
    assert t[0].item() == pytest.approx(0.8 * 999) and torch.allclose(steps, steps.mean().expand(5), rtol=1e-6)
    with pytest.raises(ValueError, match="grid: unknown name 'cosine'"):
        edit_grid(sch, 0.5, 3, "cosine")


# --------------------------------------------------------------------------------- CLI and I/O
def test_png_reader_undoes_every_filter(tmp_path):
    from PIL import Image

    from fewstep.sparse.imageio import read_png

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:24, :19]
    smooth = ((yy * 7 + xx * 3) % 256).astype(np.uint8)
    for mode, channels in (("L", 1), ("RGB", 3), ("RGBA", 4)):
        arr = np.repeat(smooth[..., None], channels, -1)
        arr = np.where(rng.random(arr.shape) < 0.2, rng.integers(0, 256, arr.shape), arr).astype(np.uint8)
        path = tmp_path / f"{mode}.png"
        Image.fromarray(arr if channels > 1 else arr[..., 0], mode).save(path, optimize=True)
        assert np.array_equal(read_png(path), arr)
    pal = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).quantize(16)
    path = tmp_path / "p.png"
    pal.save(path, bits=4)
    assert np.array_equal(read_png(path), np.array(pal.convert("RGB")))


def test_cli_edit_writes_the_edited_image(tmp_path, monkeypatch, capsys):
    from fewstep import cli, zoo
    from fewstep.sparse.imageio import load_image, save_image

    net = _randomize(UNet(UNetConfig(in_channels=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=1)), 0)
    sch = fewstep.schedules.DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000))
    model = fewstep.Model(net, schedule=sch, prediction="eps", sample_shape=(3, 16, 16), name="tiny")
    monkeypatch.setattr(zoo, "load", lambda name: model)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_image(image, tmp_path / "in.png")
    save_image(rect_mask(4, 4, 4, 6, size=16).float()[None, None] * 2 - 1, tmp_path / "mask.png")
    save_image(torch.zeros(1, 1, 8, 8), tmp_path / "small.png")
    args = ["edit", "--model", "tiny", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
            "--strength", "0.5", "--solver", "dpm++", "--order", "2", "--nfe", "3", "--out", str(tmp_path / "out.png"),
            "--compare-dense", "--paste"]
    assert cli.main(args) == 0
    out = load_image(tmp_path / "out.png", 3, (16, 16))
    printed = capsys.readouterr().out
    assert "3 evaluations" in printed and "speed-up" in printed and "active tiles per resolution: 16x16" in printed
    outside = ~rect_mask(4, 4, 4, 6, size=16)
    assert (out - image)[..., outside].abs().max().item() < 1 / 127.5 + 1e-6  # --paste kept the input there
    bad = list(args)
    bad[bad.index(str(tmp_path / "mask.png"))] = str(tmp_path / "small.png")
    assert cli.main(bad) == 2
    assert "mask: the mask is 8x8 (width x height) but the image is 16x16" in capsys.readouterr().err


def test_bench_sparse_report_has_the_table():
    from fewstep.bench import sparse as bench_sparse

    parser = argparse.ArgumentParser()
    bench_sparse.add_arguments(parser)
    args = parser.parse_args(["--config", "small", "--threads", "1", "--fractions", "0.05", "--repeats", "1"])
    text = bench_sparse.run(args).markdown()
    assert "| edited area | active @64 | active @32 | active @16 | MACs dense/sparse |" in text
    assert "| 4.8% |" in text  # the centred 14x14 square of a 64x64 image
    assert bench_sparse.square_mask(256, 0.05).float().mean().item() == pytest.approx(0.05, abs=0.002)
