"""ESC, ESC-light and ESC-XL: the classic-SR networks with a pixel-shuffle upsampler."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Block, geometric_ensemble


class ESCBody(nn.Module):
    """The ESC body: shallow 3x3 conv, ESC blocks sharing one large kernel, last 3x3 conv + skip.

    It returns `dim`-channel features at the input's resolution; `ESC` adds the pixel-shuffle upsampler and
    the arbitrary-scale model uses it as its encoder. The shared large kernel `plk_filter` is stored raw (as in
    official checkpoints) and symmetrised on use until `bake()` is called.
    """

    def __init__(
        self,
        dim: int = 64,
        pdim: int = 16,
        kernel_size: int = 13,
        n_blocks: int = 5,
        conv_blocks: int = 5,
        window_size: int = 32,
        num_heads: int = 4,
        exp_ratio: float = 1.25,
        use_ln: bool = False,
        proj_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        self.out_dim = dim
        self.window_size = window_size
        self.baked = False
        self.plk_filter = nn.Parameter(torch.empty(pdim, pdim, kernel_size, kernel_size))
        nn.init.orthogonal_(self.plk_filter)
        self.proj = nn.Conv2d(3, dim, 3, 1, 1)
        self.blocks = nn.ModuleList(
            Block(dim, pdim, conv_blocks, window_size, num_heads, exp_ratio, proj_ratio, use_ln)
            for _ in range(n_blocks)
        )
        self.last = nn.Conv2d(dim, dim, 3, 1, 1)

    def lk_filter(self) -> torch.Tensor:
        return self.plk_filter if self.baked else geometric_ensemble(self.plk_filter)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.proj(x)
        skip = feat
        lk = self.lk_filter()
        for block in self.blocks:
            feat = block(feat, lk)
        return self.last(feat).add_(skip)  # in place: one frame-sized tensor fewer at the peak

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class PixelShuffleSkip(nn.Module):
    """The upsampler's last step: pixel_shuffle(t + lr repeated per sub-pixel), so that the network learns a
    residual over nearest-neighbour upscaling. No parameters; the CPU fast path swaps in a one-pass version."""

    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, t: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        s = self.scale
        return F.pixel_shuffle(t + torch.repeat_interleave(lr, s * s, dim=1), s)


class ESC(ESCBody):
    """Emulating Self-attention with Convolution (Lee, Yun, Ro, ICCV 2025).

    Input and output are RGB in [0, 1]; output is `upscaling_factor` times larger. The shared large kernel
    `plk_filter` is stored raw (as in official checkpoints) and symmetrised on use until `bake()` is called.
    """

    def __init__(
        self,
        dim: int = 64,
        pdim: int = 16,
        kernel_size: int = 13,
        n_blocks: int = 5,
        conv_blocks: int = 5,
        window_size: int = 32,
        num_heads: int = 4,
        upscaling_factor: int = 2,
        exp_ratio: float = 1.25,
        use_ln: bool = False,
        proj_ratio: float = 2.0,
    ) -> None:
        super().__init__(dim, pdim, kernel_size, n_blocks, conv_blocks, window_size, num_heads, exp_ratio, use_ln,
                         proj_ratio)  # fmt: skip
        self.upscaling_factor = upscaling_factor
        self.to_img = nn.Conv2d(dim, 3 * upscaling_factor**2, 3, 1, 1)
        self.shuffle = PixelShuffleSkip(upscaling_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.to_img(self.features(x)), x)
