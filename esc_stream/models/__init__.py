"""The ESC networks and one registry of their published configurations (timm-style constructor names)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .esc import ESC
from .esc_fp import ESCFP
from .esc_real import ESCReal
from .lte import ESCLTE

ARCHS: dict[str, type[nn.Module]] = {"ESC": ESC, "ESCFP": ESCFP, "ESCReal": ESCReal, "ESCLTE": ESCLTE}


@dataclass(frozen=True)
class VariantSpec:
    """A published configuration: which class, its hyper-parameters, and the scales released."""

    name: str
    arch: str
    config: dict[str, Any] = field(default_factory=dict)
    scales: tuple[int, ...] = (2, 3, 4)


_ESC = dict(dim=64, pdim=16, kernel_size=13, n_blocks=5, conv_blocks=5, window_size=32, num_heads=4, exp_ratio=1.25)

VARIANTS: dict[str, VariantSpec] = {
    "esc": VariantSpec("esc", "ESC", _ESC),
    "esc_light": VariantSpec("esc_light", "ESC", {**_ESC, "n_blocks": 3}),
    "esc_xl": VariantSpec(
        "esc_xl",
        "ESC",
        {**_ESC, "dim": 192, "pdim": 48, "n_blocks": 8, "window_size": 48, "num_heads": 12, "use_ln": True},
    ),
    "esc_fp": VariantSpec("esc_fp", "ESCFP", {**_ESC, "dim": 48, "num_heads": 3, "proj_ratio": 1.5}),
    "esc_real": VariantSpec("esc_real", "ESCReal", {**_ESC, "n_blocks": 10, "exp_ratio": 2.0}, scales=(4,)),
    # arbitrary-scale ESC (official esc_arb/): ESC encoder + LTE decoder; "scales" are only nominal (any size works)
    "esc_lte": VariantSpec("esc_lte", "ESCLTE", {**_ESC, "hidden_dim": 256, "mlp_hidden": (256, 256, 256)}),
    # esc-stream's own CPU-friendly configuration (not in the paper): the embedded default models use it.
    "esc_small": VariantSpec(
        "esc_small",
        "ESC",
        {**_ESC, "dim": 48, "pdim": 12, "n_blocks": 2, "conv_blocks": 4, "window_size": 16, "num_heads": 3},
    ),
    # esc_small with a third block (about 1.45x its FLOPs): grown from a trained esc_small by `init_from`, whose
    # missing blocks start as identity (training/train.py), so the deeper network begins where the smaller left off.
    "esc_medium": VariantSpec(
        "esc_medium",
        "ESC",
        {**_ESC, "dim": 48, "pdim": 12, "n_blocks": 3, "conv_blocks": 4, "window_size": 16, "num_heads": 3},
    ),
    # esc_medium with a fourth block (about 1.3x its FLOPs), grown from a trained esc_medium the same way
    "esc_large": VariantSpec(
        "esc_large",
        "ESC",
        {**_ESC, "dim": 48, "pdim": 12, "n_blocks": 4, "conv_blocks": 4, "window_size": 16, "num_heads": 3},
    ),
    # the `fast` tier (esc-stream's own): one block of 16 channels, 8x8 windows with one head, two ConvAttn layers
    # sharing a 13x13 kernel on 8 channels. Sized to run at FSRCNN's speed through esc_stream.load on 2 CPU cores.
    "esc_fast": VariantSpec(
        "esc_fast",
        "ESC",
        {**_ESC, "dim": 16, "pdim": 8, "n_blocks": 1, "conv_blocks": 2, "window_size": 8, "num_heads": 1},
    ),
    # esc_small's body as the encoder of a narrower LTE decoder: for CPU training of the arbitrary-scale model
    "esc_lte_small": VariantSpec(
        "esc_lte_small",
        "ESCLTE",
        {
            **_ESC,
            "dim": 48,
            "pdim": 12,
            "n_blocks": 2,
            "conv_blocks": 4,
            "window_size": 16,
            "num_heads": 3,
            "hidden_dim": 64,
            "mlp_hidden": (64, 64),
        },
    ),
}


def create_model(variant: str, scale: int, **overrides: Any) -> nn.Module:
    """Build a published variant (`esc`, `esc_light`, `esc_xl`, `esc_fp`, `esc_real`) at a scale."""
    try:
        spec = VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown ESC variant {variant!r}; known: {', '.join(VARIANTS)}") from None
    if scale not in spec.scales:
        raise ValueError(f"{variant} is published for scales {spec.scales}, not x{scale}")
    return ARCHS[spec.arch](**{**spec.config, "upscaling_factor": scale, **overrides})


def _constructor(variant: str, scale: int) -> Callable[..., nn.Module]:
    def build(**overrides: Any) -> nn.Module:
        return create_model(variant, scale, **overrides)

    build.__name__ = f"{variant}_x{scale}"
    build.__doc__ = f"{variant} at x{scale}, as published."
    return build


esc_x2, esc_x3, esc_x4 = (_constructor("esc", s) for s in (2, 3, 4))
esc_light_x2, esc_light_x3, esc_light_x4 = (_constructor("esc_light", s) for s in (2, 3, 4))
esc_xl_x2, esc_xl_x3, esc_xl_x4 = (_constructor("esc_xl", s) for s in (2, 3, 4))
esc_fp_x2, esc_fp_x3, esc_fp_x4 = (_constructor("esc_fp", s) for s in (2, 3, 4))
esc_real_x4 = _constructor("esc_real", 4)
esc_lte = _constructor("esc_lte", 2)

__all__ = [
    "ARCHS",
    "ESC",
    "ESCFP",
    "ESCLTE",
    "ESCReal",
    "VARIANTS",
    "VariantSpec",
    "create_model",
    "esc_fp_x2",
    "esc_fp_x3",
    "esc_fp_x4",
    "esc_light_x2",
    "esc_light_x3",
    "esc_light_x4",
    "esc_lte",
    "esc_real_x4",
    "esc_x2",
    "esc_x3",
    "esc_x4",
    "esc_xl_x2",
    "esc_xl_x3",
    "esc_xl_x4",
]
