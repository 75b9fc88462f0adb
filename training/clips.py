"""Video training data: short clips of N consecutive frames as (LR, HR) pairs.

Clips come from real footage (a folder of frames, or a video file decoded with PyAV) or from synthetic
camera motion (pan, zoom, small rotation) over still images, so any image set becomes a video set.
All randomness comes from one torch.Generator, so a run can be resumed exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import bicubic_down, list_images, read_rgb


def _randu(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def synthetic_motion(
    image: torch.Tensor, frames: int, size: int, gen: torch.Generator, max_pan: float = 3.0,
    max_zoom: float = 0.01, max_rotate_deg: float = 0.5,
) -> torch.Tensor:  # fmt: skip
    """(T, 3, size, size) float frames of a virtual camera moving over `image` (3, H, W) uint8.

    Per frame the camera pans up to `max_pan` pixels, zooms by up to ±`max_zoom` and rotates up to
    ±`max_rotate_deg`, at constant velocity, so consecutive frames overlap as in real footage.
    """
    img = image[None].float() / 255.0
    _, _, h, w = img.shape
    vx, vy = _randu(gen, -max_pan, max_pan), _randu(gen, -max_pan, max_pan)
    dz = _randu(gen, -max_zoom, max_zoom)
    dr = math.radians(_randu(gen, -max_rotate_deg, max_rotate_deg))
    # keep the whole trajectory inside the image: margin for the pan, plus rotation/zoom slack
    travel_x, travel_y = abs(vx) * frames, abs(vy) * frames
    half = size / 2 * (1 + abs(dz) * frames) * 1.45
    cx = _randu(gen, half + travel_x, max(half + travel_x, w - half - travel_x))
    cy = _randu(gen, half + travel_y, max(half + travel_y, h - half - travel_y))
    thetas = []
    for t in range(frames):
        zoom = 1 + dz * t
        angle = dr * t
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        px, py = cx + vx * t, cy + vy * t
        # affine_grid maps output [-1, 1] to input [-1, 1] coordinates
        sx, sy = size / w, size / h
        thetas.append([[cos * sx, -sin * size / w, 2 * px / w - 1], [sin * size / h, cos * sy, 2 * py / h - 1]])
    theta = torch.tensor(thetas, dtype=torch.float32)
    grid = F.affine_grid(theta, [frames, 3, size, size], align_corners=False)
    out = F.grid_sample(img.expand(frames, -1, -1, -1), grid, mode="bicubic", padding_mode="reflection",
                        align_corners=False)  # fmt: skip
    return out.clamp(0, 1)


class FrameSequence:
    """Consecutive real frames (a folder of images in name order, or a video file), held in memory."""

    def __init__(self, source: str | Path, limit: int | None = None) -> None:
        source = Path(source)
        if source.is_dir():
            files = list_images(source)[:limit]
            self.frames = [read_rgb(p) for p in files]
        else:
            import av

            with av.open(str(source)) as c:
                self.frames = []
                for frame in c.decode(video=0):
                    rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).contiguous()
                    self.frames.append(rgb)
                    if limit and len(self.frames) >= limit:
                        break
        if not self.frames:
            raise ValueError(f"{source}: no frames")

    def clip(self, frames: int, size: int, gen: torch.Generator) -> torch.Tensor:
        """(T, 3, size, size) float: the same random crop of T consecutive frames, randomly flipped."""
        if len(self.frames) < frames:
            raise ValueError(f"need {frames} frames, have {len(self.frames)}")
        start = int(torch.randint(len(self.frames) - frames + 1, (1,), generator=gen))
        _, h, w = self.frames[0].shape
        if size > min(h, w):
            raise ValueError(f"clip crops of {size}x{size} do not fit {w}x{h} frames: lower lr_patch")
        y = int(torch.randint(h - size + 1, (1,), generator=gen))
        x = int(torch.randint(w - size + 1, (1,), generator=gen))
        clip = torch.stack([f[:, y : y + size, x : x + size] for f in self.frames[start : start + frames]])
        if int(torch.randint(2, (1,), generator=gen)):
            clip = clip.flip(-1)
        if int(torch.randint(2, (1,), generator=gen)):
            clip = clip.flip(0)  # time reversal is as plausible a motion as forward
        return clip.float() / 255.0


class ClipSampler:
    """Batches of (LR, HR) clips, (B, T, 3, h, w) and (B, T, 3, sh, sw), mixing real and synthetic motion."""

    def __init__(
        self, stills: list[torch.Tensor], sequences: list[FrameSequence], scale: int, frames: int, lr_patch: int,
        batch: int, real_fraction: float = 0.5,
    ) -> None:  # fmt: skip
        hr = lr_patch * scale
        self.stills = [im for im in stills if min(im.shape[1:]) >= 2 * hr]
        self.sequences = sequences
        if not self.stills and not self.sequences:
            raise ValueError("no clip source: give still images at least twice the HR patch, or frame sequences")
        self.scale, self.frames, self.lr_patch, self.batch = scale, frames, lr_patch, batch
        self.real_fraction = real_fraction if self.sequences and self.stills else float(bool(self.sequences))
        self.generator = torch.Generator().manual_seed(0)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        g, hr_size = self.generator, self.lr_patch * self.scale
        clips = []
        for _ in range(self.batch):
            if float(torch.rand((), generator=g)) < self.real_fraction:
                seq = self.sequences[int(torch.randint(len(self.sequences), (1,), generator=g))]
                clips.append(seq.clip(self.frames, hr_size, g))
            else:
                still = self.stills[int(torch.randint(len(self.stills), (1,), generator=g))]
                clips.append(synthetic_motion(still, self.frames, hr_size, g))
        hr = torch.stack(clips)  # (B, T, 3, H, W)
        b, t = hr.shape[:2]
        lr = bicubic_down(hr.flatten(0, 1), self.scale)
        lr = ((lr.clamp(0, 1) * 255).round() / 255).unflatten(0, (b, t))
        return lr, hr
