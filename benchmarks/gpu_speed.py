"""GPU speed of ESC and ESC-light, x2 and x4, at 1280x720 output (the paper's setting), batch 1.

For each network: plain torch modules (exact attention, separate ConvAttn ops), the CUDA fast paths (fused cupy
ConvAttn when cupy is installed + the automatically chosen window attention + CUDA graphs), and the same fed
through the stream pipeline (uint8 frames from the host through pinned buffers, copies overlapping compute).
Prints frames/s and ms/frame per row; paper, RTX 4090, fp32: ESC x4 21.9 ms, ESC-light x4 13.3 ms.

    python benchmarks/gpu_speed.py [--dtype float32|float16|bfloat16] [--frames 50] [--variants esc esc_light]

Weights are random (speed does not depend on them). Without CUDA it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np
import torch


def _time(fn, frames: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(frames):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / frames


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--variants", nargs="+", default=["esc", "esc_light"])
    parser.add_argument("--scales", nargs="+", type=int, default=[2, 4])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu_speed: no CUDA GPU visible to torch {torch.__version__}; nothing measured")
        return 0

    from esc_stream.checkpoints import ModelDescriptor
    from esc_stream.cuda.accelerate import CudaFrames, CudaOptions, accelerate
    from esc_stream.models import VARIANTS
    from esc_stream.reparam import prepare_for_inference
    from esc_stream.upscaler import Upscaler

    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, {args.dtype}, batch 1, 1280x720 output")
    print(f"{'network':<16} {'path':<34} {'ms/frame':>9} {'frames/s':>9}")
    for variant in args.variants:
        spec = VARIANTS[variant]
        for scale in args.scales:
            desc = ModelDescriptor(spec.arch, {"proj_ratio": 2.0, **spec.config}, scale, variant)
            torch.manual_seed(0)
            base = prepare_for_inference(desc.build()).to(device, dtype)
            h, w = 720 // scale, 1280 // scale
            x = torch.rand(1, 3, h, w, device=device, dtype=dtype)
            name = f"{variant} x{scale}"
            rows = []
            with torch.inference_mode():
                rows.append(("torch modules (exact attention)", _time(lambda m=base, x=x: m(x), args.frames)))
                for label, fused in (("fast paths, torch ConvAttn", "off"), ("fast paths, fused ConvAttn", "on")):
                    model = copy.deepcopy(base)
                    try:
                        net, report = accelerate(model, model, device, dtype, CudaOptions(fused=fused))
                    except ValueError as exc:
                        print(f"{name:<16} {label:<34} skipped: {exc}")
                        continue
                    rows.append(
                        (f"{label} ({'+'.join(sorted(report.attention))})", _time(lambda n=net, x=x: n(x), args.frames))
                    )
                up = Upscaler(copy.deepcopy(base), desc, device=device, dtype=dtype)
                frames = [np.random.default_rng(i).integers(0, 256, (h, w, 3), np.uint8) for i in range(args.frames)]
                cuda_frames = CudaFrames(up)
                list(cuda_frames.map(frames[:5]))
                t0 = time.perf_counter()
                n = sum(1 for _ in cuda_frames.map(frames))
                rows.append(("Upscaler + stream pipeline (uint8)", (time.perf_counter() - t0) / n))
            for label, sec in rows:
                print(f"{name:<16} {label:<34} {sec * 1e3:9.2f} {1 / sec:9.1f}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
