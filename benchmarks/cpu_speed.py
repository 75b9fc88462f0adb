"""CPU throughput of esc_stream against an official-style eager baseline, measured in the same run.

    python benchmarks/cpu_speed.py [--variant esc_light] [--scale 2] [--sizes 320x180,640x360,1280x720]
                                   [--baseline-sizes 320x180] [--repeat 3] [--threads N]
                                   [--backends torch,onnxruntime]

The baseline (`reference_forward` below) is a plain re-statement of the reference computation as the
official code runs it: eager fp32 NCHW, naive window attention over all windows at once (q·kᵀ/√d + bias,
softmax, ·v), the relative-position bias gathered and the geometric ensemble of the large kernel taken on
every call, LayerNorm with its affine, the dynamic 3x3 as its own grouped conv, and `cat` of the partial
channels. Ours is `esc_stream.Upscaler` with each back-end. Runs are interleaved (baseline, then each
back-end, repeated) so that load from other processes hits all of them alike; medians are printed.

Printed per size: baseline and ours in output Mpx/s, the ratio, the max-abs difference of ours against the
baseline, the model's GFLOP per frame (nominal: direct convolutions; executed: what ours computes, FFT
included), achieved GFLOP/s, and a 2048³ sgemm's GFLOP/s measured in the same run. Weights are random
(speed does not depend on their values). The torch back-end's window attention is the native kernel
(esc_stream.native, AVX-512 or AVX2) where it builds; `ESC_STREAM_NATIVE=0` measures it with PyTorch's SDPA instead.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esc_stream import native  # noqa: E402
from esc_stream.checkpoints import ModelDescriptor  # noqa: E402
from esc_stream.fast import LargeKernelFFT, large_kernel_of  # noqa: E402
from esc_stream.models import VARIANTS, create_model  # noqa: E402
from esc_stream.models.blocks import geometric_ensemble, relative_position_index  # noqa: E402
from esc_stream.upscaler import Upscaler  # noqa: E402

# ---------------------------------------------------------------- baseline: the reference computation, eager


def _ln(x: torch.Tensor, ln: torch.nn.Module) -> torch.Tensor:
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), ln.weight, ln.bias, 1e-6).permute(0, 3, 1, 2)


def _ffn(x: torch.Tensor, m: torch.nn.Module) -> torch.Tensor:
    x = F.gelu(F.conv2d(x, m.proj.weight, m.proj.bias))
    x = F.gelu(F.conv2d(x, m.dwc.weight, m.dwc.bias, padding=m.dwc.padding, groups=m.dwc.groups)) + x
    return F.conv2d(x, m.aggr.weight, m.aggr.bias)


def _naive_window_attention(x: torch.Tensor, m: torch.nn.Module) -> torch.Tensor:
    b, c, h0, w0 = x.shape
    ws, heads = m.window_size, m.num_heads
    x = F.pad(x, (0, (-w0) % ws, 0, (-h0) % ws), mode="reflect")  # features to whole windows
    h, w = x.shape[-2:]
    hd, n = c // heads, ws * ws
    nh, nw = h // ws, w // ws
    qkv = F.conv2d(x, m.to_qkv.weight, m.to_qkv.bias)
    qkv = qkv.view(b, 3, heads, hd, nh, ws, nw, ws).permute(1, 0, 4, 6, 2, 5, 7, 3).reshape(3, -1, heads, n, hd)
    q, k, v = qkv[0], qkv[1], qkv[2]
    bias = m.relative_position_bias[:, relative_position_index(ws).view(-1)].view(1, heads, n, n)
    attn = (q @ k.transpose(-2, -1)) / math.sqrt(hd) + bias
    out = attn.softmax(dim=-1) @ v
    out = out.view(b, nh, nw, heads, ws, ws, hd).permute(0, 3, 6, 1, 4, 2, 5).reshape(b, c, h, w)[:, :, :h0, :w0]
    return F.conv2d(out, m.to_out.weight, m.to_out.bias)


def _conv_attn(x: torch.Tensor, m: torch.nn.Module, lk: torch.Tensor) -> torch.Tensor:
    plk = m.plk
    x1, x2 = x[:, : plk.pdim], x[:, plk.pdim :]
    outs = []
    for i in range(x.shape[0]):  # the official eval path is batch 1: one dynamic kernel per call
        xi = x1[i : i + 1]
        dyn = plk.dwc_proj(xi).reshape(plk.pdim, 1, 3, 3)
        outs.append(F.conv2d(xi, lk, padding=lk.shape[-1] // 2) + F.conv2d(xi, dyn, padding=1, groups=plk.pdim))
    y = torch.cat([torch.cat(outs), x2], dim=1)
    return F.conv2d(y, m.aggr.weight, m.aggr.bias)


def reference_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ESC (esc, esc_light, esc_small; un-baked weights) on x, the features reflect-padded to whole windows
    inside each attention as the official code does."""
    lk = geometric_ensemble(model.plk_filter)
    feat = F.conv2d(x, model.proj.weight, model.proj.bias, padding=1)
    skip = feat
    for blk in model.blocks:
        block_in = feat
        feat = _ffn(_ln(feat, blk.ln_proj), blk.proj)
        feat = feat + _naive_window_attention(_ln(feat, blk.ln_attn), blk.attn)
        for ln, pconv, ffn in zip(blk.lns, blk.pconvs, blk.convffns, strict=True):
            h = _ffn(ln(feat), ffn)
            feat = feat + _conv_attn(h, pconv, lk)
        feat = F.conv2d(_ln(feat, blk.ln_out), blk.conv_out.weight, blk.conv_out.bias, padding=1) + block_in
    feat = F.conv2d(feat, model.last.weight, model.last.bias, padding=1) + skip
    s = model.upscaling_factor
    out = F.conv2d(feat, model.to_img.weight, model.to_img.bias, padding=1) + torch.repeat_interleave(x, s * s, dim=1)
    return F.pixel_shuffle(out, s)


