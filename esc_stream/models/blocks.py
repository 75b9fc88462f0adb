"""Building blocks shared by the ESC family: LayerNorm, ConvFFN, window attention, ConvAttn.

Module and parameter names follow the official BasicSR implementation so that its checkpoints load
unchanged. Every block handles batches of any size. Pure torch: faster kernels for a device are installed
from outside (esc_stream.backends), never imported here.
"""

from __future__ import annotations

import weakref
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


def reflect_pad(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Reflect-pad bottom/right; repeats the reflection when the pad exceeds the size (tiny inputs)."""
    while pad_h > 0 or pad_w > 0:
        step_h = min(pad_h, x.shape[-2] - 1)
        step_w = min(pad_w, x.shape[-1] - 1)
        if step_h == 0 and step_w == 0:  # a single row/column cannot be reflected: repeat it
            return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        x = F.pad(x, (0, step_w, 0, step_h), mode="reflect")
        pad_h -= step_h
        pad_w -= step_w
    return x


class LayerNorm(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvFFN(nn.Module):
    """1x1 expand -> GELU -> depthwise 3x3 (GELU, residual) -> 1x1 project."""

    def __init__(self, dim: int, kernel_size: int, exp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * exp_ratio)
        self.proj = nn.Conv2d(dim, hidden, 1)
        self.dwc = nn.Conv2d(hidden, hidden, kernel_size, 1, kernel_size // 2, groups=hidden)
        self.aggr = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.proj(x))
        x = F.gelu(self.dwc(x)) + x
        return self.aggr(x)


def relative_position_index(window: int) -> torch.Tensor:
    """(window², window²) index into the (2w-1)² table: offset of key relative to query, row-major."""
    coords = torch.arange(window * window)
    row, col = coords // window, coords % window
    d_row = row[None, :] - row[:, None] + window - 1
    d_col = col[None, :] - col[:, None] + window - 1
    return d_row * (2 * window - 1) + d_col


class TrainingKernel(Protocol):
    """A faster window attention for training: differentiable, on token rows (see `WindowAttention.forward`)."""

    def supports(self, x: torch.Tensor, channels: int, heads: int, tokens: int) -> bool:
        """Whether it handles attention over `x`'s features with these sizes, here."""
        ...

    def __call__(self, qkv: torch.Tensor, bias: torch.Tensor, heads: int, tokens: int, scale: float) -> torch.Tensor:
        """(rows, 3C) q|k|v, (heads, tokens, tokens) bias -> (rows, C) attention output."""
        ...


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping square windows, with a relative position bias."""

    rpe_index: torch.Tensor
    # Set by esc_stream.backends.prepare_for_training: on a CPU, the native kernels of esc_stream.native (forward
    # and backward in fp32, about 4x the speed of scaled_dot_product_attention's math path and without its
    # per-window probability tensors). Used in train mode with gradients on, where it supports the shapes; None
    # (the default) keeps scaled_dot_product_attention.
    training_kernel: TrainingKernel | None = None

    def __init__(self, dim: int, window_size: int, num_heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.to_out = nn.Conv2d(dim, dim, 1)
        self.relative_position_bias = nn.Parameter(torch.randn(num_heads, (2 * window_size - 1) ** 2) * 0.001)
        self.register_buffer("rpe_index", relative_position_index(window_size), persistent=False)
        self._bias_cache: torch.Tensor | None = None

    def attention_bias(self) -> torch.Tensor:
        """(1, heads, N, N) additive bias; cached once the module is frozen for inference."""
        if self._bias_cache is not None:
            return self._bias_cache
        n = self.window_size**2
        bias = self.relative_position_bias[:, self.rpe_index.view(-1)].view(1, self.num_heads, n, n)
        return bias

    def freeze(self) -> None:
        """Precompute the bias for inference (drop with `unfreeze` before training again)."""
        with torch.no_grad():
            self._bias_cache = None
            self._bias_cache = self.attention_bias().contiguous()

    def unfreeze(self) -> None:
        self._bias_cache = None

    def _apply(self, fn, recurse=True):  # keep the cached bias on the module's device/dtype
        super()._apply(fn, recurse)
        if self._bias_cache is not None:  # contiguous: `model.to(memory_format=channels_last)` must not
            self._bias_cache = fn(self._bias_cache).contiguous()  # leave attention a bias to copy per call
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ws = self.window_size
        x = reflect_pad(x, (-h) % ws, (-w) % ws)
        hp, wp = x.shape[-2:]
        nh, nw = hp // ws, wp // ws
        heads, hd = self.num_heads, self.dim // self.num_heads
        n = ws * ws
        grad = torch.is_grad_enabled() and (x.requires_grad or self.to_qkv.weight.requires_grad)
        kernel = self.training_kernel
        if self.training and kernel is not None and grad and kernel.supports(x, self.dim, heads, n):
            # tokens as rows, window by window: (b, C, nh*ws, nw*ws) -> (b*nh*nw*ws*ws, C), token t of window w at
            # row w*n + t. The 1x1 projections are then plain GEMMs on the rows, and only C channels (not 3C) are
            # reordered each way.
            rows = x.view(b, self.dim, nh, ws, nw, ws).permute(0, 2, 4, 3, 5, 1).reshape(-1, self.dim)
            qkv_rows = F.linear(rows, self.to_qkv.weight.view(3 * self.dim, self.dim), self.to_qkv.bias)
            bias3 = self.attention_bias().reshape(heads, n, n).float()
            o = kernel(qkv_rows.float(), bias3, heads, n, hd**-0.5)
            o = F.linear(o, self.to_out.weight.view(self.dim, self.dim), self.to_out.bias)  # pointwise: before the crop
            o = o.view(b, nh, nw, ws, ws, self.dim).permute(0, 5, 1, 3, 2, 4).reshape(b, self.dim, hp, wp)
            return o[:, :, :h, :w]
        qkv = self.to_qkv(x)
        # (b, 3*heads*hd, nh*ws, nw*ws) -> (3, b*nh*nw, heads, ws*ws, hd)
        qkv = qkv.view(b, 3, heads, hd, nh, ws, nw, ws).permute(1, 0, 4, 6, 2, 5, 7, 3)
        qkv = qkv.reshape(3, b * nh * nw, heads, ws * ws, hd)
        q, k, v = qkv.unbind(0)
        bias = self.attention_bias().to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        # (b*nh*nw, heads, ws*ws, hd) -> (b, heads*hd, nh*ws, nw*ws)
        out = out.view(b, nh, nw, heads, ws, ws, hd).permute(0, 3, 6, 1, 4, 2, 5).reshape(b, self.dim, hp, wp)
        return self.to_out(out[:, :, :h, :w])

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"


def fft_size(n: int) -> int:
    """The smallest m >= n with no prime factor above 5 (fast for pocketfft/MKL)."""
    m = n
    while True:
        r = m
        for f in (2, 3, 5):
            while r % f == 0:
                r //= f
        if r == 1:
            return m
        m += 1


_spectrum: tuple[weakref.ref, int, bool, tuple[int, int], torch.Tensor] | None = None


def _kernel_spectrum(weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """rfft2 of the flipped kernel, computed once per kernel tensor: every ConvAttn layer of an ESC body gets the one
    shared large kernel, so a training step transforms it (and back-propagates through the transform) once instead
    of once per layer. Only a kernel made in this forward pass (or one without gradients) is reused: a leaf
    parameter can meet several forward/backward passes, and a spectrum's graph serves only one backward."""
    global _spectrum
    grad = torch.is_grad_enabled()
    reusable = not (weight.requires_grad and weight.grad_fn is None)
    if reusable and _spectrum is not None:
        ref, version, was_grad, was_size, spec = _spectrum
        if ref() is weight and version == weight._version and was_grad == grad and was_size == size:
            return spec
    spec = torch.fft.rfft2(weight.float().flip(-1, -2), s=size)
    if reusable:
        _spectrum = (weakref.ref(weight), weight._version, grad, size, spec)
    return spec


def fft_conv2d_same(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.conv2d(x, weight, padding=k // 2)` (zero padding, odd square kernel) computed through the FFT, in fp32.

    For ConvAttn's 13x13 kernel on training patches this is ~2.5x faster forward + backward on a CPU than the
    direct convolution, with differences at fp32 rounding (~1e-6 relative). Transforms of max(size + k // 2)
    points (rounded up to 2/3/5-smooth) suffice: the circular wrap then only reaches outputs that are cropped.
    """
    h, w = x.shape[-2:]
    p = weight.shape[-1] // 2
    size = (fft_size(h + p), fft_size(w + p))
    spec_x = torch.fft.rfft2(x.float(), s=size)  # (B, C, Fh, Fw)
    spec_k = _kernel_spectrum(weight, size)  # (O, C, Fh, Fw)
    # per frequency, (B, C) @ (C, O): one batched complex matrix product
    spec_y = (spec_x.permute(2, 3, 0, 1) @ spec_k.permute(2, 3, 1, 0)).permute(2, 3, 0, 1)
    return torch.fft.irfft2(spec_y, s=size)[..., p : p + h, p : p + w].to(x.dtype)


def depthwise_per_sample(x: torch.Tensor, kernels: torch.Tensor, padding: int) -> torch.Tensor:
    """Depthwise conv with a different kernel per sample: x (B,C,H,W), kernels (B*C,1,k,k)."""
    b, c, h, w = x.shape
    out = F.conv2d(x.reshape(1, b * c, h, w), kernels, padding=padding, groups=b * c)
    return out.view(b, c, h, w)


class ConvolutionalAttention(nn.Module):
    """ConvAttn: on the first `pdim` channels, a shared large kernel plus an instance-dependent 3x3 kernel."""

    # Training on a CPU (train mode, gradients on): the large-kernel conv through the FFT (`fft_conv2d_same`).
    # None (auto) takes it with one intra-op thread, where an esc_medium step measured 1.28x faster (1796 -> 1404
    # ms on a 2-core AVX2 EPYC); with two threads the direct conv, which oneDNN splits over them, measured faster
    # (1944 vs 2313 ms), so it stays. True forces the FFT, False never uses it.
    fft_training: bool | None = None

    def __init__(self, pdim: int, hidden_div: int = 2) -> None:
        super().__init__()
        self.pdim = pdim
        self.sk_size = 3
        to_kernels = nn.Conv2d(pdim // hidden_div, pdim * self.sk_size**2, 1)
        nn.init.zeros_(to_kernels.weight)  # starts as a plain large-kernel conv, as the official init
        nn.init.zeros_(to_kernels.bias)  # type: ignore[arg-type]
        self.dwc_proj = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(pdim, pdim // hidden_div, 1),
            nn.GELU(),
            to_kernels,
        )

    def dynamic_kernels(self, x1: torch.Tensor) -> torch.Tensor:
        """(B*pdim, 1, 3, 3) kernels predicted from the pooled partial channels."""
        return self.dwc_proj(x1).reshape(-1, 1, self.sk_size, self.sk_size)

    def forward(self, x: torch.Tensor, lk_filter: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[:, : self.pdim], x[:, self.pdim :]
        dyn = depthwise_per_sample(x1, self.dynamic_kernels(x1), self.sk_size // 2)
        use_fft = torch.get_num_threads() == 1 if self.fft_training is None else self.fft_training
        if use_fft and self.training and torch.is_grad_enabled() and x1.device.type == "cpu":
            x1 = fft_conv2d_same(x1, lk_filter) + dyn
        else:
            x1 = F.conv2d(x1, lk_filter, padding=lk_filter.shape[-1] // 2) + dyn
        return torch.cat([x1, x2], dim=1)

    def extra_repr(self) -> str:
        return f"pdim={self.pdim}"


class ConvAttnWrapper(nn.Module):
    """ConvAttn followed by a 1x1 channel mixer."""

    def __init__(self, dim: int, pdim: int) -> None:
        super().__init__()
        self.plk = ConvolutionalAttention(pdim)
        self.aggr = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, lk_filter: torch.Tensor) -> torch.Tensor:
        return self.aggr(self.plk(x, lk_filter))


class Block(nn.Module):
    """One ESC block: ConvFFN, window attention, `conv_blocks` x (ConvFFN + ConvAttn), 3x3 conv, residual."""

    def __init__(
        self,
        dim: int,
        pdim: int,
        conv_blocks: int,
        window_size: int,
        num_heads: int,
        exp_ratio: float,
        proj_ratio: float,
        use_ln: bool,
        pconv_factory=None,
    ) -> None:
        super().__init__()
        self.ln_proj = LayerNorm(dim)
        self.proj = ConvFFN(dim, 3, proj_ratio)
        self.ln_attn = LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.lns = nn.ModuleList([LayerNorm(dim) if use_ln else nn.Identity() for _ in range(conv_blocks)])
        factory = pconv_factory or ConvAttnWrapper
        self.pconvs = nn.ModuleList([factory(dim, pdim) for _ in range(conv_blocks)])
        self.convffns = nn.ModuleList([ConvFFN(dim, 3, exp_ratio) for _ in range(conv_blocks)])
        self.ln_out = LayerNorm(dim)
        self.conv_out = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor, *lk: torch.Tensor) -> torch.Tensor:
        skip = x
        x = self.proj(self.ln_proj(x))
        x = x + self.attn(self.ln_attn(x))
        for ln, pconv, ffn in zip(self.lns, self.pconvs, self.convffns, strict=True):
            x = x + pconv(ffn(ln(x)), *lk)
        return self.conv_out(self.ln_out(x)) + skip


def geometric_ensemble(k: torch.Tensor) -> torch.Tensor:
    """Mean of the kernel over the 8 symmetries of the square (flips and 90-degree rotations)."""
    r = torch.rot90(k, -1, [2, 3])
    views = [k, k.flip(3), k.flip(2), k.flip([2, 3]), r, r.flip(3), r.flip(2), r.flip([2, 3])]
    return torch.stack(views).mean(0)
