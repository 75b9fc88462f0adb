"""esc-stream: video and image super-resolution with ESC (Lee, Yun, Ro, ICCV 2025)."""

from .checkpoints import ModelDescriptor, load_model, read_state_dict, save_checkpoint
from .errors import CheckpointError, DeviceError, EscError, ImageError, MediaError, VideoError
from .models import VARIANTS, create_model
from .upscaler import Upscaler, load

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "CheckpointError",
    "DeviceError",
    "EscError",
    "ImageError",
    "MediaError",
    "ModelDescriptor",
    "Upscaler",
    "VideoError",
    "__version__",
    "create_model",
    "load",
    "load_model",
    "read_state_dict",
    "save_checkpoint",
]
