"""Run a network over a frame in window-aligned tiles with context, then crop back.

The frame is reflect-padded once to a multiple of the window size (as the official test does). Tiles are
cut from that padded frame at origins that are multiples of the window size, so every tile sees the same
attention windows as the whole frame would; each tile carries `context` extra pixels per side (rounded up
to whole windows) and only its core is kept. With enough context the result matches whole-frame inference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .fast import release_free_heap
from .models.blocks import reflect_pad

Network = Callable[[torch.Tensor], torch.Tensor]


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def plan_tiles(length: int, core: int, context: int, align: int | None = None) -> list[tuple[int, int, int, int]]:
    """Along one axis of (padded) `length`: (tile_start, tile_end, core_start, core_end) per tile.

    As few cores of at most `core` as cover `length`, as equal as whole units of `align` allow (default `core`:
    full cores and one remainder); units left over go to the cores in pairs from both ends (and one in the middle),
    so the first and last tiles (context on one side) and the inner ones (both sides) come in few sizes: every
    tile size is a size of every activation and of a large-kernel FFT spectrum, each kept for reuse.
    """
    unit = max(1, align or core)
    units, per_core = -(-length // unit), max(1, core // unit)
    n = -(-units // per_core)
    base, extra = divmod(units, n)
    sizes = [base] * n
    for i in range(extra // 2):
        sizes[i] += 1
        sizes[n - 1 - i] += 1
    if extra % 2:
        sizes[n // 2] += 1
    out, c0 = [], 0
    for size in sizes:
        c1 = min(c0 + size * unit, length)
        out.append((max(0, c0 - context), min(length, c1 + context), c0, c1))
        c0 = c1
    return out


def upscale_tensor(
    net: Network,
    x: torch.Tensor,
    scale: int,
    window: int,
    tile: int | None = None,
    context: int = 16,
) -> torch.Tensor:
    """Upscale an (N, 3, H, W) tensor; `tile` is the core tile side in input pixels (None: whole frame)."""
    n, c, h, w = x.shape
    padded = reflect_pad(x, (-h) % window, (-w) % window)
    ph, pw = padded.shape[-2:]
    if tile is None or (ph <= _round_up(tile, window) and pw <= _round_up(tile, window)):
        return net(padded)[:, :, : h * scale, : w * scale]
    core = max(window, (tile // window) * window)
    ctx = _round_up(max(context, 0), window)
    out = x.new_empty((n, c, ph * scale, pw * scale))
    for y0, y1, cy0, cy1 in plan_tiles(ph, core, ctx, window):
        for x0, x1, cx0, cx1 in plan_tiles(pw, core, ctx, window):
            res = net(padded[:, :, y0:y1, x0:x1])
            oy, ox = (cy0 - y0) * scale, (cx0 - x0) * scale
            out[:, :, cy0 * scale : cy1 * scale, cx0 * scale : cx1 * scale] = res[
                :, :, oy : oy + (cy1 - cy0) * scale, ox : ox + (cx1 - cx0) * scale
            ]
            del res
            if x.device.type == "cpu":  # the tile's freed activations: back to the system, not left as holes
                release_free_heap()
    return out[:, :, : h * scale, : w * scale]
