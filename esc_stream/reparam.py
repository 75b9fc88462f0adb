"""Inference-time re-parameterisation: fold what training keeps separate, once, at load.

- the 8-way geometric ensemble of the shared large kernel is baked into `plk_filter`;
- the relative-position bias of every window attention is gathered once into a dense (heads, N, N) tensor;
- LayerNorm's affine (scale, shift) is folded into the 1x1 convolution that follows it, where one does.
"""

from __future__ import annotations

import torch
from torch import nn

from .models.blocks import Block, ConvFFN, LayerNorm, WindowAttention, geometric_ensemble


class _PlainLayerNorm(LayerNorm):
    """LayerNorm without affine (its scale/shift now live in the next conv)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = torch.nn.functional.layer_norm(x, (x.shape[-1],), None, None, self.eps)
        return x.permute(0, 3, 1, 2)


def _fold_ln_into_1x1(ln: LayerNorm, conv: nn.Conv2d) -> None:
    """conv(γ·n + β) == (W·diag(γ))·n + (W·β + b) for a 1x1 conv."""
    w = conv.weight.data  # (out, in, 1, 1)
    gamma, beta = ln.weight.data, ln.bias.data
    bias = conv.bias.data if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    conv.bias = nn.Parameter(bias + (w[:, :, 0, 0] @ beta))
    conv.weight = nn.Parameter(w * gamma.view(1, -1, 1, 1))
    ln.__class__ = _PlainLayerNorm


@torch.no_grad()
def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Put `model` in eval mode and apply the inference-only foldings in place; returns it.

    The result is for inference only: its state dict no longer matches the official layout.
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    plk = getattr(model, "plk_filter", None)
    if isinstance(plk, nn.Parameter) and not getattr(model, "baked", False):
        plk.data = geometric_ensemble(plk.data).contiguous()
        model.baked = True  # type: ignore[assignment]
    for m in model.modules():
        if isinstance(m, WindowAttention):
            m.freeze()
        if isinstance(m, Block):
            if isinstance(m.proj, ConvFFN) and type(m.ln_proj) is LayerNorm:
                _fold_ln_into_1x1(m.ln_proj, m.proj.proj)
            if type(m.ln_attn) is LayerNorm:
                _fold_ln_into_1x1(m.ln_attn, m.attn.to_qkv)  # type: ignore[arg-type]
            for ln, ffn in zip(m.lns, m.convffns, strict=True):
                if type(ln) is LayerNorm:
                    _fold_ln_into_1x1(ln, ffn.proj)  # type: ignore[arg-type]
    return model
