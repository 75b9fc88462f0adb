"""The native window-attention kernel against PyTorch's scaled_dot_product_attention, same data, same threads.

    python benchmarks/native_attention.py [--windows 10] [--heads 4] [--window 32] [--threads 1] [--repeat 5]

ESC-light's attention shape: windows of 32x32 tokens, 4 heads of 16, a (heads, N, N) relative-position bias.
Prints milliseconds (median), GFLOP/s (q·kᵀ and p·v, multiply-add = 2) and the max-abs difference from SDPA
for SDPA and for every build of esc_stream.native this CPU runs (AVX-512, AVX2). For SDPA as an AVX2-only
machine runs it, set ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esc_stream import native  # noqa: E402


def _median_ms(fn: Callable[[], torch.Tensor], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--window", type=int, default=32, help="window side (tokens = side²)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w, h, n = args.windows, args.heads, args.window**2
    torch.manual_seed(0)
    qkv = torch.randn(w * n, 3 * h * 16)
    bias = torch.randn(h, n, n)
    scale = 16**-0.5

    def sdpa() -> torch.Tensor:
        q, k, v = qkv.view(w, n, 3, h, 16).permute(2, 3, 0, 1, 4).unbind(0)  # head-major, as esc_stream.fast
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(h, 1, n, n))
        return out.permute(1, 2, 0, 3).reshape(w * n, h * 16)

    with torch.inference_mode():
        ref = sdpa()
        gflop = 4 * w * h * n * n * 16 / 1e9
        print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), {args.threads} thread(s); "
              f"{w} windows x {h} heads x {n} tokens, head size 16: {gflop:.2f} GFLOP")  # fmt: skip
        print(f"{'kernel':<26} {'ms':>8} {'GFLOP/s':>8} {'max-abs':>8}")
        runs: list[tuple[str, Callable[[], torch.Tensor]]] = [("scaled_dot_product_attention", sdpa)]
        for build in native.supported_variants():
            runs.append((f"native {build}", lambda b=build: native.window_attention(qkv, bias, h, n, scale, build=b)))
        for name, fn in runs:
            try:
                ms = _median_ms(fn, args.repeat)
            except RuntimeError as exc:
                print(f"{name:<26} unavailable: {exc}")
                continue
            diff = (fn() - ref).abs().max().item()
            print(f"{name:<26} {ms:8.1f} {gflop / ms * 1000:8.1f} {diff:8.1e}")


if __name__ == "__main__":
    main()
