"""PSNR and SSIM on the Y channel (ITU-R BT.601, studio range), border cropped, as SR papers report."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> (N, 1, H, W) Y in [16/255, 235/255]."""
    w = torch.tensor([65.481, 128.553, 24.966], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True) / 255.0 + 16.0 / 255.0


def _prep(sr: torch.Tensor, hr: torch.Tensor, border: int) -> tuple[torch.Tensor, torch.Tensor]:
    # quantise to 8 bits as the saved image would be, then take Y in 0..255
    sr = (sr.clamp(0, 1) * 255).round() / 255
    hr = (hr.clamp(0, 1) * 255).round() / 255
    sr_y, hr_y = rgb_to_y(sr.double()) * 255, rgb_to_y(hr.double()) * 255
    if border:
        sr_y = sr_y[..., border:-border, border:-border]
        hr_y = hr_y[..., border:-border, border:-border]
    return sr_y, hr_y


def psnr_y(sr: torch.Tensor, hr: torch.Tensor, border: int = 0) -> float:
    """Mean PSNR (dB) over the batch, Y channel, `border` pixels cropped from each side."""
    sr_y, hr_y = _prep(sr, hr, border)
    mse = ((sr_y - hr_y) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(255.0**2 / mse)).mean())


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(g**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, size, size)


def ssim_y(sr: torch.Tensor, hr: torch.Tensor, border: int = 0) -> float:
    """Mean SSIM over the batch on Y (Gaussian window 11, sigma 1.5, valid region), as in BasicSR."""
    x, y = _prep(sr, hr, border)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    win = _gaussian().to(x.device)
    mu_x, mu_y = F.conv2d(x, win), F.conv2d(y, win)
    sxx = F.conv2d(x * x, win) - mu_x**2
    syy = F.conv2d(y * y, win) - mu_y**2
    sxy = F.conv2d(x * y, win) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return float(ssim.flatten(1).mean(1).mean())
