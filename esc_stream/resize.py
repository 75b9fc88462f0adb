"""Bicubic resizing with MATLAB `imresize` semantics (antialiased when shrinking), as SR benchmarks use.

Implemented as two separable weight matrices, so it runs on any torch device and in batches.
"""

from __future__ import annotations

import math

import torch


def _cubic(x: torch.Tensor) -> torch.Tensor:
    ax = x.abs()
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))
    return near + far


def resize_matrix(in_len: int, out_len: int, scale: float, antialias: bool = True) -> torch.Tensor:
    """(out_len, in_len) matrix M with out = M @ in along one axis, MATLAB-compatible."""
    kernel_width = 4.0
    if scale < 1 and antialias:
        kernel_width /= scale
    x = torch.arange(1, out_len + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - kernel_width / 2)
    taps = math.ceil(kernel_width) + 2
    idx = left.unsqueeze(1) + torch.arange(taps, dtype=torch.float64).unsqueeze(0)
    dist = u.unsqueeze(1) - idx
    if scale < 1 and antialias:
        w = scale * _cubic(dist * scale)
    else:
        w = _cubic(dist)
    w = w / w.sum(1, keepdim=True)
    # symmetric (mirror) boundary, as MATLAB: 1..n, n..1 repeated
    period = 2 * in_len
    j = (idx.long() - 1) % period
    j = torch.where(j >= in_len, period - 1 - j, j)
    m = torch.zeros(out_len, in_len, dtype=torch.float64)
    m.scatter_add_(1, j, w)
    return m


def imresize(x: torch.Tensor, scale: float | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Resize (..., H, W) float by `scale` (or to `size` = (H, W)) with MATLAB bicubic semantics."""
    h, w = x.shape[-2:]
    if size is None:
        if scale is None:
            raise ValueError("give scale or size")
        size = (math.ceil(h * scale), math.ceil(w * scale))
        sh = sw = scale
    else:
        sh, sw = size[0] / h, size[1] / w
    mh = resize_matrix(h, size[0], sh).to(x.device, x.dtype)
    mw = resize_matrix(w, size[1], sw).to(x.device, x.dtype)
    return mh @ x @ mw.T
