"""Spatially sparse inference: speed-up of one denoising call against the edited area (CPU).

Builds a diffusers ``UNet2DModel`` with a DDPM-256-like configuration (widths 128, 128, 256, 256,
512, 512; two residual blocks per level; attention at 16x16 and in the middle; random weights, no
download), records one full run on a random input, then, for each edited fraction, times the
dense network on the edited input and the sparse engine side by side (interleaved repeats,
medians). A compact square edit of the given area is used.

    fewstep bench sparse --threads 2
    fewstep bench sparse --config small          # a 64x64 model, seconds instead of minutes
"""
from __future__ import annotations

import os
import statistics
import time

from .report import Report, markdown_table

CONFIGS = {
    # DDPM LSUN-256 (Ho et al. 2020) as diffusers' UNet2DModel builds it: about 114 M parameters.
    "ddpm256": dict(sample_size=256, layers_per_block=2, block_out_channels=(128, 128, 256, 256, 512, 512),
                    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4),
    "small": dict(sample_size=64, layers_per_block=1, block_out_channels=(64, 64, 128, 128),
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
}


def add_arguments(parser) -> None:
    parser.add_argument("--config", choices=sorted(CONFIGS), default="ddpm256", help="model configuration")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--fractions", default="0.01,0.05,0.1,0.2,0.5", help="edited area fractions")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per fraction (default 3)")
    parser.add_argument("--tile", type=int, default=4, help="sparse tile side (default 4)")
    parser.add_argument("--dilation", type=int, default=2, help="mask margin per resolution (default 2)")
    parser.add_argument("--dense-fraction", type=float, default=0.5, help="dense above this active share")
    parser.add_argument("--seed", type=int, default=0)


def square_mask(size: int, fraction: float):
    """A centred square covering ``fraction`` of a ``size x size`` image (at least one pixel)."""
    import torch

    side = max(1, min(size, round((fraction * size * size) ** 0.5)))
    mask = torch.zeros(size, size, dtype=torch.bool)
    o = (size - side) // 2
    mask[o:o + side, o:o + side] = True
    return mask


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(args) -> Report:
    import torch
    from diffusers import UNet2DModel

    from ..sparse import SparseEngine

    if args.threads < 1 or args.repeats < 1:
        raise ValueError("threads, repeats: expected integers >= 1")
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"fractions: expected comma-separated numbers in (0, 1], got {args.fractions!r}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = CONFIGS[args.config]
    net = UNet2DModel(in_channels=3, out_channels=3, **cfg).eval().requires_grad_(False)
    size = cfg["sample_size"]
    params = sum(p.numel() for p in net.parameters())
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(1, 3, size, size, generator=gen)
    bump = torch.randn(1, 3, size, size, generator=gen)
    t = torch.tensor([500.0])

    def dense_call(inp):
        return net(inp, t).sample

    engine = SparseEngine(net, tile=args.tile, dilation=args.dilation, dense_fraction=args.dense_fraction)
    rows, notes = [], []
    with torch.no_grad():
        warm, _ = _timed(lambda: dense_call(x))
        with engine.full():
            full_s, _ = _timed(lambda: dense_call(x))
        cache_mib = engine.cache_bytes() / 2**20
        for frac in fractions:
            mask = square_mask(size, frac)
            edited = torch.where(mask, x + bump, x)
            engine.set_mask(mask)
            with engine.sparse():
                dense_call(edited)  # builds the gather tables of this mask (cached between calls)
            dense_times, sparse_times = [], []
            for _ in range(args.repeats):
                d_s, reference = _timed(lambda: dense_call(edited))
                with engine.sparse():
                    s_s, out = _timed(lambda: dense_call(edited))
                dense_times.append(d_s)
                sparse_times.append(s_s)
            rep = engine.report()
            res = {r["height"]: r for r in rep["resolutions"]}
            shares = [("dense" if res[h]["dense"] else f"{res[h]['fraction']:.1%}") if h in res else "-"
                      for h in (size, size // 2, size // 4)]
            d_med, s_med = statistics.median(dense_times), statistics.median(sparse_times)
            err = (out - reference).abs()
            rows.append([f"{mask.float().mean().item():.1%}", *shares, rep["dense_macs"] / max(rep["macs"], 1),
                         d_med, s_med, d_med / s_med, err.max().item()])
    engine.restore()

    report = Report(f"Spatially sparse inference: speed-up against edited area ({args.config}, CPU)")
    report.add("Setup", "\n".join([
        f"- model: diffusers UNet2DModel, {args.config} configuration ({params / 1e6:.1f} M parameters, "
        f"{size}x{size}, random weights), one call at t = 500, batch 1, float32",
        f"- CPU threads: {args.threads}; repeats: {args.repeats} (median), dense and sparse interleaved; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; load average at the end "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        f"- sparse engine: tile {args.tile}, dilation {args.dilation} px per resolution, dense above "
        f"{args.dense_fraction:.0%} active tiles",
        f"- full (recording) run: {full_s:.3g} s (first dense call {warm:.3g} s); cache {cache_mib:.0f} MiB",
        "- edit: a centred square of the given area; edited input = original + N(0, 1) inside it",
    ]))
    header = ["edited area", f"active @{size}", f"active @{size // 2}", f"active @{size // 4}",
              "MACs dense/sparse", "dense s", "sparse s", "speed-up", "max abs(sparse - dense)"]
    report.add("Speed-up of one denoising call", markdown_table(header, rows) + "\n\n"
               "`active @N`: share of 4x4 output tiles recomputed at N x N (\"dense\": that resolution "
               "ran densely). `max abs(sparse - dense)`: difference to the exact dense output on the edited "
               "input: the approximation of reusing original statistics, attention rows and pixels "
               "outside the active tiles (random weights exaggerate it).")
    notes.append("Timings on a shared machine vary; compare rows of one run. On an oversubscribed machine "
                 "(load above the core count) run with OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads "
                 "otherwise add milliseconds to every parallel operation, which penalises the many small "
                 "operations of the sparse pass far more than the few large dense ones.")
    report.add("Notes", "\n".join(notes))
    return report
