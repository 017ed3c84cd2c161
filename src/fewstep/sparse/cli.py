"""``fewstep edit``: SDEdit-style editing of an image with spatially sparse inference.

    fewstep edit --model patches32 --image in.png --mask mask.png --strength 0.6 \\
                 --solver dpm++ --nfe 10 --out out.png

* ``--mask`` alone re-synthesises the masked region (fresh noise there, the original noise elsewhere);
* ``--edited edited.png`` (the user's strokes painted into the image) edits towards it; the mask
  is then optional (default: where the two images differ by more than ``--threshold``).

The original image's trajectory is run once densely, recording one cache per evaluation; the edited
trajectory runs sparsely (``--dense`` to run it densely; ``--compare-dense`` runs both and prints the
speed-up and their difference).
"""
from __future__ import annotations

import sys

__all__ = ["register", "run"]


def register(subparsers) -> None:
    p = subparsers.add_parser("edit", help="edit an image (SDEdit) recomputing only the edited region")
    p.add_argument("--model", required=True, help="zoo model name or path to a zoo .safetensors file")
    p.add_argument("--image", required=True, help="input PNG, the model's size")
    p.add_argument("--mask", help="PNG mask of the edit region (white = edit)")
    p.add_argument("--edited", help="PNG of the image with the user's edit painted in")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--strength", type=float, default=0.6, help="SDEdit strength in (0, 1] (default 0.6)")
    p.add_argument("--solver", default="ddim", help="solver name (default ddim; see `fewstep solvers`)")
    p.add_argument("--order", type=int, default=None, help="solver order, where the solver has one")
    p.add_argument("--nfe", type=int, default=10, help="network evaluations per trajectory (default 10)")
    p.add_argument("--grid", default="logsnr", help="time spacing: logsnr, uniform, quadratic, karras")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--label", type=int, default=None, help="class label for conditional models (default: none)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale with --label")
    p.add_argument("--threshold", type=float, default=0.02, help="difference threshold for the mask from --edited")
    p.add_argument("--tile", type=int, default=4, help="sparse tile side in pixels (default 4)")
    p.add_argument("--dilation", type=int, default=2, help="mask margin in pixels at every resolution (default 2)")
    p.add_argument("--dense-fraction", type=float, default=0.5,
                   help="run a resolution densely above this share of active tiles (default 0.5)")
    p.add_argument("--paste", action="store_true", help="keep the input's pixels outside the mask")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dense", action="store_true", help="run the edited trajectory densely")
    mode.add_argument("--compare-dense", action="store_true", help="also run it densely; print speed-up and difference")
    p.set_defaults(func=run)


def _load_model(name: str, label, guidance: float):
    from .. import zoo

    model = zoo.load(name)
    if label is not None:
        model = zoo.conditioned(model, [label], guidance=guidance)
    elif guidance != 1.0:
        raise ValueError("guidance: needs --label")
    return model


def run(args) -> int:
    import torch

    from .edit import EditSession
    from .imageio import load_image, load_mask, save_image

    if args.mask is None and args.edited is None:
        raise ValueError("mask: give --mask (region to re-synthesise) and/or --edited (the edited image)")
    model = _load_model(args.model, args.label, args.guidance)
    shape = getattr(model, "sample_shape", None)
    if shape is None:
        raise ValueError(f"model: {args.model!r} does not state its sample shape")
    channels, size = shape[0], tuple(shape[1:])
    image = load_image(args.image, channels, size, name="image")
    edited = load_image(args.edited, channels, size, name="edited") if args.edited else None
    mask = load_mask(args.mask, size) if args.mask else None
    options = {"order": args.order} if args.order is not None else {}
    with EditSession(model, image, strength=args.strength, solver=args.solver, nfe=args.nfe, grid=args.grid,
                     seed=args.seed, tile=args.tile, dilation=args.dilation, dense_fraction=args.dense_fraction,
                     **options) as session:
        result = session.edit(edited, mask, sparse=not args.dense, threshold=args.threshold)
        out = result.image
        if args.paste:
            out = torch.where(result.mask.to(out.device), out, image)
        save_image(out, args.out)
        print(f"edited {args.image} -> {args.out}: {args.solver}, {result.nfe} evaluations from t={result.times[0]:.4g}, "
              f"edit area {result.mask.float().mean().item():.1%}")
        print(f"original trajectory (full mode, recorded): {session.record_seconds:.3g} s")
        label = "dense" if args.dense else "sparse"
        print(f"edited trajectory ({label}): {result.seconds:.3g} s")
        if not args.dense:
            rep = result.report
            share = ", ".join(f"{r['height']}x{r['width']}: {'dense' if r['dense'] else format(r['fraction'], '.0%')}"
                              for r in rep["resolutions"])
            print(f"active tiles per resolution: {share}")
            print(f"multiply-adds: {rep['macs'] / max(rep['dense_macs'], 1):.1%} of dense; cache "
                  f"{rep['cache_bytes'] / 2**20:.1f} MiB")
            if rep["fallbacks"]:
                print(f"layers run densely: {rep['fallbacks']}", file=sys.stderr)
        if args.compare_dense:  # the session runs its trajectories under torch.no_grad
            dense = session.edit(edited, mask, sparse=False, threshold=args.threshold)
            diff = (dense.image - result.image).abs()
            mse = float(((dense.image - result.image) / 2).pow(2).mean())
            psnr = float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()
            print(f"dense edited trajectory: {dense.seconds:.3g} s; speed-up {dense.seconds / result.seconds:.2f}x; "
                  f"sparse vs dense: max |diff| {diff.max().item():.3g}, PSNR {psnr:.1f} dB")
    return 0
