"""Temporal consistency: a loss that makes upscaled video flicker less, and the flicker metric.

Flicker is measured as the mean absolute difference between the output's frame-to-frame change and the
ground truth's: mean |(SR[t] - SR[t-1]) - (HR[t] - HR[t-1])|. A per-frame model that invents texture
differently on each frame scores badly even when every frame alone looks sharp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def temporal_difference_loss(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """L1 between consecutive-frame differences of output and ground truth; (B, T, C, H, W) inputs."""
    return F.l1_loss(sr[:, 1:] - sr[:, :-1], hr[:, 1:] - hr[:, :-1])


@torch.no_grad()
def flicker(sr: torch.Tensor, hr: torch.Tensor) -> float:
    """Mean |Δt output − Δt ground truth| in 8-bit levels over a (B, T, C, H, W) clip."""
    return float(temporal_difference_loss(sr.clamp(0, 1).double(), hr.double()) * 255)


def clip_forward(model: nn.Module, lr: torch.Tensor) -> torch.Tensor:
    """Run a per-frame model over (B, T, C, h, w) clips as one batch of B*T frames."""
    b, t = lr.shape[:2]
    return model(lr.flatten(0, 1)).unflatten(0, (b, t))


def clip_loss(
    model: nn.Module, lr: torch.Tensor, hr: torch.Tensor, temporal_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-frame L1 plus `temporal_weight` × temporal-difference L1; returns the loss and its parts."""
    sr = clip_forward(model, lr)
    frame = F.l1_loss(sr, hr)
    temporal = temporal_difference_loss(sr, hr)
    loss = frame + temporal_weight * temporal
    return loss, {"frame_l1": frame.item(), "temporal_l1": temporal.item()}
