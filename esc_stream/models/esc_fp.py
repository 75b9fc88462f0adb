"""ESC-FP: the fast-path variant with a decomposed (1x1 channel + 13x13 depthwise) shared kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Block, LayerNorm, depthwise_per_sample


class DecomposedConvolutionalAttention(nn.Module):
    """ConvAttn with the large kernel split into a 1x1 channel mix and a depthwise spatial kernel.

    The 3x3 dynamic kernel is added to the centre of the depthwise kernel, so both run as one conv.
    """

    def __init__(self, pdim: int) -> None:
        super().__init__()
        self.pdim = pdim
        self.dynamic_kernel_size = 3
        self.proj = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(pdim, pdim // 4, 1),
            nn.GELU(),
            nn.Conv2d(pdim // 4, pdim * self.dynamic_kernel_size**2, 1),
        )

    def forward(self, x: torch.Tensor, lk_channel: torch.Tensor, lk_spatial: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[:, : self.pdim], x[:, self.pdim :]
        b = x1.shape[0]
        k = lk_spatial.shape[-1]
        dyn = self.proj(x1).reshape(b * self.pdim, 1, self.dynamic_kernel_size, self.dynamic_kernel_size)
        margin = (k - self.dynamic_kernel_size) // 2
        kernels = F.pad(dyn, (margin, margin, margin, margin)) + lk_spatial.repeat(b, 1, 1, 1)
        x1 = depthwise_per_sample(F.conv2d(x1, lk_channel), kernels, k // 2)
        return torch.cat([x1, x2], dim=1)

    def extra_repr(self) -> str:
        return f"pdim={self.pdim}"


class DecomposedConvolutionalAttentionWrapper(nn.Module):
    """Decomposed ConvAttn followed by a 1x1 channel mixer."""

    def __init__(self, dim: int, pdim: int) -> None:
        super().__init__()
        self.pdim = pdim
        self.plk = DecomposedConvolutionalAttention(pdim)
        self.aggr = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, lk_channel: torch.Tensor, lk_spatial: torch.Tensor) -> torch.Tensor:
        return self.aggr(self.plk(x, lk_channel, lk_spatial))


class ESCFP(nn.Module):
    """ESC-FP: pixel-shuffle output added to a bicubic upscale of the input."""

    def __init__(
        self,
        dim: int = 48,
        pdim: int = 16,
        kernel_size: int = 13,
        n_blocks: int = 5,
        conv_blocks: int = 5,
        window_size: int = 32,
        num_heads: int = 3,
        upscaling_factor: int = 2,
        exp_ratio: float = 1.25,
        proj_ratio: float = 1.5,
    ) -> None:
        super().__init__()
        self.upscaling_factor = upscaling_factor
        self.window_size = window_size
        self.lk_channel = nn.Parameter(torch.randn(pdim, pdim, 1, 1))
        self.lk_spatial = nn.Parameter(torch.empty(pdim, 1, kernel_size, kernel_size))
        nn.init.orthogonal_(self.lk_spatial)
        self.dim = dim
        self.proj = nn.Conv2d(3, dim, 3, 1, 1)
        self.blocks = nn.ModuleList(
            Block(
                dim,
                pdim,
                conv_blocks,
                window_size,
                num_heads,
                exp_ratio,
                proj_ratio,
                use_ln=True,
                pconv_factory=DecomposedConvolutionalAttentionWrapper,
            )
            for _ in range(n_blocks)
        )
        self.ln_last = LayerNorm(dim)
        self.last = nn.Conv2d(dim, dim, 3, 1, 1)
        self.to_img = nn.Conv2d(dim, 3 * upscaling_factor**2, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.proj(x)
        skip = feat
        for block in self.blocks:
            feat = block(feat, self.lk_channel, self.lk_spatial)
        feat = self.last(self.ln_last(feat)) + skip
        s = self.upscaling_factor
        return F.pixel_shuffle(self.to_img(feat), s) + F.interpolate(x, scale_factor=s, mode="bicubic")
