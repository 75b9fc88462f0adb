"""Training-step speed on a CPU: window attention by the native kernels vs scaled_dot_product_attention.

    python benchmarks/train_speed.py [--variant esc_small] [--patch 64] [--batch 4] [--threads 2] [--repeat 5]

One training step = forward, L1 loss, backward and AdamW step on a batch of random LR patches, as
`training/train.py` runs it. Prints, for fp32 and (where the CPU has native bf16, or with --amp) bf16
autocast, the median step time and iterations per second with each attention, and the attention alone
(forward + backward of one block's shape). Stop other work first: on a shared or busy CPU the figures mean little.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from native_attention import _median_ms  # noqa: E402  (this folder: the same median timer)

from esc_stream import native  # noqa: E402
from esc_stream.models import create_model  # noqa: E402
from esc_stream.models.blocks import ConvolutionalAttention, WindowAttention  # noqa: E402
from training.train import native_bf16  # noqa: E402


def _median_s(fn: Callable[[], object], repeat: int) -> float:
    return _median_ms(fn, repeat) / 1000  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="esc_small")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--patch", type=int, default=64, help="LR patch size")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--channels-last", action="store_true", help="model and patches in channels_last memory format")
    ap.add_argument(
        "--amp",
        choices=["auto", "fp32", "bf16", "both"],
        default="auto",
        help="steps to time: auto = fp32, and bf16 autocast too where the CPU has native bf16 (emulated bf16 is slow)",
    )
    ap.add_argument(
        "--large-kernel",
        choices=["auto", "fft", "direct"],
        default="auto",
        help="ConvAttn's large-kernel conv in training: auto (the FFT at one thread), the FFT, or F.conv2d",
    )
    args = ap.parse_args()
    ConvolutionalAttention.fft_training = {"auto": None, "fft": True, "direct": False}[args.large_kernel]
    torch.set_num_threads(args.threads)
    if not native.training_available():
        reason = native.unavailable_reason() or "no AVX-512 or AVX2 build"
        print(f"native training kernels unavailable ({reason}): SDPA only")
    torch.manual_seed(0)
    model = create_model(args.variant, args.scale).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lr = torch.rand(args.batch, 3, args.patch, args.patch)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
        lr = lr.contiguous(memory_format=torch.channels_last)
    hr = torch.rand(args.batch, 3, args.patch * args.scale, args.patch * args.scale)
    print(
        f"{args.variant} x{args.scale}, {args.batch} x {args.patch}x{args.patch} LR patches, {args.threads} threads, "
        f"{'channels_last, ' if args.channels_last else ''}large kernel {args.large_kernel}, "
        f"median of {args.repeat}"
    )

    def step(amp: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(lr)
        loss = F.l1_loss(out.float(), hr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    kinds = [False, True] if native.training_available() else [False]
    amps = {"fp32": [False], "bf16": [True], "both": [False, True]}.get(args.amp, [False])
    if args.amp == "auto" and native_bf16(torch.device("cpu")):
        amps = [False, True]
    for amp in amps:
        times = {}
        mode = "bf16" if amp else "fp32"
        for use in kinds:
            WindowAttention.native_training = use
            times[use] = _median_s(lambda amp=amp: step(amp), args.repeat)
            name = "native kernels" if use else "SDPA (math)"
            print(f"  {mode} step, {name:15s} {times[use] * 1000:7.0f} ms  {1 / times[use]:.2f} it/s")
        if len(times) == 2:
            print(f"  {mode} speed-up {times[False] / times[True]:.2f}x")

    # the attention alone: one block's windows, forward + backward
    attn = next(m for m in model.modules() if isinstance(m, WindowAttention))
    heads, n = attn.num_heads, attn.window_size**2
    pad = -args.patch % attn.window_size
    windows = args.batch * ((args.patch + pad) // attn.window_size) ** 2
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(windows * n, 3 * attn.dim, generator=g).requires_grad_()
    bias = torch.randn(heads, n, n, generator=g).requires_grad_()
    grad = torch.randn(windows * n, attn.dim, generator=g)
    scale = (attn.dim // heads) ** -0.5

    def sdpa() -> None:
        q, k, v = qkv.view(windows, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None])
        out.permute(0, 2, 1, 3).reshape(windows * n, attn.dim).backward(grad)

    def ours() -> None:
        native.window_attention_train(qkv, bias, heads, n, scale).backward(grad)

    print(f"attention forward + backward, {windows} windows x {heads} heads x {n} tokens (fp32):")
    t_sdpa = _median_s(sdpa, args.repeat)
    print(f"  SDPA (math)     {t_sdpa * 1000:7.1f} ms")
    if native.training_available():
        t_ours = _median_s(ours, args.repeat)
        print(f"  native kernels  {t_ours * 1000:7.1f} ms  ({t_sdpa / t_ours:.1f}x)")


if __name__ == "__main__":
    main()
