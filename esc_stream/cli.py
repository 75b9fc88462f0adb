"""`esc-video`: the command line. Errors a user can cause become one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__

EXIT_USAGE = 2


class UserError(Exception):
    """A problem with the user's input, reported as one line."""


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _non_negative(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {v}")
    return v


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", type=Path, help="ESC checkpoint (.pth from the official release, or .safetensors)")
    p.add_argument("--scale", type=int, choices=(2, 3, 4), help="scale of the default model (default 2)")
    p.add_argument("--tile", type=_positive, help="tile side in input pixels (default: whole frame)")
    p.add_argument("--overlap", type=_non_negative, default=64, help="context pixels around each tile (default 64)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 (default cpu)")


def _load_upscaler(args: argparse.Namespace):
    import torch

    from .checkpoints import CheckpointError
    from .upscaler import load

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine")
    try:
        up = load(args.weights, scale=args.scale or 2, device=args.device, tile=args.tile, overlap=args.overlap)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"--device {args.device}: {exc}") from None
    if args.weights is not None and args.scale and args.scale != up.scale:
        raise UserError(f"--scale {args.scale} does not match {args.weights}, which is a x{up.scale} model")
    return up


def _upscale_plane(up, plane: np.ndarray) -> np.ndarray:
    grey = np.repeat(plane[..., None], 3, axis=2)
    out = up(grey.astype(np.float32) / np.iinfo(plane.dtype).max)
    return np.rint(out.mean(axis=2) * np.iinfo(plane.dtype).max).astype(plane.dtype)


def cmd_image(args: argparse.Namespace) -> int:
    from .images import ImageError, Picture, check_output, read_image, write_image

    src, dst = Path(args.input), Path(args.output)
    if src.resolve() == dst.resolve():
        raise UserError(f"{dst}: output would overwrite the input")
    try:
        pic = read_image(src)
        check_output(dst, 16 if pic.rgb.dtype == np.uint16 else 8)
    except ImageError as exc:
        raise UserError(str(exc)) from None
    up = _load_upscaler(args)
    if not up.pretrained:
        print(f"warning: {up.source}: the output shows no real upscaling quality", file=sys.stderr)
    t0 = time.perf_counter()
    rgb = up(pic.rgb)
    alpha = _upscale_plane(up, pic.alpha) if pic.alpha is not None else None
    dt = time.perf_counter() - t0
    try:
        write_image(dst, Picture(rgb, alpha))
    except ImageError as exc:
        raise UserError(str(exc)) from None
    h, w = pic.rgb.shape[:2]
    bits = 16 if pic.rgb.dtype == np.uint16 else 8
    print(
        f"{src} {w}x{h} -> {dst} {w * up.scale}x{h * up.scale} ({bits}-bit{', alpha' if alpha is not None else ''}) "
        f"with {up.variant} x{up.scale} [{up.source}] in {dt:.2f} s"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoints import CheckpointError, load_model

    try:
        model, desc = load_model(args.weights)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.weights}: {desc.variant} ({desc.arch}) x{desc.scale}, {n:,} parameters")
    for k, v in desc.config.items():
        print(f"  {k} = {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="esc-video", description="Upscale video and images with ESC.")
    ap.add_argument("--version", action="version", version=f"esc-stream {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("image", help="upscale one image (PNG/JPEG/...; 16-bit PNG and alpha kept)")
    p.add_argument("input", help="input image")
    p.add_argument("output", help="output image (written under a temporary name, then renamed)")
    _add_model_args(p)
    p.set_defaults(func=cmd_image)

    p = sub.add_parser("info", help="describe a checkpoint: variant, scale, hyper-parameters")
    p.add_argument("weights", type=Path)
    p.set_defaults(func=cmd_info)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"esc-video: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("esc-video: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("esc-video: out of memory; try a smaller --tile", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
