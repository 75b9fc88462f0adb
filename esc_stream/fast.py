"""CPU fast path for the ESC family: the same function as the reference modules, computed with fewer FLOPs/bytes.

`accelerate(model)` swaps every `Block` of a model prepared by `reparam.prepare_for_inference` for a
`FastBlock` that shares its parameters. What changes, and why it stays exact (tests/test_fast.py, ≤ 1e-4):

- **Large kernel by FFT.** The shared 13x13 pdim->pdim kernel (15 uses per frame in ESC-light) is a linear
  convolution with zero padding; it is computed by overlap-save FFT tiles. The filter spectrum is made once
  per frame size (in float64, by DFT matrices) and reused by every layer. Because the baked filter is the
  mean over the 8 symmetries of the square, its spectrum with centred phase is real, so the per-frequency
  channel mixing is a real batched matmul (half the bytes of a complex one).
- **Dynamic 3x3 merged.** The instance-dependent depthwise 3x3 kernel is added in the frequency domain
  (its spectrum is two tiny DFT-matrix products), as ESC-FP merges it into its large kernel.
- **No concatenation.** ConvAttn's 1x1 mixer is split by input channels and accumulated (GEMMs) straight
  into the residual stream, so the partial channels are never copied back into a full tensor.
- **Contiguous windows.** Window attention partitions the 64-channel input once (not the 192-channel qkv),
  runs the qkv/out projections as GEMMs on window-major rows and adds the result into the residual through
  a strided view, so no un-partition copy is made.
- **channels_last end to end**: every 1x1 convolution is a GEMM on the NHWC view; 3x3 convolutions stay
  oneDNN calls on channels_last tensors.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .models.blocks import Block, ConvAttnWrapper, ConvFFN, WindowAttention, reflect_pad
from .models.esc_fp import DecomposedConvolutionalAttentionWrapper

# Largest filter spectrum kept per frame size (bytes); tiles are sized to stay under it.
SPECTRUM_BUDGET = 48 * 2**20
# Spectra kept for the most recent frame sizes (tiles at frame borders have their own sizes).
CACHE_SIZES = 32
CACHE_BYTES = 4 * SPECTRUM_BUDGET


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
        return sum(p.spectrum.numel() * p.spectrum.element_size() for p in self._plans.values())

    def _make_plan(self, h: int, w: int, dtype: torch.dtype, device: torch.device) -> _SizePlan:
        rows, cols = plan_axis(h, self.k - 1, self.max_fft), plan_axis(w, self.k - 1, self.max_fft)
        ey = centred_dft(rows.nfft, self.k, half=False)
        ex = centred_dft(cols.nfft, self.k, half=True)
        kernel = self.weight.to(torch.complex128)
        spec = torch.einsum("fa,...ab,gb->fg...", ey, kernel, ex)  # (Fh, Fw, O, I, ...) full precision
        cdtype = torch.complex64 if dtype != torch.float64 else torch.complex128
        if self.mode == "dense":
            spec = spec.reshape(spec.shape[0] * spec.shape[1], *spec.shape[2:4]).transpose(1, 2)  # (F, I, O)
            spec = spec.real.to(dtype) if self.real else spec.to(cdtype)
        else:
            spec = spec[..., 0].permute(2, 0, 1).to(cdtype)  # (C, Fh, Fw)
        d = self.dyn_size
        return _SizePlan(
            rows,
            cols,
            spec.contiguous().to(device),
            centred_dft(rows.nfft, d, half=False).to(cdtype).to(device),
            centred_dft(cols.nfft, d, half=True).to(cdtype).to(device),
        )

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


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """NHWC view of a channels_last NCHW tensor (a copy only if it is not channels_last)."""
    return x.permute(0, 2, 3, 1).contiguous()


def _nchw(x: torch.Tensor) -> torch.Tensor:
    """NCHW (channels_last) view of an NHWC tensor."""
    return x.permute(0, 3, 1, 2)


def _linear(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 convolution as one GEMM on the NHWC rows."""
    return F.linear(x, conv.weight.view(conv.weight.shape[0], -1), conv.bias)


def conv_ffn(ffn: ConvFFN, x: torch.Tensor) -> torch.Tensor:
    """ConvFFN on a channels_last tensor; returns channels_last."""
    h = F.gelu(_linear(_nhwc(x), ffn.proj))
    d = ffn.dwc(_nchw(h))
    d = F.gelu(d).add_(_nchw(h))
    return _nchw(_linear(_nhwc(d), ffn.aggr))


