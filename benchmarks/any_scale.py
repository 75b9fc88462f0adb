"""PSNR and time per frame of non-integer upscaling (default x1.5) on Kodak24.

    python benchmarks/any_scale.py [--data ../shared/data/kodak24] [--scale 1.5] [--weights LTE.pth]
                                   [--limit N] [--threads 1]

Each HR image is cropped (top-left) so that its sides divided by the scale are whole numbers; the LR input is
its MATLAB-bicubic downscale (esc_stream.resize.imresize), quantised to 8 bits. Printed per method: mean PSNR
on Y with ceil(scale) pixels of border cropped (esc_stream.metrics.psnr_y), and the mean seconds per frame:

- bicubic:             MATLAB-bicubic upscale of the LR to the HR size;
- default x2 -> resize: the embedded default x2 model, then an antialiased bicubic resample to the HR size
                        (what `esc-video image --size` does with a fixed-scale model: `Upscaler.upscale_to`);
- --weights:            an arbitrary-scale (ESC+LTE) checkpoint decoding the HR grid directly, when given.

    python benchmarks/any_scale.py --memory [--input 480x270] [--output 3840x2160] [--tile 128] [--chunk 32768]

instead renders one random frame with an arbitrary-scale model (esc_lte_small, random weights: memory and time
do not depend on their values) and prints the process's peak resident memory before and after, and the time.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import esc_stream  # noqa: E402
from esc_stream.metrics import psnr_y  # noqa: E402
from esc_stream.resize import imresize  # noqa: E402


def crop_to_scale(hr: torch.Tensor, scale: float) -> torch.Tensor:
    """Largest top-left crop whose sides divided by `scale` are whole numbers."""
    num, den = float(scale).as_integer_ratio()
    step = num // math.gcd(num, den)
    h, w = hr.shape[-2] - hr.shape[-2] % step, hr.shape[-1] - hr.shape[-1] % step
    return hr[..., :h, :w]


def load_hr(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def _wh(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def memory(args: argparse.Namespace) -> int:
    """Peak memory of one arbitrary-scale render: decoder chunks (and tiles) keep it flat in the output size."""
    from esc_stream.models import create_model
    from esc_stream.reparam import prepare_for_inference

    torch.manual_seed(0)
    model = prepare_for_inference(create_model(args.variant, 2))
    (iw, ih), (ow, oh) = args.input, args.output
    x = torch.rand(1, 3, ih, iw)
    before = _peak_mib()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.render(x, (oh, ow), tile=args.tile, context=64, chunk=args.chunk)  # type: ignore[operator]
    dt = time.perf_counter() - t0
    print(f"{args.variant} (random weights) {iw}x{ih} -> {ow}x{oh} (x{ow / iw:.3g}), tile {args.tile}, chunk "
          f"{args.chunk}, {args.threads} thread(s): {dt:.1f} s; peak RSS {before:.0f} MiB before, "
          f"{_peak_mib():.0f} MiB after (the output alone is {out.numel() * 4 / 2**20:.0f} MiB)")  # fmt: skip
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "kodak24")
    ap.add_argument("--scale", type=float, default=1.5)
    ap.add_argument("--weights", type=Path, help="an arbitrary-scale (ESC+LTE) checkpoint to compare as well")
    ap.add_argument("--limit", type=int, help="first N images only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory", action="store_true", help="peak memory of one large arbitrary-scale render")
    ap.add_argument("--variant", default="esc_lte_small", help="--memory: the model (default esc_lte_small)")
    ap.add_argument("--input", type=_wh, default=(480, 270), help="--memory: input WxH")
    ap.add_argument("--output", type=_wh, default=(3840, 2160), help="--memory: output WxH")
    ap.add_argument("--tile", type=int, default=128, help="--memory: tile side in input pixels (0: whole frame)")
    ap.add_argument("--chunk", type=int, default=1 << 15, help="--memory: queries decoded at once")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory:
        args.tile = args.tile or None
        return memory(args)
    files = sorted(p for p in args.data.iterdir() if p.suffix.lower() in {".png", ".bmp", ".jpg"})[: args.limit]
    if not files:
        print(f"{args.data}: no images")
        return 2
    s = args.scale
    border = math.ceil(s)
    methods: dict[str, esc_stream.Upscaler | None] = {"bicubic": None, "default x2 -> resize": esc_stream.load()}
    if args.weights:
        methods[f"{args.weights.name} (direct)"] = esc_stream.load(args.weights)
    psnr = {k: [] for k in methods}
    secs: dict[str, list[float]] = {k: [] for k in methods}
    cpu: dict[str, list[float]] = {k: [] for k in methods}  # process CPU time: less sensitive to other load
    for path in files:
        hr = crop_to_scale(load_hr(path), s)
        size = (hr.shape[-2], hr.shape[-1])
        lr_size = (round(size[0] / s), round(size[1] / s))
        lr = ((imresize(hr, size=lr_size).clamp(0, 1) * 255).round() / 255).float()
        for name, up in methods.items():
            t0, c0 = time.perf_counter(), time.process_time()
            if up is None:
                sr = imresize(lr.double(), size=size).float()
            else:
                sr = up.upscale_to(lr, (size[1], size[0]))
                assert isinstance(sr, torch.Tensor)
            secs[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            psnr[name].append(psnr_y(sr.double(), hr, border))
    h, w = load_hr(files[0]).shape[-2:]
    print(f"{len(files)} images from {args.data} ({w}x{h} first), x{s:g}: LR {lr_size[1]}x{lr_size[0]} -> "
          f"{size[1]}x{size[0]} (last image), PSNR on Y with {border} px border, {args.threads} thread(s), "
          f"torch {torch.__version__}")  # fmt: skip
    base = float(np.mean(psnr["bicubic"]))
    for name in methods:
        p = float(np.mean(psnr[name]))
        t = float(np.mean(secs[name][1:] or secs[name]))  # the first call also warms up
        c = float(np.mean(cpu[name][1:] or cpu[name]))
        print(f"  {name:28s} PSNR {p:6.3f} dB ({p - base:+.3f} vs bicubic)   {t:7.3f} s/frame ({c:.3f} s CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
