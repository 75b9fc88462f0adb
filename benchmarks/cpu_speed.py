"""CPU throughput of esc_stream's inference path: output megapixels per second.

    python benchmarks/cpu_speed.py [--variant esc_light] [--scale 2] [--size 320x180] [--repeat 5]

Prints one line per configuration. Weights are random (speed does not depend on their values).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from esc_stream.models import create_model
from esc_stream.reparam import prepare_for_inference
from esc_stream.tiling import upscale_tensor


def measure(variant: str, scale: int, w: int, h: int, repeat: int, bake: bool, channels_last: bool) -> float:
    torch.manual_seed(0)
    model = create_model(variant, scale).eval()
    if bake:
        prepare_for_inference(model)
    x = torch.rand(1, 3, h, w)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    window = model.window_size
    times = []
    with torch.inference_mode():
        upscale_tensor(model, x, scale, window)  # warm-up
        for _ in range(repeat):
            t0 = time.perf_counter()
            upscale_tensor(model, x, scale, window)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="esc_light")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--size", default="320x180", help="input WxH")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.lower().split("x"))
    out_mpx = w * h * args.scale**2 / 1e6
    print(f"torch {torch.__version__}, {args.threads} threads, input {w}x{h}, {args.variant} x{args.scale}")
    for bake, cl in [(False, False), (True, False), (True, True)]:
        dt = measure(args.variant, args.scale, w, h, args.repeat, bake, cl)
        label = ("baked" if bake else "unbaked") + (" channels_last" if cl else "")
        print(f"  {label:<22} {dt * 1000:8.1f} ms/frame  {out_mpx / dt:.4f} Mpx/s out  {1 / dt:.2f} fps")


if __name__ == "__main__":
    main()
