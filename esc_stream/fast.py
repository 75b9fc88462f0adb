"""CPU fast path for the ESC family: the same function as the reference modules, computed with fewer FLOPs/bytes.

`accelerate(model)` swaps every `Block` of a model prepared by `reparam.prepare_for_inference` for a
`FastBlock` that shares its parameters. What changes, and why it stays exact (tests/test_fast.py, ≤ 1e-4):

- **Large kernel by FFT.** The shared 13x13 pdim->pdim kernel (15 uses per frame in ESC-light) is a linear
  convolution with zero padding; it is computed by overlap-save FFT tiles. The filter spectrum is made once
  per frame size (in float64, by DFT matrices) and reused by every layer. Because the baked filter is the
  mean over the 8 symmetries of the square, its spectrum with centred phase is real, so the per-frequency
  channel mixing is a real batched matmul (half the bytes of a complex one).
  `LargeKernelFFT.conv_nhwc` (the ESC path) transforms NHWC (H, W, C, tiles) arrays over their spatial
  axes, so a frequency's channels and tiles are already the mixing GEMM's operand (no spectrum transposes),
  a cache-sized group of tiles at a time.
- **Dynamic 3x3.** The instance-dependent depthwise 3x3 kernel is a small depthwise convolution beside the
  FFT on the NHWC path; the NCHW path (ESC-FP's decomposed kernel, other layouts) adds it in the frequency
  domain (its spectrum is two tiny DFT-matrix products).
- **oneDNN fused operators.** 1x1s are GEMMs with GELU or the residual add in their epilogue
  (`mkldnn::_linear_pointwise`), the depthwise 3x3 carries its GELU and `conv_out` its residual
  (`mkldnn::_convolution_pointwise`); elsewhere (other dtypes, autograd) the plain operators run.
- **FFNs in row bands.** Each ConvFFN runs on bands of rows (one halo row each side for its 3x3), so its
  expand GEMM, depthwise 3x3 and the GEMMs after it read each other's results from cache.
- **Folded 1x1s, no concatenation.** The FFN's last 1x1 and ConvAttn's 1x1 mixer are consecutive linear maps:
  only the pdim large-kernel channels are computed on their own, the mixer's share of the rest is one GEMM
  with the product matrix, and the partial channels are never copied back into a full tensor. The residual
  is updated in place, band by band.
- **Window attention in blocks** of windows: gather the 64-channel input (LayerNorm applied as gathered), the
  qkv GEMM, attention, the output GEMM, and the add into the residual through a strided view; no
  un-partition copy. Attention is the native kernel of `esc_stream.native` (AVX-512 or AVX2) where it
  builds (q/k/v read from the GEMM's rows, heads written side by side), else
  `scaled_dot_product_attention` head-major (one head's bias stays in cache across windows).
- **channels_last end to end**: every 1x1 convolution is a GEMM on the NHWC view; 3x3 convolutions stay
  oneDNN calls on channels_last tensors.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .models.blocks import Block, ConvAttnWrapper, ConvFFN, LayerNorm, WindowAttention, reflect_pad
from .models.esc import PixelShuffleSkip
from .models.esc_fp import DecomposedConvolutionalAttentionWrapper

# Largest filter spectrum kept per frame size (bytes); tiles are sized to stay under it.
SPECTRUM_BUDGET = 48 * 2**20
# The NHWC path transforms tiles in groups with at most this many bytes of spectrum (cache-sized).
FFT_GROUP_BYTES = 8 * 2**20
# Channel mixing of at most this many (in, out) pairs runs in the native loop (esc_stream.native.spectral_mix);
# ESC_STREAM_NATIVE_MIX=0 keeps the batched GEMM.
SMALL_MIX = 12 * 12
# LayerNorms over at most this many channels run in the native loop too (esc_stream.native.layer_norm_rows).
SMALL_NORM = 32
NATIVE_MIX = os.environ.get("ESC_STREAM_NATIVE_MIX", "1") != "0"
# Spectra kept for the most recent frame sizes (tiles at frame borders have their own sizes).
CACHE_SIZES = 32
CACHE_BYTES = 4 * SPECTRUM_BUDGET
# A spectrum is made in bands of frequency rows whose float64 values take at most this many bytes.
SPECTRUM_BAND_BYTES = 4 * 2**20


def next_fast_even(n: int) -> int:
    """Smallest even m >= n whose prime factors are 2, 3, 5, 7 (sizes the FFT library handles fastest)."""
    m = max(2, n + (n % 2))
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 2


@dataclass(frozen=True)
class AxisPlan:
    """Overlap-save tiling of one axis: `tiles` cores of `core` samples, each transformed at `nfft` points."""

    tiles: int
    core: int
    nfft: int


def plan_axis(length: int, halo: int, max_fft: int) -> AxisPlan:
    """Fewest equal tiles whose core plus `halo` fits in `max_fft` points."""
    tiles = max(1, math.ceil(length / max(1, max_fft - halo)))
    core = math.ceil(length / tiles)
    return AxisPlan(tiles, core, next_fast_even(core + halo))


def centred_dft(nfft: int, size: int, half: bool) -> torch.Tensor:
    """(freqs, size) complex128 matrix: spectrum of a centred `size`-tap kernel, taps at offsets -size//2..."""
    freqs = nfft // 2 + 1 if half else nfft
    f = torch.arange(freqs, dtype=torch.float64)[:, None]
    offset = (size // 2 - torch.arange(size, dtype=torch.float64))[None, :]
    return torch.exp(-2j * math.pi * f * offset / nfft)


@dataclass
class _SizePlan:
    rows: AxisPlan
    cols: AxisPlan
    spectrum: torch.Tensor  # dense real: (F, I, O); dense complex: (F, I, O); depthwise: (O, Fh, Fw)
    dyn_rows: torch.Tensor  # (Fh, d) complex64: DFT matrices for the dynamic kernel
    dyn_cols: torch.Tensor  # (Fw, d)
    dtype: torch.dtype  # the data type it serves


class LargeKernelFFT:
    """A same-padded k x k convolution computed by FFT tiles, optionally plus a per-sample depthwise kernel.

    `mode="dense"`: weight (O, I, k, k), output_o = sum_i w_oi * x_i (+ dyn_o * x_o);
    `mode="depthwise"`: weight (C, 1, k, k), output_c = (w_c + dyn_c) * x_c.
    """

    def __init__(self, weight: torch.Tensor, mode: str = "dense", dyn_size: int = 3) -> None:
        if mode not in ("dense", "depthwise"):
            raise ValueError(f"mode must be dense or depthwise, got {mode!r}")
        self.weight = weight.detach().to(torch.float64)
        self.mode = mode
        self.k = weight.shape[-1]
        self.dyn_size = dyn_size
        w = self.weight
        # symmetric under flips and transposition -> real spectrum with centred phase
        sym = [w.flip(-1), w.flip(-2), w.transpose(-1, -2)]
        scale = float(w.abs().max()) or 1.0
        self.real = mode == "dense" and all(float((w - s).abs().max()) <= 1e-6 * scale for s in sym)
        pairs = weight.shape[0] * (weight.shape[1] if mode == "dense" else 1)
        bytes_per = 4 if self.real else 8
        self.max_fft = max(2 * self.k, int(math.sqrt(2 * SPECTRUM_BUDGET / (bytes_per * pairs))))
        self._plans: OrderedDict[tuple[int, int, torch.dtype, str], _SizePlan] = OrderedDict()

    def plan(self, h: int, w: int, dtype: torch.dtype, device: torch.device) -> _SizePlan:
        key = (h, w, dtype, str(device))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._make_plan(h, w, dtype, device)
            self._plans[key] = plan
            while len(self._plans) > 1 and (len(self._plans) > CACHE_SIZES or self._cached_bytes() > CACHE_BYTES):
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def _cached_bytes(self) -> int:
        """Bytes of the cached spectra (sizes with the same FFT lengths share one)."""
        unique = {id(p.spectrum): p.spectrum for p in self._plans.values()}
        return sum(s.numel() * s.element_size() for s in unique.values())

    def _make_plan(self, h: int, w: int, dtype: torch.dtype, device: torch.device) -> _SizePlan:
        rows, cols = plan_axis(h, self.k - 1, self.max_fft), plan_axis(w, self.k - 1, self.max_fft)
        for p in self._plans.values():  # the spectrum depends on the FFT lengths only, not on the frame size
            s = p.spectrum
            if (p.rows.nfft, p.cols.nfft) == (rows.nfft, cols.nfft) and s.device == device and p.dtype == dtype:
                return _SizePlan(rows, cols, s, p.dyn_rows, p.dyn_cols, dtype)
        cdtype = torch.complex64 if dtype != torch.float64 else torch.complex128
        d = self.dyn_size
        return _SizePlan(
            rows,
            cols,
            self._spectrum(rows.nfft, cols.nfft, dtype, cdtype).to(device),
            centred_dft(rows.nfft, d, half=False).to(cdtype).to(device),
            centred_dft(cols.nfft, d, half=True).to(cdtype).to(device),
            dtype,
        )

    def _spectrum(self, nfft_h: int, nfft_w: int, dtype: torch.dtype, cdtype: torch.dtype) -> torch.Tensor:
        """The filter spectrum at (nfft_h, nfft_w) points, computed in float64 and stored in `dtype` (real) or
        `cdtype`: dense (F, I, O), depthwise (C, Fh, Fw). The column DFT is applied first (a small
        (O, I, k, Fw) array), then the row DFT a band of rows at a time, each band cast into the result as it
        is made: the full-precision spectrum (4x the stored one) never exists at once."""
        ey = centred_dft(nfft_h, self.k, half=False)  # (Fh, k)
        ex = centred_dft(nfft_w, self.k, half=True)  # (Fw, k)
        fh, fw = ey.shape[0], ex.shape[0]
        if self.real:  # a kernel symmetric under flips: the imaginary parts cancel, the cosines suffice
            ey, ex = ey.real.contiguous(), ex.real.contiguous()
        cols = torch.einsum("oiab,gb->oiag", self.weight.to(ex.dtype), ex)  # (O, I, k, Fw)
        o, i = cols.shape[:2]
        band = max(1, SPECTRUM_BAND_BYTES // (fw * o * i * cols.element_size()))
        if self.mode == "dense":
            out = torch.empty(fh, fw, i, o, dtype=dtype if self.real else cdtype)
            for f0 in range(0, fh, band):
                part = torch.einsum("fa,oiag->fgio", ey[f0 : f0 + band], cols)
                out[f0 : f0 + band].copy_(part)
            return out.view(fh * fw, i, o)
        out = torch.empty(o, fh, fw, dtype=cdtype)
        for f0 in range(0, fh, band):
            out[:, f0 : f0 + band].copy_(torch.einsum("fa,cag->cfg", ey[f0 : f0 + band], cols[:, 0]))
        return out

    def __call__(self, x: torch.Tensor, dyn: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) any layout; dyn: (B*O, 1, d, d) or None. Returns (B, O, H, W) contiguous."""
        if x.dtype not in (torch.float32, torch.float64):  # no FFT in half precisions: compute in float32
            out = self(x.float(), None if dyn is None else dyn.float())
            return out.to(x.dtype)
        b, _, h, w = x.shape
        p = self.plan(h, w, x.dtype, x.device)
        r, c, pad = p.rows, p.cols, self.k // 2
        halo = self.k - 1
        x = F.pad(x, (pad, c.tiles * c.core - w + pad, pad, r.tiles * r.core - h + pad))
        tiles = x.unfold(2, r.core + halo, r.core).unfold(3, c.core + halo, c.core)  # (B, C, ty, tx, th, tw)
        spec_x = torch.fft.rfft2(tiles, s=(r.nfft, c.nfft))  # (B, C, ty, tx, Fh, Fw)
        spec_y = self._mix(spec_x, p)
        if dyn is not None:
            dk = dyn.reshape(b, -1, self.dyn_size, self.dyn_size).to(p.dyn_rows.dtype)
            dyn_spec = p.dyn_rows @ dk @ p.dyn_cols.transpose(0, 1)  # (B, O, Fh, Fw)
            spec_y = spec_y + dyn_spec[:, :, None, None] * spec_x  # O == C: the dynamic kernel is depthwise
        y = torch.fft.irfft2(spec_y, s=(r.nfft, c.nfft))[..., pad : pad + r.core, pad : pad + c.core]
        o = y.shape[1]
        y = y.permute(0, 1, 2, 4, 3, 5).reshape(b, o, r.tiles * r.core, c.tiles * c.core)
        return y[:, :, :h, :w].contiguous()

    def _mix(self, spec_x: torch.Tensor, p: _SizePlan) -> torch.Tensor:
        """Apply the filter spectrum: per-frequency channel mixing (dense) or a product (depthwise)."""
        if self.mode == "depthwise":
            return spec_x * p.spectrum[None, :, None, None]
        b, i, ty, tx, fh, fw = spec_x.shape
        o = p.spectrum.shape[-1]
        if self.real:  # real and imaginary parts are mixed by the same real matrix: rows of one GEMM each
            xr = torch.view_as_real(spec_x).permute(4, 5, 0, 2, 3, 6, 1).reshape(fh * fw, -1, i)
            yr = torch.bmm(xr, p.spectrum).view(fh, fw, b, ty, tx, 2, o).permute(2, 6, 3, 4, 0, 1, 5)
            return torch.view_as_complex(yr.contiguous())
        xc = spec_x.permute(4, 5, 0, 2, 3, 1).reshape(fh * fw, -1, i)
        return torch.bmm(xc, p.spectrum).view(fh, fw, b, ty, tx, o).permute(2, 5, 3, 4, 0, 1)

    def conv_nhwc(self, x: torch.Tensor, dyn: torch.Tensor | None = None) -> torch.Tensor:
        """The same convolution on NHWC data: x (B, H, W, C), dyn (B*O, 1, d, d) or None; returns (B, H, W, O)
        contiguous.

        For a dense kernel with a real spectrum the transforms run over the two spatial axes of
        (H, W, C, tiles) arrays, so each frequency's channels and tiles are already one (C, 2*tiles) real
        matrix: the mixing is one batched GEMM with the (C, O) spectrum, and the only copies are of
        (frequency, 2*tiles, O) products, not of whole spectra. Tiles go through in groups along a row of
        tiles (FFT_GROUP_BYTES of spectrum at most), so a large frame's spectra never leave the cache."""
        if not (self.mode == "dense" and self.real and x.dtype in (torch.float32, torch.float64)):
            return self(x.permute(0, 3, 1, 2), dyn).permute(0, 2, 3, 1).contiguous()
        b, h, w, ci = x.shape
        p = self.plan(h, w, x.dtype, x.device)
        r, c, pad, halo = p.rows, p.cols, self.k // 2, self.k - 1
        o = p.spectrum.shape[2]
        fh, fw = r.nfft, c.nfft // 2 + 1
        group = max(1, FFT_GROUP_BYTES // (fh * fw * ci * 2 * x.element_size()))
        # few channels (the CPU models' 8 or 12): a batched GEMM of tiny matrices is mostly per-matrix overhead
        small = ci * o <= SMALL_MIX and x.dtype == torch.float32 and NATIVE_MIX
        out = x.new_empty(b, h, w, o)
        for i in range(b):
            for ty in range(r.tiles):
                y0, y1 = ty * r.core, min((ty + 1) * r.core, h)
                for tx0 in range(0, c.tiles, group):
                    tx1 = min(tx0 + group, c.tiles)
                    nt = tx1 - tx0
                    ra, rb, ca, cb = y0 - pad, y0 + r.core + pad, tx0 * c.core - pad, tx1 * c.core + pad
                    slab = x[i, max(ra, 0) : min(rb, h), max(ca, 0) : min(cb, w)]
                    slab = F.pad(slab, (0, 0, max(ca, 0) - ca, cb - min(cb, w), max(ra, 0) - ra, rb - min(rb, h)))
                    tiles = slab.unfold(1, c.core + halo, c.core).permute(0, 3, 2, 1)  # (th, tw, C, nt)
                    spec = torch.fft.rfft2(tiles, s=(r.nfft, c.nfft), dim=(0, 1)).contiguous()  # (Fh, Fw, C, nt)
                    xs = torch.view_as_real(spec).view(fh * fw, ci, 2 * nt)
                    ys = native.spectral_mix(xs, p.spectrum) if small else None  # (F, O, 2*nt)
                    if ys is None:
                        ys = torch.bmm(xs.transpose(1, 2), p.spectrum).transpose(1, 2).contiguous()
                    yc = torch.view_as_complex(ys.view(fh * fw, o, nt, 2)).view(fh, fw, o, nt)
                    yt = torch.fft.irfft2(yc, s=(r.nfft, c.nfft), dim=(0, 1))[pad : pad + r.core, pad : pad + c.core]
                    x1 = min(tx1 * c.core, w)
                    blk = yt.permute(0, 3, 1, 2).reshape(r.core, nt * c.core, o)  # (core_r, nt*core_c, O)
                    out[i, y0:y1, tx0 * c.core : x1].copy_(blk[: y1 - y0, : x1 - tx0 * c.core])
        if dyn is not None:  # O == C: the small per-sample depthwise kernel, directly on the NHWC data
            for i in range(b):
                xi = x[i : i + 1].permute(0, 3, 1, 2)  # channels_last NCHW view
                k = dyn.view(b, o, 1, self.dyn_size, self.dyn_size)[i]
                out[i].add_(F.conv2d(xi, k, padding=self.dyn_size // 2, groups=o)[0].permute(1, 2, 0))
        return out


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """NHWC view of a channels_last NCHW tensor (a copy only if it is not channels_last)."""
    return x.permute(0, 2, 3, 1).contiguous()


def _nchw(x: torch.Tensor) -> torch.Tensor:
    """NCHW (channels_last) view of an NHWC tensor."""
    return x.permute(0, 3, 1, 2)


# oneDNN's fused operators (the ones Inductor's freezing passes emit): a GEMM or convolution with GELU or a
# residual add applied to its output tile while it is still in cache, instead of another pass over memory.
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _fused(x: torch.Tensor) -> bool:
    """True where the oneDNN fused operators apply: float32 on the CPU, no autograd graph to record."""
    return _ONEDNN and x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()


def _gemm(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """(N, in) rows -> (N, out): rows @ weight.T + bias, then GELU (erf) if asked; weight is (out, in)."""
    if _fused(rows):
        return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "gelu" if gelu else "none", [], "none")
    y = F.linear(rows, weight, bias)
    return F.gelu(y) if gelu else y


def _gemm_add(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
    """A new (N, out) tensor: rows @ weight.T + bias + other."""
    if _fused(rows):
        return torch.ops.mkldnn._linear_pointwise.binary(rows, other, weight, bias, "add")
    return torch.addmm(other if bias is None else other + bias, rows, weight.t())


def _conv_gelu(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """GELU(conv(x)) for a channels_last x (zero padding, as the models' convolutions)."""
    if _fused(x):
        return torch.ops.mkldnn._convolution_pointwise(
            x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups, "gelu", [], "none"
        )
    return F.gelu(conv(x))


def _conv_add(x: torch.Tensor, conv: nn.Conv2d, other: torch.Tensor) -> torch.Tensor:
    """A new tensor conv(x) + other, both channels_last."""
    if _fused(x):
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups,
            "add", None, None, [], None,
        )  # fmt: skip
    return conv(x).add_(other)


def _weight2d(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.view(conv.weight.shape[0], -1)


# The FFNs run on bands of rows whose hidden activations stay under this many bytes, so that the expand
# GEMM, the depthwise 3x3 and the GEMMs after it read each other's results from cache, not from memory.
BAND_BYTES = 4 * 2**20
MIN_BAND_ROWS = 16


def _norm_rows(ln: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The channel LayerNorm (or identity) of an NHWC slab."""
    if isinstance(ln, nn.Identity):
        return x
    assert isinstance(ln, LayerNorm)
    affine = type(ln) is LayerNorm  # not folded into the next 1x1
    c = x.shape[-1]
    weight, bias = (ln.weight, ln.bias) if affine else (None, None)
    if c <= SMALL_NORM and NATIVE_MIX and _fused(x):  # the generic kernel's per-row setup dominates at few channels
        y = native.layer_norm_rows(x.contiguous(), weight, bias, ln.eps)
        if y is not None:
            return y
    return F.layer_norm(x, (c,), weight, bias, ln.eps)


def _ffn_bands(ffn: ConvFFN, ln: nn.Module, x: torch.Tensor) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """Band by band, the FFN of ln(x) up to its last 1x1: yields (batch index, first row, end row, d) with
    d = GELU(dwc(h)) + h, h = GELU(proj(ln(x))), as (rows*W, hidden) NHWC rows. x is NHWC (B, H, W, C).

    Each band is computed from its rows plus one halo row above and below (the 3x3's reach); at the frame's
    edges there is no halo and the convolution's own zero padding applies, as in the full-frame computation.
    """
    b, hh, ww, c = x.shape
    hid = ffn.proj.weight.shape[0]
    band = max(MIN_BAND_ROWS, BAND_BYTES // (ww * hid * x.element_size()))
    w_proj = _weight2d(ffn.proj)
    for bi in range(b):
        for r0 in range(0, hh, band):
            r1 = min(r0 + band, hh)
            a0, a1 = max(r0 - 1, 0), min(r1 + 1, hh)
            rows = _norm_rows(ln, x[bi, a0:a1]).reshape(-1, c)
            h = _nchw(_gemm(rows, w_proj, ffn.proj.bias, gelu=True).view(1, a1 - a0, ww, hid))
            d = _conv_gelu(h, ffn.dwc)[:, :, r0 - a0 : r1 - a0].add_(h[:, :, r0 - a0 : r1 - a0])
            yield bi, r0, r1, _nhwc(d).view(-1, hid)


def conv_ffn(ffn: ConvFFN, x: torch.Tensor, ln: nn.Module | None = None) -> torch.Tensor:
    """ConvFFN of ln(x) on a channels_last tensor; returns a new channels_last tensor."""
    xr = _nhwc(x)
    out = torch.empty_like(xr)
    w_out = _weight2d(ffn.aggr)
    for bi, r0, r1, d in _ffn_bands(ffn, ln or nn.Identity(), xr):
        out[bi, r0:r1].view(-1, out.shape[-1]).copy_(_gemm(d, w_out, ffn.aggr.bias))
    return _nchw(out)


# Window attention runs on groups of windows whose q/k/v stay under this many bytes: few enough calls that
# the attention kernel's per-call cost does not show (measured best at 20-30 windows of 32x32 per call),
# and bounded memory at any frame size.
ATTENTION_CHUNK_BYTES = 24 * 2**20
# The native kernel of esc_stream.native (AVX-512 or AVX2) where it builds (False: always SDPA).
NATIVE_ATTENTION = True


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """[0, n) in `parts` nearly equal consecutive ranges."""
    edges = [round(k * n / parts) for k in range(parts + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]


def window_attention_add_(attn: WindowAttention, ln: nn.Module, x: torch.Tensor) -> None:
    """x += attn(ln(x)) for a channels_last (B, C, H, W) x; windows are gathered from the C-channel input and
    normalised as they are gathered (LayerNorm is per pixel, so it commutes with the reflect padding).

    Windows are taken a block at a time (whole rows of windows, or part of a row on wide frames): gather
    the block's pixels as rows, q/k/v by one GEMM, attention, the output projection, and the add into x.
    """
    b, c, h, w = x.shape
    ws, heads = attn.window_size, attn.num_heads
    n = ws * ws
    padded = _nhwc(reflect_pad(x, (-h) % ws, (-w) % ws))  # (B, Hp, Wp, C); x itself when no padding
    nh, nw = padded.shape[1] // ws, padded.shape[2] // ws
    group = max(1, ATTENTION_CHUNK_BYTES // (n * 3 * c * x.element_size()))
    if group >= nw:
        row_blocks, col_blocks = _split(nh, math.ceil(nh / (group // nw))), [(0, nw)]
    else:
        row_blocks, col_blocks = _split(nh, nh), _split(nw, math.ceil(nw / group))
    bias = attn.attention_bias().to(x.dtype).view(heads, 1, n, n)
    w_qkv, w_out = _weight2d(attn.to_qkv), _weight2d(attn.to_out)
    use_native = NATIVE_ATTENTION and native.supports(x, c, heads, n)
    bias3 = bias.reshape(heads, n, n).contiguous() if use_native else None  # a view when cached
    res = x.permute(0, 2, 3, 1)  # (B, H, W, C) view; windows do not overlap, so adding a block's result
    # into x never changes what a later block reads
    for bi in range(b):
        for i0, i1 in row_blocks:
            for j0, j1 in col_blocks:
                kr, kc = i1 - i0, j1 - j0
                slab = padded[bi, i0 * ws : i1 * ws, j0 * ws : j1 * ws]  # (kr*ws, kc*ws, C)
                rows = _norm_rows(ln, slab.reshape(kr, ws, kc, ws, c).transpose(1, 2).reshape(kr * kc * n, c))
                qkv = _gemm(rows, w_qkv, attn.to_qkv.bias)
                if bias3 is not None:  # native kernel: reads q/k/v from these rows, writes (rows, C)
                    o = native.window_attention(qkv, bias3, heads, n, (c // heads) ** -0.5)
                else:
                    # Head-major (heads, windows, N, d): the kernel walks the windows of one head in turn, so
                    # that head's (N, N) bias stays in cache instead of every head's being re-read per window.
                    q, k, v = qkv.view(kr * kc, n, 3, heads, c // heads).permute(2, 3, 0, 1, 4).unbind(0)
                    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (heads, windows, N, d)
                    o = o.permute(1, 2, 0, 3).reshape(kr * kc * n, c)
                o = _gemm(o, w_out, attn.to_out.bias)
                o = o.view(kr, kc, ws, ws, c).transpose(1, 2).reshape(kr * ws, kc * ws, c)
                r0, c0 = i0 * ws, j0 * ws
                r1, c1 = min(i1 * ws, h), min(j1 * ws, w)
                res[bi, r0:r1, c0:c1].add_(o[: r1 - r0, : c1 - c0])


class FastConvAttn(nn.Module):
    """LayerNorm'd ConvFFN, ConvAttn and its 1x1 mixer as one step: returns x + aggr(cat(lk*h1 + dyn*h1, h2))
    with h = ffn(xn).

    The FFN's last 1x1 and the mixer are linear maps in a row, so they are folded where they meet: only the
    pdim channels h1 (which go through the large kernel) are computed on their own; the mixer's share of the
    other channels h2 is one GEMM from the FFN's hidden rows with the product matrix, added to the residual
    with the mixer's and the folded biases in the same pass. The partial channels are never concatenated.
    """

    w_h1: torch.Tensor
    b_h1: torch.Tensor
    w_fold: torch.Tensor
    b_fold: torch.Tensor
    w_y1: torch.Tensor

    def __init__(self, ln: nn.Module, wrapper: ConvAttnWrapper, ffn: ConvFFN, lk: LargeKernelFFT) -> None:
        super().__init__()
        self.ln, self.plk, self.ffn, self.lk = ln, wrapper.plk, ffn, lk
        p = self.plk.pdim
        mix, mix_b = _weight2d(wrapper.aggr).double(), wrapper.aggr.bias
        out, out_b = _weight2d(ffn.aggr).double(), ffn.aggr.bias
        zeros = torch.zeros(mix.shape[0], dtype=torch.float64, device=mix.device)
        out_b = zeros[: out.shape[0]] if out_b is None else out_b.double()
        mix_b = zeros if mix_b is None else mix_b.double()
        dtype = wrapper.aggr.weight.dtype
        self.register_buffer("w_h1", out[:p].to(dtype).contiguous(), persistent=False)
        self.register_buffer("b_h1", out_b[:p].to(dtype).contiguous(), persistent=False)
        self.register_buffer("w_fold", (mix[:, p:] @ out[p:]).to(dtype).contiguous(), persistent=False)
        self.register_buffer("b_fold", (mix[:, p:] @ out_b[p:] + mix_b).to(dtype), persistent=False)
        self.register_buffer("w_y1", mix[:, :p].to(dtype).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the residual (channels_last), updated in place and returned."""
        x = x.contiguous(memory_format=torch.channels_last)  # so that the NHWC view below is x itself
        b, c, hh, ww = x.shape
        p = self.plk.pdim
        xr = _nhwc(x)  # a view: x is channels_last
        h1 = x.new_empty(b, hh, ww, p)
        pending: tuple[torch.Tensor, torch.Tensor] | None = None
        for bi, r0, r1, d in _ffn_bands(self.ffn, self.ln, xr):
            # The next band reads one halo row of this one, so each band's result is written back into x
            # once the following band's FFN has consumed its input (and the last one after the loop).
            if pending is not None:
                pending[0].copy_(pending[1])
            h1[bi, r0:r1].view(-1, p).copy_(_gemm(d, self.w_h1, self.b_h1))
            target = xr[bi, r0:r1].view(-1, c)
            pending = target, _gemm_add(d, self.w_fold, self.b_fold, target)
        if pending is not None:
            pending[0].copy_(pending[1])
        y1 = self.lk.conv_nhwc(h1, self.plk.dynamic_kernels(_nchw(h1)))  # (B, H, W, p)
        xr.view(-1, c).addmm_(y1.view(-1, p), self.w_y1.t())
        return x


class FastDecomposedConvAttn(nn.Module):
    """ESC-FP's LayerNorm'd ConvFFN and decomposed ConvAttn (1x1 channel mix, then large depthwise + dynamic
    3x3, the large kernel by FFT), returning x + aggr(...)."""

    lk_channel: torch.Tensor

    def __init__(
        self,
        ln: nn.Module,
        wrapper: DecomposedConvolutionalAttentionWrapper,
        ffn: ConvFFN,
        lk: LargeKernelFFT,
        lk_channel: torch.Tensor,
    ) -> None:
        super().__init__()
        self.ln, self.plk, self.ffn = ln, wrapper.plk, ffn
        self.aggr = wrapper.aggr
        self.lk = lk
        self.register_buffer("lk_channel", lk_channel.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = conv_ffn(self.ffn, x, self.ln)
        p = self.plk.pdim
        h1 = h[:, :p]
        b = h.shape[0]
        d = self.plk.dynamic_kernel_size
        dyn = self.plk.proj(h1).reshape(b * p, 1, d, d)
        y1 = self.lk(F.conv2d(h1, self.lk_channel), dyn)
        y = torch.cat([y1.to(memory_format=torch.channels_last), h[:, p:]], dim=1)
        return x.add_(self.aggr(y))


class FastBlock(nn.Module):
    """`Block` with the same parameters and result, computed by the fast path (the large kernels are held
    by the shared `LargeKernelFFT`, so the filters passed to forward are not used)."""

    def __init__(self, block: Block, convattns: list[nn.Module]) -> None:
        super().__init__()
        self.ln_proj, self.proj = block.ln_proj, block.proj
        self.ln_attn, self.attn = block.ln_attn, block.attn
        self.pconvs = nn.ModuleList(convattns)  # each holds its LayerNorm and ConvFFN
        self.ln_out, self.conv_out = block.ln_out, block.conv_out

    def forward(self, x: torch.Tensor, *lk: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        skip = x
        x = conv_ffn(cast(ConvFFN, self.proj), x, self.ln_proj)  # a new tensor: `skip` is never written
        window_attention_add_(cast(WindowAttention, self.attn), self.ln_attn, x)
        for pconv in self.pconvs:
            x = pconv(x)
        x = _nchw(_norm_rows(self.ln_out, _nhwc(x)))  # the residual is freed before conv_out's result is made
        return _conv_add(x, cast(nn.Conv2d, self.conv_out), skip)


class FastShuffle(PixelShuffleSkip):
    """The upsampler's pixel shuffle and nearest-neighbour skip as one pass of the native kernel, on
    channels_last fp32 CPU data (else as `PixelShuffleSkip`). Returns a channels_last tensor."""

    def forward(self, t: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        if NATIVE_MIX and _fused(t) and t.is_contiguous(memory_format=torch.channels_last):
            out = native.shuffle_add(t.permute(0, 2, 3, 1), lr.permute(0, 2, 3, 1), self.scale)
            if out is not None:
                return _nchw(out)
        return super().forward(t, lr)


def _large_kernel(model: nn.Module) -> tuple[LargeKernelFFT, torch.Tensor | None]:
    """The model's shared large kernel as an FFT operator (and ESC-FP's 1x1 channel mix)."""
    plk = getattr(model, "plk_filter", None)
    if isinstance(plk, torch.Tensor):
        ensemble = getattr(model, "lk_filter", None)
        return LargeKernelFFT(ensemble() if callable(ensemble) else plk, "dense"), None
    spatial, channel = getattr(model, "lk_spatial", None), getattr(model, "lk_channel", None)
    if isinstance(spatial, torch.Tensor) and isinstance(channel, torch.Tensor):
        return LargeKernelFFT(spatial, "depthwise"), channel
    raise TypeError(f"{type(model).__name__} has no ESC large kernel")


def _accelerate_body(body: nn.Module) -> None:
    lk, lk_channel = _large_kernel(body)
    blocks = body.blocks
    assert isinstance(blocks, nn.ModuleList)
    for i, block in enumerate(blocks):
        if not isinstance(block, Block):
            continue
        convattns: list[nn.Module] = []
        for ln, pconv, ffn in zip(block.lns, block.pconvs, block.convffns, strict=True):
            if isinstance(pconv, ConvAttnWrapper):
                convattns.append(FastConvAttn(ln, pconv, cast(ConvFFN, ffn), lk))
            else:
                assert lk_channel is not None
                wrapper = cast(DecomposedConvolutionalAttentionWrapper, pconv)
                convattns.append(FastDecomposedConvAttn(ln, wrapper, cast(ConvFFN, ffn), lk, lk_channel))
        blocks[i] = FastBlock(block, convattns)
    body.large_kernel = lk  # type: ignore[assignment]


def can_accelerate(model: nn.Module) -> bool:
    """True when `model` holds an ESC body (a `blocks` list of `Block`s) that `accelerate` can speed up."""
    return any(_is_body(m) for m in model.modules())


def _is_body(m: nn.Module) -> bool:
    blocks = getattr(m, "blocks", None)
    return isinstance(blocks, nn.ModuleList) and any(isinstance(b, Block | FastBlock) for b in blocks)


def large_kernel_of(model: nn.Module) -> LargeKernelFFT | None:
    """The FFT operator of an accelerated model's first ESC body (for operation counts), else None."""
    for m in model.modules():
        lk = getattr(m, "large_kernel", None)
        if isinstance(lk, LargeKernelFFT):
            return lk
    return None


_ALLOCATOR_TUNED = False


_PROCESS: ctypes.CDLL | None = None


def _malloc_function(name: str) -> Any:
    """glibc's malloc control `name` (mallopt, malloc_trim), or None off Linux, without it (musl) or with
    ESC_STREAM_MALLOC_TUNING=0. The process's symbol table is opened once."""
    global _PROCESS
    if os.environ.get("ESC_STREAM_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    try:
        _PROCESS = _PROCESS or ctypes.CDLL(None)
        return getattr(_PROCESS, name)
    except (OSError, AttributeError):
        return None


def tune_allocator() -> bool:
    """Have glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of returning them to the
    system, so the per-layer activations of every frame after the first reuse memory that is already
    mapped (measured: ~15,000 page faults per 320x180 frame without it, none with it). Process-wide and
    idempotent; ESC_STREAM_MALLOC_TUNING=0 turns it off. Returns whether the settings are in effect."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    mallopt = _malloc_function("mallopt")
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    _ALLOCATOR_TUNED = bool(mallopt(m_mmap_threshold, 32 * 2**20)) and bool(mallopt(m_trim_threshold, 2**30))
    return _ALLOCATOR_TUNED


def release_free_heap() -> bool:
    """Give the free pages inside malloc's heaps back to the system (glibc `malloc_trim(0)`); True if it ran.

    Tiled inference calls it between tiles: a frame's tiles come in a few sizes, so the freed activations of one
    (below the 32 MiB that `tune_allocator` keeps in the heap) leave holes that the next fills only in part, and
    with nothing trimmed the heap's resident size grew ~270 MB past the live bytes over a 540p frame at --tile
    256. The pages come back on first use (page faults: a small cost next to a tile's compute). Whole frames
    never call it, so the fast path keeps its mapped memory. ESC_STREAM_MALLOC_TUNING=0 turns it off too."""
    trim = _malloc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


@torch.no_grad()
def accelerate(model: nn.Module) -> nn.Module:
    """Swap the blocks of every ESC body in a prepared (`prepare_for_inference`) model for `FastBlock`s.

    Works in place and returns `model`. The large kernel is read here, so call it once the weights are final.
    """
    if model.training:
        raise ValueError("accelerate() is for inference: call reparam.prepare_for_inference(model) first")
    bodies = [m for m in model.modules() if _is_body(m)]
    if not bodies:
        raise TypeError(f"{type(model).__name__} holds no ESC blocks to accelerate")
    tune_allocator()
    for name, m in list(model.named_modules()):
        if type(m) is PixelShuffleSkip:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, FastShuffle(m.scale))
    for body in bodies:
        if not any(isinstance(b, Block) for b in body.blocks):  # type: ignore[union-attr]
            continue  # already accelerated
        _accelerate_body(body)
    return model
