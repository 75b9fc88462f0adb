"""Fused ConvAttn on CUDA: the kernels of `kernels/convattn.cu`, launched through cupy on torch's current stream.

Nothing here imports cupy at module import time: CPU-only installs never need it (`esc-stream[cuda]` brings it).
The launch geometry and compile definitions are plain functions so that the CPU tests compile and run the same
source with the same geometry (tests/test_cuda_path.py).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

KERNEL_DIR = Path(__file__).parent / "kernels"
SOURCE = KERNEL_DIR / "convattn.cu"
EMULATION_HEADER = KERNEL_DIR / "emu.h"
# One place for the compile-time constants: passed as -D to NVRTC, nvcc and g++ alike.
DEFINES = {"CA_TILE": 16, "CA_OCB": 8, "CA_MAX_K": 15}
DYNAMIC_SIZE = 3

Dim3 = tuple[int, int, int]


def kernel_source() -> str:
    """The kernel text cupy compiles (and the tests compile for the CPU)."""
    return SOURCE.read_text()


def define_flags(defines: dict[str, int] | None = None) -> tuple[str, ...]:
    return tuple(f"-D{k}={v}" for k, v in (defines or DEFINES).items())


def launch_geometry(kind: str, batch: int, pdim: int, h: int, w: int, defines: dict[str, int] | None = None):
    """(grid, block) for `convattn_dense` or `convattn_fp`, as the kernel's header comment specifies."""
    d = defines or DEFINES
    tile = d["CA_TILE"]
    groups = -(-pdim // d["CA_OCB"]) if kind == "dense" else pdim
    grid: Dim3 = (-(-w // tile), -(-h // tile), batch * groups)
    block: Dim3 = (tile, tile, 1)
    return grid, block


def check_kernel_size(k: int, defines: dict[str, int] | None = None) -> None:
    """The kernels stage at most CA_MAX_K² taps and fold the 3x3 dynamic kernel into an odd centre."""
    limit = (defines or DEFINES)["CA_MAX_K"]
    if k % 2 == 0 or not DYNAMIC_SIZE <= k <= limit:
        raise ValueError(f"fused ConvAttn needs an odd large kernel of {DYNAMIC_SIZE}..{limit} taps, got {k}")


# ---- torch references: what the kernels compute, written with the same ops as the model -------------------


def reference_dense(x: torch.Tensor, lk: torch.Tensor, dyn: torch.Tensor) -> torch.Tensor:
    """ESC ConvAttn on the first P channels: conv(x1, lk) + per-image depthwise conv(x1, dyn); (B, P, H, W)."""
    p = lk.shape[0]
    x1 = x[:, :p]
    b, _, h, w = x1.shape
    small = F.conv2d(x1.reshape(1, b * p, h, w), dyn.reshape(b * p, 1, 3, 3), padding=1, groups=b * p)
    return F.conv2d(x1, lk, padding=lk.shape[-1] // 2) + small.view(b, p, h, w)


def reference_fp(x: torch.Tensor, lk_channel: torch.Tensor, lk_spatial: torch.Tensor, dyn: torch.Tensor):
    """ESC-FP ConvAttn on the first P channels: 1x1 mix, then per-image (large + dynamic) depthwise conv."""
    p = lk_channel.shape[0]
    k = lk_spatial.shape[-1]
    b, _, h, w = x.shape
    m = (k - 3) // 2
    kernels = F.pad(dyn.reshape(b * p, 1, 3, 3), (m, m, m, m)) + lk_spatial.reshape(p, 1, k, k).repeat(b, 1, 1, 1)
    mixed = F.conv2d(x[:, :p], lk_channel.reshape(p, p, 1, 1))
    out = F.conv2d(mixed.reshape(1, b * p, h, w), kernels.reshape(b * p, 1, k, k), padding=k // 2, groups=b * p)
    return out.view(b, p, h, w)


# ---- cupy launch ---------------------------------------------------------------------------------------------


@functools.cache
def _module() -> Any:
    import cupy  # the optional extra `esc-stream[cuda]`

    return cupy.RawModule(code=kernel_source(), options=("--std=c++14", *define_flags()))


def _launch(name: str, x: torch.Tensor, tensors: list[torch.Tensor], out: torch.Tensor, p: int, k: int) -> None:
    """Run kernel `name` on torch's current stream; tensors cross to cupy by DLPack, without a copy."""
    import cupy

    b, _, h, w = x.shape
    grid, block = launch_geometry("dense" if name == "convattn_dense" else "fp", b, p, h, w)
    stream = torch.cuda.current_stream(x.device)
    with cupy.cuda.Device(x.device.index), cupy.cuda.ExternalStream(stream.cuda_stream):
        arrays = [cupy.from_dlpack(t.detach()) for t in (x, *tensors, out)]
        scalars = (np.int32(p), np.int32(h), np.int32(w), np.int32(k), np.int64(x.stride(0)), np.int64(out.stride(0)))
        _module().get_function(name)(grid, block, (*arrays, *scalars))


def _float_input(x: torch.Tensor, p: int) -> torch.Tensor:
    """The kernel reads float32 NCHW: full-width float32 input is read in place, anything else is widened."""
    if x.dtype == torch.float32 and x.is_contiguous():
        return x
    return x[:, :p].float().contiguous()


def _assemble(x: torch.Tensor, p: int, run) -> torch.Tensor:
    """Output = kernel result on channels [0, P) and the untouched channels [P, C): written in place when float32."""
    xf = _float_input(x, p)
    if x.dtype == torch.float32 and xf is x:
        out = torch.empty_like(x)
        out[:, p:] = x[:, p:]
        run(xf, out)
        return out
    part = torch.empty((x.shape[0], p, *x.shape[-2:]), device=x.device, dtype=torch.float32)
    run(xf, part)
    return torch.cat([part.to(x.dtype), x[:, p:]], dim=1)


def fused_dense(x: torch.Tensor, lk: torch.Tensor, dyn: torch.Tensor) -> torch.Tensor:
    """ESC ConvAttn as one kernel: (B, C, H, W) -> (B, C, H, W), channels [P, C) passed through."""
    p, k = lk.shape[0], lk.shape[-1]
    check_kernel_size(k)
    lkf = lk.float().contiguous()
    dynf = dyn.float().reshape(x.shape[0], p, 9).contiguous()
    return _assemble(x, p, lambda xf, out: _launch("convattn_dense", xf, [lkf, dynf], out, p, k))


def fused_fp(x: torch.Tensor, lk_channel: torch.Tensor, lk_spatial: torch.Tensor, dyn: torch.Tensor) -> torch.Tensor:
    """ESC-FP ConvAttn as one kernel (1x1 mix, large + dynamic depthwise): (B, C, H, W) -> (B, C, H, W)."""
    p, k = lk_channel.shape[0], lk_spatial.shape[-1]
    check_kernel_size(k)
    mix = lk_channel.float().reshape(p, p).contiguous()
    spatial = lk_spatial.float().reshape(p, k, k).contiguous()
    dynf = dyn.float().reshape(x.shape[0], p, 9).contiguous()
    return _assemble(x, p, lambda xf, out: _launch("convattn_fp", xf, [mix, spatial, dynf], out, p, k))


class FusedConvAttn(nn.Module):
    """Drop-in for `blocks.ConvolutionalAttention` (same parameters, shared): forward(x, lk_filter)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.pdim = int(inner.pdim)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, lk_filter: torch.Tensor) -> torch.Tensor:
        dyn = self.inner.dynamic_kernels(x[:, : self.pdim])  # type: ignore[operator]
        return fused_dense(x.contiguous(), lk_filter, dyn)


class FusedDecomposedConvAttn(nn.Module):
    """Drop-in for `esc_fp.DecomposedConvolutionalAttention`: forward(x, lk_channel, lk_spatial)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.pdim = int(inner.pdim)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, lk_channel: torch.Tensor, lk_spatial: torch.Tensor) -> torch.Tensor:
        dyn = self.inner.proj(x[:, : self.pdim])  # type: ignore[operator]
        return fused_fp(x.contiguous(), lk_channel, lk_spatial, dyn)


def fuse_convattn(model: nn.Module) -> int:
    """Swap every ConvAttn of `model` for its fused form (in place); returns how many were swapped."""
    from ..models.blocks import ConvolutionalAttention
    from ..models.esc_fp import DecomposedConvolutionalAttention

    swapped = 0
    for module in list(model.modules()):
        inner = getattr(module, "plk", None)
        if type(inner) is ConvolutionalAttention:
            module.plk = FusedConvAttn(inner)
            swapped += 1
        elif type(inner) is DecomposedConvolutionalAttention:
            module.plk = FusedDecomposedConvAttn(inner)
            swapped += 1
    return swapped
