"""`esc-video image`: upscale one picture (8/16-bit, alpha, EXIF orientation kept)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from .common import add_model_args, load_upscaler, requested_size


def add_parser(sub: Any) -> None:
    p = sub.add_parser("image", help="upscale one image (PNG/JPEG/...; 16-bit PNG and alpha kept)")
    p.add_argument("input", help="input image")
    p.add_argument("output", help="output image (written under a temporary name, then renamed)")
    add_model_args(p)
    p.set_defaults(func=cmd_image)


def cmd_image(args: argparse.Namespace) -> int:
    import numpy as np

    from ..budget import check_memory
    from ..images import check_output, read_image, upscale_picture, write_image
    from ..video.colour import target_size

    src, dst = Path(args.input), Path(args.output)
    if src.resolve() == dst.resolve():
        raise UserError(f"{dst}: output would overwrite the input")
    pic = read_image(src)
    bits = 16 if pic.rgb.dtype == np.uint16 else 8
    check_output(dst, bits)
    up = load_upscaler(args)
    h, w = pic.rgb.shape[:2]
    size = requested_size(args, (w, h))
    exact = target_size(w, h, None, size)[:2] if size else None
    # refused before the model runs when it cannot fit, with a --tile that does; alpha: the RGB output is held
    check_memory(up, w, h, out_size=exact, in_flight=int(pic.alpha is not None), what=str(src))
    t0 = time.perf_counter()
    out = upscale_picture(up, pic, exact)
    dt = time.perf_counter() - t0
    write_image(dst, out)
    alpha = ", alpha" if out.alpha is not None else ""
    kind = "(any scale)" if up.arbitrary else f"x{up.scale}"
    print(f"{src} {w}x{h} -> {dst} {out.rgb.shape[1]}x{out.rgb.shape[0]} ({bits}-bit{alpha}) "
          f"with {up.variant} {kind} [{up.source}] in {dt:.2f} s")  # fmt: skip
    return 0
