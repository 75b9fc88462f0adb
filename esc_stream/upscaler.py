"""`Upscaler`: one model on one device, called on frames; `load()` builds one from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import native
from .backends import build_network
from .checkpoints import ModelDescriptor, load_model
from .devices import resolve_device
from .errors import CheckpointError, UserError
from .reparam import prepare_for_inference
from .tiling import upscale_tensor

# The embedded model family: a tier names a speed/quality point, shipped at each scale as one weights file.
TIERS = ("fast", "balanced")
DEFAULT_TIER = "balanced"
SCALES = (2, 3, 4)


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded model: `tier` ("fast" or "balanced") at `scale`, shipped as weights/esc_stream_{tier}_x{scale}."""

    scale: int
    tier: str = DEFAULT_TIER

    @property
    def name(self) -> str:
        return f"{self.tier} x{self.scale}"

    @property
    def path(self) -> Path:
        return Path(
            str(resources.files("esc_stream") / "weights" / f"esc_stream_{self.tier}_x{self.scale}.safetensors")
        )

    def exists(self) -> bool:
        return self.path.is_file()

    def metadata(self) -> dict[str, str]:
        """What the release step recorded in the file: iteration, Kodak24 PSNR, speed at release, ..."""
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as f:
            return dict(f.metadata() or {})


def check_tier(model: str | None) -> str:
    """The tier a `model=` argument names (None: the default); ValueError listing the valid ones otherwise."""
    if model is None:
        return DEFAULT_TIER
    if not isinstance(model, str) or model not in TIERS:
        raise UserError(f"unknown model {model!r}; choose one of: {', '.join(TIERS)}")
    return model


def embedded_models(tier: str | None = None) -> list[EmbeddedModel]:
    """The embedded models that ship, by tier then scale (only `tier`'s when given)."""
    tiers = TIERS if tier is None else (check_tier(tier),)
    return [m for t in tiers for s in SCALES if (m := EmbeddedModel(s, t)).exists()]


def check_scale(scale: object) -> int:
    """A model scale: an int 2, 3 or 4 (ValueError naming the value otherwise)."""
    if isinstance(scale, bool) or not isinstance(scale, int | np.integer) or int(scale) not in SCALES:
        raise UserError(f"scale must be 2, 3 or 4, got {scale!r}")
    return int(scale)


