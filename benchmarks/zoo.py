"""The embedded model family beside the CPU peers users pick instead (OpenCV's FSRCNN and ESPCN), in one run.

    python benchmarks/zoo.py [--threads 2] [--scales 2,3,4] [--repeat 7] [--limit N] [--card]

For each embedded model (`esc_stream.load(scale=S, model=T)`) and each peer at each scale it prints Kodak24 PSNR /
SSIM (Y channel, border = scale, LR = MATLAB-bicubic downscale quantised to 8 bits, every model given and giving
uint8 RGB as a user's frames are) and the speed in input Mpx/s at 320x180 and 640x360 uint8 frames (median of
`--repeat` calls, models interleaved so that load from other processes hits all of them alike). `--card` writes the
table into esc_stream/weights/MODEL_CARD.md between its `<!-- zoo -->` markers.

The peers need `opencv-contrib-python-headless<5` (the dev extra) and ../shared/peers/; without them they are
skipped with a note.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esc_stream.training.release import evaluation_pairs  # noqa: E402

import esc_stream  # noqa: E402
from esc_stream.metrics import psnr_y, ssim_y  # noqa: E402
from esc_stream.resize import imresize  # noqa: E402
from esc_stream.upscaler import embedded_models  # noqa: E402

PEERS = ROOT.parent / "shared" / "peers"
SIZES = ((320, 180), (640, 360))
IDLE = 0.05  # seconds between timed calls (see speeds)
Frame = Callable[[np.ndarray], np.ndarray]  # uint8 HxWx3 RGB -> uint8 RGB, upscaled


def peer(name: str, scale: int, threads: int) -> Frame | None:
    """An OpenCV dnn_superres model as an RGB uint8 function, or None where OpenCV or the graph is missing."""
    try:
        import cv2
    except ImportError:
        return None
    graph = PEERS / name.lower() / f"{name}_x{scale}.pb"
    if not graph.is_file():
        return None
    cv2.setNumThreads(threads)
    sr = cv2.dnn_superres.DnnSuperResImpl_create()
    sr.readModel(str(graph))
    sr.setModel(name.lower(), scale)
    return lambda rgb: np.ascontiguousarray(sr.upsample(np.ascontiguousarray(rgb[..., ::-1]))[..., ::-1])


def quality(fn: Frame, pairs: list[tuple[torch.Tensor, torch.Tensor]], scale: int) -> tuple[float, float]:
    """Mean Kodak24 PSNR/SSIM (Y, border = scale) of a uint8 frame function."""
    psnr = ssim = 0.0
    for hr, lr in pairs:
        lr8 = (lr[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        sr = torch.from_numpy(fn(lr8)).permute(2, 0, 1)[None].float() / 255
        psnr += psnr_y(sr, hr, scale)
        ssim += ssim_y(sr, hr, scale)
    return psnr / len(pairs), ssim / len(pairs)


def speeds(fns: dict[str, Frame], frame: np.ndarray, repeat: int) -> dict[str, float]:
    """Input Mpx/s of each function on one frame: two warm-up calls each, then `repeat` interleaved rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn(frame)
        fn(frame)
    for _ in range(repeat):
        for name, fn in fns.items():
            # a short idle first: PyTorch's OpenMP threads and OpenCV's pool both spin for a while after a call,
            # and whichever runs next in this process would otherwise pay for the other's spinning
            time.sleep(IDLE)
            t0 = time.perf_counter()
            fn(frame)
            times[name].append(time.perf_counter() - t0)
    px = frame.shape[0] * frame.shape[1]
    return {k: px / statistics.median(v) / 1e6 for k, v in times.items()}


def test_frame(width: int, height: int) -> np.ndarray:
    """A real camera frame (realvideo_demo000) resized to the size, else Kodak's first image."""
    for folder in (ROOT.parent / "shared" / "data" / "realvideo_demo000", ROOT / "examples"):
        files = sorted(folder.glob("*.png"))
        if files:
            from PIL import Image

            with Image.open(files[0]) as im:
                return np.asarray(im.convert("RGB").resize((width, height), Image.Resampling.BICUBIC))
    raise SystemExit("zoo: no test frame found")


def table(rows: list[dict]) -> str:
    head = "| model | scale | params | Kodak24 PSNR / SSIM | vs bicubic | 320×180 Mpx/s | 640×360 Mpx/s |\n"
    head += "|---|---|---|---|---|---|---|\n"
    lines = [
        f"| {r['name']} | ×{r['scale']} | {r['params']} | {r['psnr']:.2f} / {r['ssim']:.4f} | {r['gain']:+.2f} dB | "
        f"{r['320x180']:.2f} | {r['640x360']:.2f} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def write_card(text: str, card: Path) -> None:
    block = f"<!-- zoo -->\n{text}\n<!-- end zoo -->"
    old = card.read_text()
    pattern = re.compile(r"<!-- zoo -->.*?<!-- end zoo -->", re.S)
    if not pattern.search(old):
        raise SystemExit(f"{card} has no <!-- zoo --> ... <!-- end zoo --> markers")
    card.write_text(pattern.sub(lambda _: block, old))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scales", default="2,3,4")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--limit", type=int, default=0, help="only the first N Kodak24 images")
    ap.add_argument("--val-dir", type=Path, default=ROOT.parent / "shared" / "data" / "kodak24")
    ap.add_argument("--card", action="store_true", help="write the table into the model card")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"zoo: {args.threads} threads, torch {torch.__version__}, {args.repeat} timed calls per model and size")
    rows = []
    for scale in (int(s) for s in args.scales.split(",")):
        fns: dict[str, Frame] = {}
        params: dict[str, str] = {}
        for m in embedded_models():
            if m.scale == scale:
                up = esc_stream.load(scale=scale, model=m.tier)
                fns[f"esc-stream {m.tier}"] = up
                params[f"esc-stream {m.tier}"] = f"{sum(p.numel() for p in up.model.parameters()) / 1e3:.0f}K"
        for name in ("FSRCNN", "ESPCN"):
            fn = peer(name, scale, args.threads)
            if fn is None:
                print(f"  x{scale} {name}: skipped (needs opencv-contrib-python-headless<5 and {PEERS})")
                continue
            fns[name] = fn
            params[name] = "-"
        pairs = list(evaluation_pairs(args.val_dir, scale, args.limit))
        bicubic = sum(psnr_y(imresize(lr.double(), scale=scale).float(), hr, scale) for hr, lr in pairs) / len(pairs)
        rates = {f"{w}x{h}": speeds(fns, test_frame(w, h), args.repeat) for w, h in SIZES}
        for name, fn in fns.items():
            psnr, ssim = quality(fn, pairs, scale)
            row = dict(name=name, scale=scale, params=params[name], psnr=psnr, ssim=ssim, gain=psnr - bicubic)
            row.update({size: r[name] for size, r in rates.items()})
            rows.append(row)
            print(f"  x{scale} {name:20s} {psnr:.3f} dB / {ssim:.4f} ({psnr - bicubic:+.2f} vs bicubic {bicubic:.3f})"
                  f"  320x180 {row['320x180']:.3f}  640x360 {row['640x360']:.3f} input Mpx/s", flush=True)  # fmt: skip
    text = table(rows)
    print(text)
    if args.card:
        write_card(text, ROOT / "esc_stream" / "weights" / "MODEL_CARD.md")
        print("wrote the table into esc_stream/weights/MODEL_CARD.md")


if __name__ == "__main__":
    main()
