"""esc-stream: video and image super-resolution with ESC (Lee, Yun, Ro, ICCV 2025)."""

from .checkpoints import CheckpointError, ModelDescriptor, load_model, read_state_dict, save_checkpoint
from .models import VARIANTS, create_model
from .upscaler import Upscaler, load

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "CheckpointError",
    "ModelDescriptor",
    "Upscaler",
    "__version__",
    "create_model",
    "load",
    "load_model",
    "read_state_dict",
    "save_checkpoint",
]
