"""The window attention of official FlashBias checkpoints: the bias stored as low-rank factors, not a table.

Those checkpoints keep, per block, `attn.flashbias_q` and `attn.flashbias_k` ((heads, N, r) each, N = window²)
in place of `attn.relative_position_bias`; the bias is exactly flashbias_q · flashbias_kᵀ. The network is an
ordinary ESC otherwise, so `use_factored_bias` turns a freshly built one into this layout before loading.
How the GPU runs such a bias fast (FlashBias attention) is esc_stream.cuda's business.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .blocks import WindowAttention


class FactoredBiasWindowAttention(WindowAttention):
    """Window attention whose bias is stored as the official FlashBias factors (`flashbias_q`, `flashbias_k`,
    each (heads, N, r)) instead of the relative-position table: bias = flashbias_q · flashbias_kᵀ, exactly."""

    flashbias_q: nn.Parameter
    flashbias_k: nn.Parameter

    def attention_bias(self) -> torch.Tensor:
        if self._bias_cache is not None:
            return self._bias_cache
        return (self.flashbias_q @ self.flashbias_k.transpose(1, 2)).unsqueeze(0)


def flashbias_layout(sd: dict[str, torch.Tensor], prefix: str = "blocks.0.attn.") -> tuple[int, int, int] | None:
    """(heads, window, rank) when a state dict holds FlashBias factors instead of a bias table, else None."""
    q = sd.get(prefix + "flashbias_q")
    if q is None or q.ndim != 3:
        return None
    window = math.isqrt(q.shape[1])
    if window * window != q.shape[1]:
        raise ValueError(f"{prefix}flashbias_q has {q.shape[1]} positions, not a square window")
    return int(q.shape[0]), window, int(q.shape[2])


def use_factored_bias(model: nn.Module, rank: int) -> nn.Module:
    """Give every WindowAttention of `model` FlashBias factors of `rank` in place of its table (before loading)."""
    for m in model.modules():
        if type(m) is WindowAttention:
            n = m.window_size**2
            del m.relative_position_bias
            m.__class__ = FactoredBiasWindowAttention
            m.flashbias_q = nn.Parameter(torch.zeros(m.num_heads, n, rank))
            m.flashbias_k = nn.Parameter(torch.zeros(m.num_heads, n, rank))
    return model
