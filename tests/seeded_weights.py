"""Deterministic, well-scaled random weights keyed by state-dict name.

The same procedure fills the official implementation (when the golden files were made) and ours (in the
tests), so parity depends only on the key names and shapes, never on module construction order.
"""

from __future__ import annotations

import zlib

import torch


def seeded_tensor(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """One tensor for `name`: conv weights ~ N(0, 1/fan_in), LayerNorm scales ~ 1 + N(0, 0.1²), biases small."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 4:  # convolution kernels, the large-kernel filter included
        fan_in = shape[1] * shape[2] * shape[3]
        out = 0.5 * noise / fan_in**0.5
    elif leaf == "weight" and len(shape) == 1:  # LayerNorm scale
        out = 1.0 + 0.1 * noise
    elif "relative_position_bias" in name:
        out = 0.5 * noise
    else:  # biases
        out = 0.02 * noise
    return out.to(torch.float32)


def seeded_state_dict(reference: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the keys and shapes of `reference`, filled by `seeded_tensor`."""
    return {k: seeded_tensor(k, tuple(v.shape), seed) for k, v in reference.items() if v.is_floating_point()}


def seeded_input(shape: tuple[int, ...], seed: int = 1234) -> torch.Tensor:
    """An image-like input in [0, 1]: smooth gradients plus noise, so features are neither flat nor white."""
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    yy = torch.linspace(0, 1, h).view(1, 1, h, 1)
    xx = torch.linspace(0, 1, w).view(1, 1, 1, w)
    base = 0.5 + 0.3 * torch.sin(6.0 * yy + 4.0 * xx + torch.arange(c).view(1, c, 1, 1))
    noise = torch.rand((n, c, h, w), generator=gen)
    return (0.7 * base + 0.3 * noise).clamp(0, 1).to(torch.float32)