class Upscaler:
    """Upscale frames with an ESC network.

    Call it on a numpy HxWx3 (or NxHxWx3) array of uint8, uint16 or float32 in [0, 1], or on a torch
    Nx3xHxW float tensor; the same kind comes back, `scale` times larger.
    """

    def __init__(
        self,
        model: nn.Module,
        descriptor: ModelDescriptor,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        tile: int | None = None,
        overlap: int = 64,
        pretrained: bool = True,
        source: str = "",
        backend: str = "torch",
        tier: str | None = None,
    ) -> None:
        self.descriptor = descriptor
        self.tier = tier  # the embedded tier it came from; None for a checkpoint file
        self.device = resolve_device(device)  # "auto": CUDA when present; "cuda" without one: a one-line error
        self.dtype = dtype
        self.tile = tile
        self.overlap = overlap
        self.pretrained = pretrained
        self.source = source
        self.model = prepare_for_inference(model).to(self.device, dtype)
        # channels_last measures ~10% faster for these convolutions on CPU (benchmarks/cpu_speed.py)
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # torch on CPU: the fast path of esc_stream.fast (benchmarks/cpu_speed.py); see esc_stream.backends
        self.backend = backend
        self.network = build_network(self.model, backend, self.device, dtype)
        self.cuda_report = None  # on CUDA: fused ConvAttn, FlexAttention/FlashBias, CUDA graphs (esc_stream.cuda)
        if self.device.type == "cuda" and backend == "torch":
            from .backends import accelerate_cuda as accelerate

            self.network, self.cuda_report = accelerate(self.model, self.network, self.device, dtype)

    @property
    def scale(self) -> int:
        return self.descriptor.scale

    @property
    def variant(self) -> str:
        return self.descriptor.variant

    @property
    def arbitrary(self) -> bool:
        """True for an arbitrary-scale model (ESC + LTE), which renders any output size directly."""
        return bool(getattr(self.model, "arbitrary_scale", False))

    @property
    def window_size(self) -> int:
        return int(self.descriptor.config["window_size"])

    def __repr__(self) -> str:
        kind = "pretrained" if self.pretrained else "RANDOM WEIGHTS"
        return f"Upscaler({self.variant} x{self.scale}, {kind}, device={self.device}, tile={self.tile})"

    @torch.inference_mode()
    def upscale_tensor(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(N, 3, H, W) float in [0, 1] on any device -> (N, 3, sH, sW) on this upscaler's device, unclamped.

        With `size` = (height, width) the output has exactly that size: an arbitrary-scale model decodes that
        grid directly (in chunks); any other runs at its scale and is resampled (MATLAB bicubic, antialiased).
        """
        x = x.to(self.device, self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.arbitrary:
            out_size = size or (x.shape[-2] * self.scale, x.shape[-1] * self.scale)
            return self.model.render(x, out_size, self.tile, self.overlap)  # type: ignore[operator]
        y = upscale_tensor(self.network, x, self.scale, self.window_size, self.tile, self.overlap)
        if size is not None and tuple(y.shape[-2:]) != tuple(size):
            from .resize import imresize

            y = imresize(y, size=size)
        return y

    def upscale_to(self, frames: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray | torch.Tensor:
        """Like calling the upscaler, but to an exact output `size` = (width, height), e.g. x1.5 or 1920x1080."""
        w, h = size
        if w < 1 or h < 1:
            raise ValueError(f"output size must be positive, got {w}x{h}")
        if isinstance(frames, torch.Tensor):
            return self._call_tensor(frames, (h, w))
        if isinstance(frames, np.ndarray):
            return self._call_numpy(frames, (h, w))
        raise TypeError(f"expected a numpy array or torch tensor, got {type(frames).__name__}")

    def __call__(self, frames: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        if isinstance(frames, torch.Tensor):
            return self._call_tensor(frames)
        if isinstance(frames, np.ndarray):
            return self._call_numpy(frames)
        raise TypeError(f"expected a numpy array or torch tensor, got {type(frames).__name__}")

    def _call_tensor(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if x.ndim == 3:
            return self._call_tensor(x.unsqueeze(0), size)[0]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an Nx3xHxW tensor, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected a float tensor in [0, 1], got {x.dtype}")
        check_pixels(x, "NCHW")
        out = self.upscale_tensor(x, size).clamp(0, 1)
        return out.to(x.device, x.dtype)

    def _call_numpy(self, frames: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        single = frames.ndim == 3
        batch = frames[None] if single else frames
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected an HxWx3 or NxHxWx3 array, got shape {frames.shape}")
        if batch.dtype == np.uint8:
            peak = 255.0
        elif batch.dtype == np.uint16:
            peak = 65535.0
        elif batch.dtype in (np.float32, np.float64, np.float16):
            peak = 1.0
        else:
            raise ValueError(f"unsupported pixel type {batch.dtype}; use uint8, uint16 or float32")
        x = torch.from_numpy(np.require(batch, requirements=["C", "W"]))
        check_pixels(x, "NHWC")
        x = x.permute(0, 3, 1, 2).to(torch.float32)
        if peak != 1.0:
            x = x / peak
        out = self.upscale_tensor(x, size)
        q = None
        if peak != 1.0 and out.device.type == "cpu" and out.dtype == torch.float32:
            # clamp, scale, round and narrow in one pass (the output is the largest array of the call)
            q = native.quantize(out.permute(0, 2, 3, 1), torch.uint8 if peak == 255.0 else torch.uint16)
        if q is not None:
            y = q.numpy()
        else:
            y = out.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
            y = np.rint(y * peak).astype(batch.dtype) if peak != 1.0 else y.astype(batch.dtype)
        return y[0] if single else y


# Float frames are 0..1; a little over- and undershoot (e.g. from a YUV conversion) is normal and clamped away, but
# values far outside are another convention (0..255 floats) and would come back almost all white or black.
FLOAT_RANGE = (-0.5, 1.5)


def check_pixels(x: torch.Tensor, layout: str) -> None:
    """Refuse empty frames, non-finite pixels (naming how many and where the first is) and float frames outside
    0..1, each with a ValueError of one line; `layout` ("NCHW" or "NHWC") says how positions are named."""
    if x.numel() == 0:
        raise ValueError(f"empty frame: shape {tuple(x.shape)}")
    if not x.is_floating_point():
        return
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = (~finite).any(1 if layout == "NCHW" else -1).nonzero()  # (frame, row, column), raster order
        n, y, col = (int(v) for v in bad[0])
        raise ValueError(f"{len(bad)} pixel(s) with NaN or infinite values; the first at frame {n}, row {y}, "
                         f"column {col}")  # fmt: skip
    lo, hi = float(x.min()), float(x.max())
    if lo < FLOAT_RANGE[0] or hi > FLOAT_RANGE[1]:
        hint = " (0..255 values? divide by 255)" if hi > 2 else ""
        raise ValueError(f"float frames hold values in 0..1; this one spans {lo:g}..{hi:g}{hint}")


def _random_model(scale: int) -> tuple[nn.Module, ModelDescriptor]:
    from .models import VARIANTS

    spec = VARIANTS["esc_small"]
    desc = ModelDescriptor(spec.arch, {"proj_ratio": 2.0, **spec.config}, scale, "esc_small")
    torch.manual_seed(0)
    return desc.build(), desc


def load(
    weights: str | Path | None = None,
    *,
    scale: int = 2,
    model: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    tile: int | None = None,
    overlap: int = 64,
    allow_random: bool = False,
    backend: str = "torch",
) -> Upscaler:
    """Build an Upscaler from a checkpoint, or from the embedded `model` tier ("fast" or "balanced") at `scale`.

    `weights` wins over `model`. A tier with no model at `scale` raises CheckpointError naming the scales it has;
    `allow_random=True` (tests only) gives esc_small with random weights instead (`Upscaler.pretrained` False).
    `backend` is one of `esc_stream.backends.BACKENDS` (default torch).
    """
    if weights is not None and not isinstance(weights, str | Path):
        hint = f"; for an embedded model write load(scale={weights})" if isinstance(weights, int) else ""
        raise UserError(f"weights must be a checkpoint path, got {weights!r}{hint}")
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 1):
        raise UserError(f"tile must be a positive number of pixels, got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise UserError(f"overlap must be a whole number >= 0, got {overlap!r}")
    pretrained = True
    tier = check_tier(model)
    if weights is None:
        scale = check_scale(scale)
        embedded = EmbeddedModel(scale, tier)
        if embedded.exists():
            network, desc = load_model(embedded.path)
            source = f"embedded {embedded.name} model ({desc.variant}, {embedded.path.name})"
        elif allow_random:
            network, desc = _random_model(scale)
            pretrained = False
            source = "esc_small with RANDOM weights (a test stand-in: no embedded model for this scale)"
        else:
            have = ", ".join(f"x{m.scale}" for m in embedded_models(tier)) or "none"
            raise CheckpointError(f"no embedded {tier} model for x{scale} (embedded {tier}: {have}); "
                                  "pass a checkpoint with weights=")  # fmt: skip
    else:
        network, desc = load_model(weights)
        source = str(weights)
        if getattr(network, "arbitrary_scale", False):  # any scale: `scale` is the one plain calls use
            desc = replace(desc, scale=check_scale(scale))
    return Upscaler(
        network,
        desc,
        device=device,
        dtype=dtype,
        tile=tile,
        overlap=overlap,
        pretrained=pretrained,
        source=source,
        backend=backend,
        tier=tier if weights is None else None,
    )
