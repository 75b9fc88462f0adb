"""ESC-LTE: the arbitrary-scale ESC, an ESC body as the encoder of an LTE (local texture estimator) decoder.

The encoder is the ESC network without its pixel-shuffle head. The decoder predicts, for every query point
of the output grid, a Fourier-feature input to a small MLP: amplitudes (`coef`) and frequencies (`freq`)
are read from the nearest feature of each of the four surrounding LR pixels, the frequencies are dotted with
the offset to that pixel and shifted by a phase learnt from the output cell size, and the four MLP outputs
are blended by the opposite rectangles' areas (local ensemble), plus a bilinear upsample of the input.

Module and parameter names follow the official arbitrary-scale code (`esc_arb/`, built on LIIF/LTE), so its
checkpoints load unchanged. Networks work on inputs normalised to [-1, 1] as that code does; `render`
takes and returns [0, 1] images of any requested output size, in bounded memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .esc import ESCBody

# A query is assigned to the nearest LR pixel of `coord ± half a pixel` after this tiny shift (as the
# official code does), so a query exactly on a pixel centre picks a well-defined pair of neighbours.
_EPS_SHIFT = 1e-6
_CLAMP = 1 - 1e-6


# The encoder is the ESC body (same keys under `encoder.`), without the pixel-shuffle upsampler.
ESCEncoder = ESCBody


class MLP(nn.Module):
    """Linear/ReLU stack applied to the last axis (`layers.{0,2,4,...}` as in the official `imnet`)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        last = in_dim
        for h in hidden:
            layers += [nn.Linear(last, h), nn.ReLU()]
            last = h
        layers.append(nn.Linear(last, out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LTEFeatures(NamedTuple):
    """What the decoder reads: the normalised input, and the amplitude and frequency maps side by side,
    channels-last (B, h, w, 2C), so that one gather per neighbour reads both."""

    inp: torch.Tensor
    maps: torch.Tensor


def make_coord(n: int, device: torch.device | None = None) -> torch.Tensor:
    """Centres of `n` equal cells spanning [-1, 1] (the LIIF/LTE convention), float32."""
    r = 1.0 / n
    return -1 + r + 2 * r * torch.arange(n, dtype=torch.float32, device=device)


class ESCLTE(nn.Module):
    """ESC encoder + LTE decoder: an image at any output size from one network.

    `forward(inp, coord, cell)` is the official interface (inputs in [-1, 1]; coord/cell (B, Q, 2) as (y, x)
    in [-1, 1] units) used for training and parity. `render(x, (H, W))` is the inference interface.
    `upscaling_factor` is only the nominal scale used where a caller asks for "the model's scale".
    """

    arbitrary_scale = True

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
        hidden_dim: int = 256,
        mlp_hidden: Sequence[int] = (256, 256, 256),
        upscaling_factor: int = 2,
        scale_max: float = 4.0,
    ) -> None:
        super().__init__()
        self.upscaling_factor = upscaling_factor
        self.window_size = window_size
        self.scale_max = scale_max
        self.encoder = ESCEncoder(
            dim, pdim, kernel_size, n_blocks, conv_blocks, window_size, num_heads, exp_ratio, use_ln, proj_ratio
        )
        self.coef = nn.Conv2d(dim, hidden_dim, 3, padding=1)
        self.freq = nn.Conv2d(dim, hidden_dim, 3, padding=1)
        self.phase = nn.Linear(2, hidden_dim // 2, bias=False)
        self.imnet = MLP(hidden_dim, 3, tuple(mlp_hidden))

    # --- the official interface -------------------------------------------------------------------------
    def encode(self, inp: torch.Tensor) -> LTEFeatures:
        """Run the encoder once; the maps are kept channels-last so that gathering per query is one index."""
        feat = self.encoder(inp)
        maps = torch.cat([self.coef(feat), self.freq(feat)], dim=1).permute(0, 2, 3, 1).contiguous()
        return LTEFeatures(inp, maps)

    def query(self, feats: LTEFeatures, coord: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """RGB (B, Q, 3), in the input's [-1, 1] units, at `coord` (B, Q, 2) for output cells of size `cell`."""
        b, h, w, c2 = feats.maps.shape
        c = c2 // 2
        coord = coord.float()
        size = coord.new_tensor([h, w])
        rel_cell = cell.float() * size
        # the phase depends on the cell only: once per query, not once per neighbour
        phase = self.phase(rel_cell.to(self.phase.weight.dtype))
        preds, areas = [], []
        for vy in (-1, 1):
            for vx in (-1, 1):
                shift = coord.new_tensor([vy / h, vx / w]) + _EPS_SHIFT
                shifted = (coord + shift).clamp(-_CLAMP, _CLAMP)
                # nearest LR pixel of the shifted point (grid_sample 'nearest', align_corners=False)
                idx = ((shifted + 1) * size / 2).floor().long()
                iy = idx[..., 0].clamp(0, h - 1)
                ix = idx[..., 1].clamp(0, w - 1)
                centre = torch.stack([-1 + (2 * iy + 1) / h, -1 + (2 * ix + 1) / w], dim=-1)
                rel = (coord - centre) * size  # offset to that pixel, in half-pixels
                flat = (iy * w + ix).unsqueeze(-1).expand(-1, -1, c2)
                q_coef, q_freq = feats.maps.view(b, h * w, c2).gather(1, flat).split(c, dim=-1)
                # frequencies come in (y, x) pairs: dot each pair with the offset (in float32: the argument of a
                # cosine needs more precision than half types keep)
                arg = (q_freq.float().view(b, -1, c // 2, 2) * rel.unsqueeze(-2)).sum(-1) + phase.float()
                basis = torch.cat([torch.cos(math.pi * arg), torch.sin(math.pi * arg)], dim=-1)
                preds.append(self.imnet(q_coef * basis.to(q_coef.dtype)))
                areas.append((rel[..., 0] * rel[..., 1]).abs() + 1e-9)
        total = torch.stack(areas).sum(0)
        out = torch.zeros_like(preds[0], dtype=torch.float32)
        for pred, area in zip(preds, reversed(areas), strict=True):  # each weighted by the opposite area
            out = out + pred.float() * (area / total).unsqueeze(-1)
        base = F.grid_sample(
            feats.inp.float(), coord.flip(-1).unsqueeze(1), mode="bilinear", padding_mode="border", align_corners=False
        )
        return out + base[:, :, 0].permute(0, 2, 1)

    def forward(self, inp: torch.Tensor, coord: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        return self.query(self.encode(inp), coord, cell)

    # --- inference: an image of any size ----------------------------------------------------------------
    def cell_factor(self, scale: float) -> float:
        """Beyond the trained range the cell is clipped to the largest trained scale (as the official test)."""
        return max(scale / self.scale_max, 1.0)

    def render(
        self,
        x: torch.Tensor,
        size: tuple[int, int],
        tile: int | None = None,
        context: int = 64,
        chunk: int = 1 << 15,
    ) -> torch.Tensor:
        """(N, 3, h, w) in [0, 1] -> (N, 3, H, W) for `size` = (H, W), unclamped.

        `tile` (input pixels) splits the input into window-aligned tiles with `context` pixels around each
        (encoder memory is then bounded by the tile); queries are decoded `chunk` at a time (decoder memory
        bounded whatever the output size). Each output pixel is decoded in the tile holding its LR pixel.
        """
        n, _, h, w = x.shape
        out_h, out_w = size
        inp = (x - 0.5) / 0.5
        cell = torch.tensor([2 / out_h, 2 / out_w], device=x.device) * self.cell_factor(out_h / h)
        out = torch.empty((n, 3, out_h, out_w), dtype=x.dtype, device=x.device)
        for (y0, y1, cy0, cy1), (x0, x1, cx0, cx1) in _tiles(h, w, tile, context, self.window_size):
            rows = _owned(out_h, h, cy0, cy1)
            cols = _owned(out_w, w, cx0, cx1)
            if rows.numel() == 0 or cols.numel() == 0:
                continue
            feats = self.encode(inp[:, :, y0:y1, x0:x1])
            # query coordinates of the whole image, re-expressed in the tile's [-1, 1] frame
            ys = ((rows.double() + 0.5) * (2 * h / out_h) - 2 * y0) / (y1 - y0) - 1
            xs = ((cols.double() + 0.5) * (2 * w / out_w) - 2 * x0) / (x1 - x0) - 1
            tile_cell = (cell * cell.new_tensor([h / (y1 - y0), w / (x1 - x0)])).float()
            step = max(1, chunk // len(cols))
            for r0 in range(0, len(rows), step):
                yy = ys[r0 : r0 + step].float()
                grid = torch.stack(torch.meshgrid(yy, xs.float(), indexing="ij"), dim=-1).view(1, -1, 2)
                grid = grid.to(x.device).expand(n, -1, -1)
                rgb = self.query(feats, grid, tile_cell.view(1, 1, 2).expand(n, grid.shape[1], 2))
                block = (rgb * 0.5 + 0.5).view(n, len(yy), len(cols), 3).permute(0, 3, 1, 2)
                out[:, :, rows[r0] : rows[r0] + len(yy), cols[0] : cols[-1] + 1] = block.to(out.dtype)
        return out


def _owned(out_len: int, in_len: int, c0: int, c1: int) -> torch.Tensor:
    """Output indices along one axis whose centre falls in input pixels [c0, c1) (a contiguous range)."""
    pos = (torch.arange(out_len, dtype=torch.float64) + 0.5) * (in_len / out_len)
    return torch.nonzero((pos >= c0) & (pos < c1)).flatten()


def _tiles(h: int, w: int, tile: int | None, context: int, window: int):
    """Pairs of per-axis plans (start, end, core_start, core_end); one whole-frame tile when `tile` is None."""
    if tile is None or (h <= tile and w <= tile):
        return [((0, h, 0, h), (0, w, 0, w))]
    core = max(window, (tile // window) * window)
    ctx = -(-max(context, 1) // window) * window

    def plan(length: int) -> list[tuple[int, int, int, int]]:
        return [
            (max(0, c0 - ctx), min(length, c0 + core + ctx), c0, min(c0 + core, length))
            for c0 in range(0, length, core)
        ]

    return [(py, px) for py in plan(h) for px in plan(w)]
