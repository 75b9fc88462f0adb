"""Training data: HR images held in memory, paired LR/HR patches made on the fly (MATLAB bicubic)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from esc_stream.resize import imresize, resize_matrix

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such image folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no images in it")
    return files


def read_rgb(path: Path, prescale: float = 1.0) -> torch.Tensor:
    """(3, H, W) uint8 tensor; `prescale` < 1 downscales it first (antialiased bicubic).

    Large photographs (wallpapers) are soft per pixel and often JPEG-compressed: a x1/2 downscale makes their
    pixels as sharp as a benchmark image's and hides the block artefacts, so the network learns detail, not blur.
    """
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        if prescale != 1.0:
            size = (max(1, round(rgb.width * prescale)), max(1, round(rgb.height * prescale)))
            rgb = rgb.resize(size, Image.Resampling.BICUBIC)
        arr = np.asarray(rgb)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


@lru_cache(maxsize=8)
def _matrices(hr: int, lr: int, scale: int) -> torch.Tensor:
    return resize_matrix(hr, lr, 1.0 / scale).to(torch.float32)


def bicubic_down(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """(N, C, sH, sW) float -> (N, C, H, W) with MATLAB bicubic (antialiased)."""
    h, w = hr.shape[-2] // scale, hr.shape[-1] // scale
    mh = _matrices(hr.shape[-2], h, scale)
    mw = _matrices(hr.shape[-1], w, scale)
    return mh @ hr @ mw.T


def rank_seed(seed: int, rank: int) -> int:
    """The sampler seed of one DDP rank: `seed` itself on rank 0 (single-process runs are unchanged), else mixed."""
    if rank == 0:
        return seed
    # SeedSequence mixes (seed, rank) so neighbouring ranks/seeds do not draw overlapping streams
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


class SeededSampler:
    """Samplers draw every random number from their own generator, so a run resumes exactly from its state."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(0)

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def _augment(self, crop: torch.Tensor) -> torch.Tensor:
        """A (C, H, W) crop under one of the 8 symmetries of the square: flips and a transpose, each drawn here."""
        if self._randint(2):
            crop = crop.flip(2)
        if self._randint(2):
            crop = crop.flip(1)
        if self._randint(2):
            crop = crop.transpose(1, 2)
        return crop


SAMPLINGS = ("image", "area")
TEXTURE_TRIES = 5


def texture(crop: torch.Tensor) -> float:
    """Mean absolute difference of horizontally and vertically neighbouring pixels of a (C, H, W) uint8 crop."""
    f = crop.float()
    return float(((f[:, 1:] - f[:, :-1]).abs().mean() + (f[:, :, 1:] - f[:, :, :-1]).abs().mean()) / 2)


def rescaled(images: list[torch.Tensor], factors: list[float]) -> list[torch.Tensor]:
    """The images, plus a copy of each downscaled by every factor (MATLAB bicubic, 8-bit like the originals).

    The classic scale augmentation of the 291-image set (as VDSR and its successors trained): downscaled copies are
    sharper per pixel and add content at other scales, so a small training set goes further.
    """
    out = list(images)
    for f in factors:
        if not 0 < f < 1:
            raise ValueError(f"rescale factors must lie between 0 and 1, not {f}")
        for im in images:
            size = (max(1, round(im.shape[1] * f)), max(1, round(im.shape[2] * f)))
            small = imresize(im.float().unsqueeze(0), size=size)[0]
            out.append(small.round().clamp(0, 255).to(torch.uint8))
    return out


class PatchSampler(SeededSampler):
    """Random (LR, HR) patch batches from in-memory HR images, with flips and 90-degree rotations.

    All randomness comes from `generator`, whose state is saved with the checkpoint so a resumed run draws
    exactly the batches it would have drawn.
    """

    def __init__(
        self,
        images: list[torch.Tensor],
        scale: int,
        lr_patch: int,
        batch: int,
        sampling: str = "image",
        lr_context: int = 0,
        min_texture: float = 0.0,
    ) -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f'sampling must be "image" or "area", not {sampling!r}')
        if lr_context < 0:
            raise ValueError(f"lr_context must be 0 or more, not {lr_context}")
        self.scale = scale
        self.lr_patch = lr_patch
        self.batch = batch
        self.sampling = sampling
        # LR pixels of real image kept around each patch while it is downscaled, then cut away: with 0 the crop is
        # downscaled alone and its outer LR pixels see the resize's mirrored border instead of the image beyond
        # the crop, unlike any pixel inside a frame (bicubic x1/2 and x1/4 reach 2 LR pixels, so 2 makes every
        # LR pixel of the patch exactly what downscaling the whole image gives)
        self.lr_context = lr_context
        # patches flatter than this (mean absolute difference of neighbouring HR pixels, 0..255 scale) are redrawn,
        # up to TEXTURE_TRIES times: photographs have large smooth areas (sky, blur) that teach a network nothing
        self.min_texture = min_texture
        # the HR crop drawn per patch: the patch and its context
        self.hr_crop = hr_patch = (lr_patch + 2 * lr_context) * scale
        self.images = [im for im in images if im.shape[1] >= hr_patch and im.shape[2] >= hr_patch]
        if not self.images:
            raise ValueError(f"no training image is at least {hr_patch}x{hr_patch}")
        # "area": every crop position of every image is equally likely, so a large image is drawn more often than
        # a small one (with "image" each image is equally likely, and small images' pixels are seen far more often)
        positions = [(im.shape[1] - hr_patch + 1) * (im.shape[2] - hr_patch + 1) for im in self.images]
        self.cumulative = np.cumsum(positions)
        super().__init__()

    def _image(self) -> torch.Tensor:
        if self.sampling == "area":
            k = self._randint(int(self.cumulative[-1]))
            return self.images[int(np.searchsorted(self.cumulative, k, side="right"))]
        return self.images[self._randint(len(self.images))]

    def _crop(self) -> torch.Tensor:
        hp = self.hr_crop
        for _ in range(TEXTURE_TRIES if self.min_texture > 0 else 1):
            im = self._image()
            y = self._randint(im.shape[1] - hp + 1)
            x = self._randint(im.shape[2] - hp + 1)
            crop = im[:, y : y + hp, x : x + hp]
            if self.min_texture <= 0 or texture(crop) >= self.min_texture:
                break
        return crop

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        crops = []
        for _ in range(self.batch):
            crops.append(self._augment(self._crop()))
        hr = torch.stack(crops).float() / 255.0
        lr = bicubic_down(hr, self.scale)
        # LR is quantised to 8 bits, as a real decoded frame would be
        lr = (lr.clamp(0, 1) * 255.0).round() / 255.0
        if self.lr_context:
            c, p, s = self.lr_context, self.lr_patch, self.scale
            lr = lr[..., c : c + p, c : c + p].contiguous()
            hr = hr[..., c * s : (c + p) * s, c * s : (c + p) * s].contiguous()
        return lr, hr


def load_images(folder: str | Path, limit: int | None = None, prescale: float = 1.0) -> list[torch.Tensor]:
    files = list_images(folder)
    if limit:
        files = files[:limit]
    return [read_rgb(p, prescale) for p in files]
