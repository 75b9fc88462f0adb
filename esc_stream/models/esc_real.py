"""ESC-Real: the x4 real-world variant with a Real-ESRGAN-style nearest+conv upsampler."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import Block, geometric_ensemble


class ESCReal(nn.Module):
    """ESC-Real (x4): deeper body, a learned skip from the input, two nearest-neighbour x2 stages."""

    def __init__(
        self,
        dim: int = 64,
        pdim: int = 16,
        kernel_size: int = 13,
        n_blocks: int = 10,
        conv_blocks: int = 5,
        window_size: int = 32,
        num_heads: int = 4,
        upscaling_factor: int = 4,
        exp_ratio: float = 2.0,
        proj_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        if upscaling_factor != 4:
            raise ValueError("ESC-Real is defined for x4 only")
        self.upscaling_factor = upscaling_factor
        self.window_size = window_size
        self.baked = False
        self.plk_filter = nn.Parameter(torch.empty(pdim, pdim, kernel_size, kernel_size))
        nn.init.orthogonal_(self.plk_filter)
        self.proj = nn.Conv2d(3, dim, 3, 1, 1)
        self.blocks = nn.ModuleList(
            Block(dim, pdim, conv_blocks, window_size, num_heads, exp_ratio, proj_ratio, use_ln=True)
            for _ in range(n_blocks)
        )
        self.last = nn.Conv2d(dim, dim, 3, 1, 1)
        self.to_img = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(dim, dim, 3, 1, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(dim, dim, 3, 1, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim, dim, 3, 1, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim, 3, 3, 1, 1),
        )
        self.skip = nn.Sequential(
            nn.Conv2d(3, dim * 2, 1),
            nn.Conv2d(dim * 2, dim * 2, 7, 1, 3, groups=dim * 2, padding_mode="reflect"),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim * 2, dim, 1),
        )

    def lk_filter(self) -> torch.Tensor:
        return self.plk_filter if self.baked else geometric_ensemble(self.plk_filter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.proj(x)
        skip = feat
        lk = self.lk_filter()
        for block in self.blocks:
            feat = block(feat, lk)
        feat = self.last(feat) + skip + self.skip(x)
        return self.to_img(feat)
