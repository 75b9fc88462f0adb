"""`esc-video info` and `esc-video export-onnx`: describe a checkpoint, export a model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ExportError, UserError
from ..onnx_export import DEFAULT_OPSET  # a light import: torch and onnx load when an export runs


def add_info_parser(sub: Any) -> None:
    p = sub.add_parser("info", help="describe a checkpoint: variant, scale, hyper-parameters")
    p.add_argument("weights", type=Path)
    p.set_defaults(func=cmd_info)


def add_export_parser(sub: Any) -> None:
    p = sub.add_parser("export-onnx", help="export a model to ONNX (dynamic height/width), verified with ONNX Runtime")
    p.add_argument("output", type=Path, help="the .onnx file to write (under a temporary name, then renamed)")
    p.add_argument("--weights", type=Path, help="ESC checkpoint (.pth or .safetensors; default: the embedded model)")
    p.add_argument("--scale", type=int, choices=(2, 3, 4), help="scale of the embedded model (default 2)")
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
    from ..upscaler import DefaultModel

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
        default = DefaultModel(args.scale or 2)
        if not default.exists():
            raise UserError(f"no embedded default model for x{args.scale}; pass a checkpoint with --weights")
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
