"""`esc-video models`, `info` and `export-onnx`: list the embedded models, describe a checkpoint, export a model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ExportError, UserError
from ..onnx_export import DEFAULT_OPSET  # a light import: torch and onnx load when an export runs


def add_models_parser(sub: Any) -> None:
    p = sub.add_parser("models", help="list the embedded models: tier, scale, variant, size, quality, speed")
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    """One line per embedded model, from what its release step measured (recorded in the weights file)."""
    from ..upscaler import embedded_models

    print(
        f"{'model':<8} {'scale':<5} {'variant':<11} {'params':>7}  {'Kodak24 PSNR (vs bicubic)':<26} speed at release"
    )
    for m in embedded_models():
        meta = m.metadata()
        if "kodak24_psnr" in meta:
            psnr, bic = float(meta["kodak24_psnr"]), float(meta["kodak24_bicubic_psnr"])
            quality = f"{psnr:.2f} dB ({psnr - bic:+.2f} dB)"
            speed = f"{float(meta['mpx_s_320x180']):.2f} input Mpx/s at 320x180, 2 threads"
            variant, params = meta["variant"], f"{int(meta['parameters']) / 1e3:.0f}K"
        else:  # a file shipped before the release step recorded its figures
            quality, speed, variant, params = "not recorded", "not recorded", "?", "?"
        print(f"{m.tier:<8} x{m.scale:<4} {variant:<11} {params:>7}  {quality:<26} {speed}")
    return 0


def add_info_parser(sub: Any) -> None:
    p = sub.add_parser("info", help="describe a checkpoint: variant, scale, hyper-parameters")
    p.add_argument("weights", type=Path)
    p.set_defaults(func=cmd_info)


def add_export_parser(sub: Any) -> None:
    p = sub.add_parser("export-onnx", help="export a model to ONNX (dynamic height/width), verified with ONNX Runtime")
    p.add_argument("output", type=Path, help="the .onnx file to write (under a temporary name, then renamed)")
    p.add_argument("--weights", type=Path, help="ESC checkpoint (.pth or .safetensors; default: the embedded model)")
    p.add_argument("--scale", type=int, choices=(2, 3, 4), help="scale of the embedded model (default 2)")
    p.add_argument("--model", help="embedded model: fast or balanced (default balanced)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_export)


def cmd_info(args: argparse.Namespace) -> int:
    from ..checkpoints import load_model

    model, desc = load_model(args.weights)
    n = sum(p.numel() for p in model.parameters())
    kind = "any scale" if desc.arch == "ESCLTE" else f"x{desc.scale}"
    print(f"{args.weights}: {desc.variant} ({desc.arch}) {kind}, {n:,} parameters")
    for k, v in desc.config.items():
        print(f"  {k} = {v}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..checkpoints import load_model
    from ..onnx_export import export_onnx, verify_onnx, window_size_of
    from ..upscaler import EmbeddedModel, check_tier

    out: Path = args.output
    if out.suffix.lower() != ".onnx":
        raise UserError(f"{out}: the output must be a .onnx file")
    if args.weights is not None and out.resolve() == args.weights.resolve():
        raise UserError(f"{out}: output would overwrite the input")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such directory")
    if args.opset < 23:
        raise UserError(f"--opset {args.opset}: the window attention needs opset 23 or later")
    source = args.weights
    if source is None:
        default = EmbeddedModel(args.scale or 2, check_tier(args.model))
        if not default.exists():
            raise UserError(f"no embedded {default.tier} model for x{default.scale}; pass a checkpoint with --weights")
        source = default.path
    model, desc = load_model(source)
    if args.weights is not None and args.scale and args.scale != desc.scale:
        raise UserError(f"--scale {args.scale} does not match {args.weights}, which is a x{desc.scale} model")
    try:
        export_onnx(model, out, opset=args.opset)
        err = verify_onnx(out, model)
    except ExportError as exc:
        raise UserError(f"{source}: {exc}") from None
    if err > 1e-4:
        out.unlink(missing_ok=True)
        raise UserError(f"{out}: ONNX Runtime differs from torch by {err:.1e} (> 1e-4); nothing written")
    window = window_size_of(model)
    print(f"{out}: {desc.variant} x{desc.scale}, input 1x3xHxW with H, W multiples of {window}, opset {args.opset}; "
          f"ONNX Runtime vs torch max-abs {err:.1e}")  # fmt: skip
    return 0