def window_attention_add_(attn: WindowAttention, xn: torch.Tensor, out: torch.Tensor) -> None:
    """out += attn(xn), both channels_last (B, C, H, W); windows are gathered from the C-channel input."""
    b, c, h, w = xn.shape
    ws, heads = attn.window_size, attn.num_heads
    padded = reflect_pad(xn, (-h) % ws, (-w) % ws)
    hp, wp = padded.shape[-2:]
    nh, nw = hp // ws, wp // ws
    rows = _nhwc(padded).view(b, nh, ws, nw, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, ws * ws, c)
    qkv = _linear(rows, attn.to_qkv).view(b * nh * nw, ws * ws, 3, heads, c // heads)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    bias = attn.attention_bias().to(q.dtype)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b * nh * nw, ws * ws, c)
    o = _linear(o, attn.to_out).view(b, nh, nw, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    res = out.permute(0, 2, 3, 1)
    if (hp, wp) == (h, w):
        res.view(b, nh, ws, nw, ws, c).add_(o)
    else:
        res.add_(o.reshape(b, hp, wp, c)[:, :h, :w])


class FastConvAttn(nn.Module):
    """ConvAttn + its 1x1 mixer, accumulated into the residual: x += aggr(cat(lk*h1 + dyn*h1, h2))."""

    def __init__(self, wrapper: ConvAttnWrapper, lk: LargeKernelFFT) -> None:
        super().__init__()
        self.plk = wrapper.plk
        self.aggr = wrapper.aggr
        self.lk = lk

    def add_(self, h: torch.Tensor, x: torch.Tensor) -> None:
        p = self.plk.pdim
        h1 = h[:, :p]
        y1 = self.lk(h1, self.plk.dynamic_kernels(h1))  # (B, p, H, W) NCHW
        weight = self.aggr.weight.view(self.aggr.weight.shape[0], -1)
        b, c, hh, ww = x.shape
        rows_x = x.permute(0, 2, 3, 1).view(b, hh * ww, c)
        rows_h = _nhwc(h).view(b, hh * ww, -1)
        for i in range(b):
            rows_x[i].addmm_(rows_h[i, :, p:], weight[:, p:].t())
            rows_x[i].addmm_(y1[i].view(p, hh * ww).t(), weight[:, :p].t())
        if self.aggr.bias is not None:
            rows_x.add_(self.aggr.bias)


class FastDecomposedConvAttn(nn.Module):
    """ESC-FP's decomposed ConvAttn (1x1 channel mix, then large depthwise + dynamic 3x3) by FFT."""

    lk_channel: torch.Tensor

    def __init__(
        self, wrapper: DecomposedConvolutionalAttentionWrapper, lk: LargeKernelFFT, lk_channel: torch.Tensor
    ) -> None:
        super().__init__()
        self.plk = wrapper.plk
        self.aggr = wrapper.aggr
        self.lk = lk
        self.register_buffer("lk_channel", lk_channel.detach().clone(), persistent=False)

    def add_(self, h: torch.Tensor, x: torch.Tensor) -> None:
        p = self.plk.pdim
        h1 = h[:, :p]
        b = h.shape[0]
        d = self.plk.dynamic_kernel_size
        dyn = self.plk.proj(h1).reshape(b * p, 1, d, d)
        y1 = self.lk(F.conv2d(h1, self.lk_channel), dyn)
        y = torch.cat([y1.to(memory_format=torch.channels_last), h[:, p:]], dim=1)
        x.add_(self.aggr(y))


class FastBlock(nn.Module):
    """`Block` with the same parameters and result, computed by the fast path (the large kernels are held
    by the shared `LargeKernelFFT`, so the filters passed to forward are not used)."""

    def __init__(self, block: Block, convattns: list[nn.Module]) -> None:
        super().__init__()
        self.ln_proj, self.proj = block.ln_proj, block.proj
        self.ln_attn, self.attn = block.ln_attn, block.attn
        self.lns, self.convffns = block.lns, block.convffns
        self.pconvs = nn.ModuleList(convattns)
        self.ln_out, self.conv_out = block.ln_out, block.conv_out

    def forward(self, x: torch.Tensor, *lk: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        skip = x
        x = conv_ffn(
            cast(ConvFFN, self.proj), self.ln_proj(x)
        )  # a new tensor: the in-place adds below never touch `skip`
        window_attention_add_(cast(WindowAttention, self.attn), self.ln_attn(x), x)
        for ln, pconv, ffn in zip(self.lns, self.pconvs, self.convffns, strict=True):
            cast(FastConvAttn | FastDecomposedConvAttn, pconv).add_(conv_ffn(cast(ConvFFN, ffn), ln(x)), x)
        return self.conv_out(self.ln_out(x)).add_(skip)


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
        for pconv in block.pconvs:
            if isinstance(pconv, ConvAttnWrapper):
                convattns.append(FastConvAttn(pconv, lk))
            else:
                assert lk_channel is not None
                convattns.append(
                    FastDecomposedConvAttn(cast(DecomposedConvolutionalAttentionWrapper, pconv), lk, lk_channel)
                )
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
    for body in bodies:
        if not any(isinstance(b, Block) for b in body.blocks):  # type: ignore[union-attr]
            continue  # already accelerated
        _accelerate_body(body)
    return model
