"""Kodak24 Y-channel PSNR of a model under inference variants: border padding and the x8 geometric self-ensemble.

    python benchmarks/kodak_eval.py [--weights W] [--scale 2] [--pads 0,8,16] [--ensemble] [--limit N]

Without --weights it measures the embedded default model. `--pads`: the LR frame is reflect-padded by P pixels on
every side before the network and the output cropped back (0 = as esc-stream runs it). `--ensemble`: the mean of
the outputs for the 8 flips/rotations of the input (8x the compute). LR = MATLAB-bicubic downscale of the HR
image, 8-bit; border = scale pixels cropped, as the model card's tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esc_stream.checkpoints import load_model  # noqa: E402
from esc_stream.metrics import psnr_y  # noqa: E402
from esc_stream.resize import imresize  # noqa: E402
from esc_stream.tiling import upscale_tensor  # noqa: E402
from training.release import evaluation_pairs, prepare_for_inference  # noqa: E402


def ensemble(net, lr: torch.Tensor, scale: int, window: int) -> torch.Tensor:
    acc = torch.zeros(())
    for k in range(8):
        t = torch.rot90(lr, k % 4, (2, 3))
        t = t.flip(3) if k >= 4 else t
        out = upscale_tensor(net, t, scale, window)
        out = out.flip(3) if k >= 4 else out
        acc = acc + torch.rot90(out, -(k % 4), (2, 3))
    return acc / 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, help="checkpoint (default: the embedded model)")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--val-dir", type=Path, default=ROOT.parent / "shared" / "data" / "kodak24")
    ap.add_argument("--pads", default="0", help="comma-separated reflect paddings in LR pixels")
    ap.add_argument("--ensemble", action="store_true", help="also the x8 flip/rotation self-ensemble")
    ap.add_argument("--limit", type=int, default=0, help="only the first N images")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weights = args.weights or ROOT / "esc_stream" / "weights" / f"esc_stream_balanced_x{args.scale}.safetensors"
    model, desc = load_model(weights)
    prepare_for_inference(model)
    window = int(desc.config["window_size"])
    pads = [int(p) for p in args.pads.split(",")]
    pairs = list(evaluation_pairs(args.val_dir, args.scale, args.limit))
    if not pairs:
        sys.exit(f"kodak_eval: no images in {args.val_dir}")
    sums: dict[str, float] = {"bicubic": 0.0, **{f"pad {p}": 0.0 for p in pads}}
    if args.ensemble:
        sums["ensemble x8"] = 0.0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for hr, lr in pairs:
            sums["bicubic"] += psnr_y(imresize(lr.double(), scale=args.scale).float(), hr, args.scale)
            for p in pads:
                x = F.pad(lr, (p, p, p, p), mode="reflect") if p else lr
                sr = upscale_tensor(model, x, args.scale, window)
                if p:
                    q = p * args.scale
                    sr = sr[..., q:-q, q:-q]
                sums[f"pad {p}"] += psnr_y(sr, hr, args.scale)
            if args.ensemble:
                sums["ensemble x8"] += psnr_y(ensemble(model, lr, args.scale, window), hr, args.scale)
    print(f"{weights.name} x{args.scale}, {len(pairs)} images of {args.val_dir.name}, {time.perf_counter() - t0:.0f} s")
    for name, total in sums.items():
        print(f"  {name:12s} {total / len(pairs):.4f} dB")


if __name__ == "__main__":
    main()