# ---------------------------------------------------------------- operation count


def model_gflop(config: dict, scale: int, h: int, w: int, fft: LargeKernelFFT | None) -> float:
    """GFLOP (multiply-add = 2) per frame on an h x w input (sides multiples of the window).

    Convolutions, GEMMs and the two attention matmuls are counted exactly; with `fft`, the large kernel is
    counted as executed: real FFTs at 2.5·N·log2(N) per transform, the per-frequency channel mixing, the
    dynamic kernel's spectrum and product, instead of the direct 13x13. Softmax, GELU, LayerNorm and adds
    are not counted (they are not multiply-adds).
    """
    dim, pdim, k = config["dim"], config["pdim"], config["kernel_size"]
    ws = config["window_size"]
    hid_ffn = int(dim * config["exp_ratio"])
    hid_proj = int(dim * config.get("proj_ratio", 2.0))
    px = h * w

    def conv(cin: int, cout: int, ks: int, groups: int = 1) -> float:
        return 2.0 * cout * (cin // groups) * ks * ks * px

    def ffn(hid: int) -> float:
        return conv(dim, hid, 1) + conv(hid, hid, 3, hid) + conv(hid, dim, 1)

    n = ws * ws
    windows = (h // ws) * (w // ws)
    attention = conv(dim, 3 * dim, 1) + conv(dim, dim, 1) + 2 * (2.0 * n * n * dim) * windows
    if fft is None:
        large = conv(pdim, pdim, k) + conv(pdim, pdim, 3, pdim)
    else:
        p = fft.plan(h, w, torch.float32, torch.device("cpu"))
        r, c = p.rows, p.cols
        tiles = r.tiles * c.tiles
        freqs = r.nfft * (c.nfft // 2 + 1)
        transforms = 2 * pdim * tiles * 2.5 * r.nfft * c.nfft * math.log2(r.nfft * c.nfft)
        mixing = 2.0 * pdim * pdim * freqs * tiles * (2 if fft.real else 4)
        dynamic = 8.0 * pdim * (r.nfft * 9 + freqs * 3) + 8.0 * pdim * freqs * tiles
        large = transforms + mixing + dynamic
    conv_block = ffn(hid_ffn) + large + conv(dim, dim, 1)
    block = ffn(hid_proj) + attention + config["conv_blocks"] * conv_block + conv(dim, dim, 3)
    head = conv(3, dim, 3) + conv(dim, dim, 3) + conv(dim, 3 * scale * scale, 3)
    return (config["n_blocks"] * block + head) / 1e9


def sgemm_gflops(size: int = 2048, repeat: int = 3) -> float:
    a, b = torch.rand(size, size), torch.rand(size, size)
    a @ b
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best / 1e9


# ---------------------------------------------------------------- measurement


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s]  # type: ignore[misc]


def measure_size(
    model: torch.nn.Module, ups: dict[str, Upscaler], x: torch.Tensor, repeat: int, baseline: bool
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Median seconds per frame and last output of the baseline (optional) and each back-end, interleaved."""
    scale, ws = model.upscaling_factor, model.window_size
    h, w = x.shape[-2:]

    def base() -> torch.Tensor:  # the reference pads the frame to whole windows as the official test does
        xp = F.pad(x, (0, (-w) % ws, 0, (-h) % ws), mode="reflect")
        return reference_forward(model, xp)[:, :, : h * scale, : w * scale]

    fns: dict[str, Callable[[], torch.Tensor]] = {"baseline": base} if baseline else {}
    for name, up in ups.items():
        fns[name] = partial(up.upscale_tensor, x)
    times: dict[str, list[float]] = {name: [] for name in fns}
    outs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name in ups:  # warm-up: spectra, ONNX session
            fns[name]()
        for _ in range(repeat):
            for name, fn in fns.items():
                dt, outs[name] = _timed(fn)
                times[name].append(dt)
    return {name: statistics.median(t) for name, t in times.items()}, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="esc_light", choices=[v for v in VARIANTS if VARIANTS[v].arch == "ESC"])
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--sizes", default="320x180,640x360,1280x720", help="input sizes WxH for ours")
    ap.add_argument("--baseline-sizes", default="320x180", help="sizes where the baseline also runs (memory!)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--backends", default="torch,onnxruntime", help="comma list: torch, torch-eager, onnxruntime")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = VARIANTS[args.variant]
    config = {"proj_ratio": 2.0, **spec.config}
    torch.manual_seed(0)
    model = create_model(args.variant, args.scale).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    desc = ModelDescriptor(spec.arch, config, args.scale, args.variant)
    ups: dict[str, Upscaler] = {}
    for name in args.backends.split(","):
        fresh = desc.build()
        fresh.load_state_dict(model.state_dict())
        ups[name] = Upscaler(fresh, desc, backend=name)
    sg = sgemm_gflops()
    print(f"torch {torch.__version__}, {args.threads} of {os.cpu_count()} threads "
          f"({torch.backends.cpu.get_cpu_capability()}), {args.variant} x{args.scale}; "
          f"load average {os.getloadavg()[0]:.1f}; sgemm 2048³ {sg:.1f} GFLOP/s")  # fmt: skip
    attention = f"native {native.variant()} kernel" if native.available() else f"SDPA ({native.unavailable_reason()})"
    print(f"window attention of the torch back-end: {attention}")
    base_sizes = set(_parse_sizes(args.baseline_sizes))
    cols = ("input", "back-end", "ms/frame", "Mpx/s", "ratio", "max-abs", "GFLOP", "GFLOP/s", "of sgemm")
    print("{:>9} {:<12} {:>9} {:>8} {:>6} {:>8} {:>7} {:>8} {:>8}".format(*cols))
    ws = config["window_size"]
    for w, h in _parse_sizes(args.sizes):
        x = torch.rand(1, 3, h, w)
        hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
        medians, outs = measure_size(model, ups, x, args.repeat, (w, h) in base_sizes)
        base_t = medians.get("baseline")
        for name, dt in medians.items():
            fft = large_kernel_of(ups[name].model) if name in ups and ups[name].backend == "torch" else None
            gflop = model_gflop(config, args.scale, hp, wp, fft)
            ratio = f"{base_t / dt:6.2f}" if base_t else "     -"
            diff = f"{(outs[name] - outs['baseline']).abs().max().item():8.1e}" if base_t else "       -"
            print(f"{w:>4}x{h:<4} {name:<12} {dt * 1000:9.1f} {w * h * args.scale**2 / 1e6 / dt:8.4f} {ratio} {diff} "
                  f"{gflop:7.1f} {gflop / dt:8.1f} {gflop / dt / sg:8.0%}")  # fmt: skip
    print(f"GFLOP: executed multiply-adds x2 (baseline/eager/onnxruntime: direct 13x13; torch: FFT); "
          f"sgemm at the end {sgemm_gflops():.1f} GFLOP/s")  # fmt: skip


if __name__ == "__main__":
    main()
