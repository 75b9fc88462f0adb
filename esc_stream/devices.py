"""Which device runs the network: `resolve_device`, used by every front end (library, CLI, VapourSynth, Ray).

Nothing here imports cupy or touches a GPU beyond asking torch what it sees.
"""

from __future__ import annotations

import torch

from .errors import DeviceError

SUPPORTED = ("cpu", "cuda", "mps")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`auto`/None: CUDA when torch sees a GPU, else CPU. A device that cannot be used here: DeviceError."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"device {str(name)!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(name)!r}: CUDA is not available (torch {torch.__version__} sees no GPU)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(name)!r}: only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"device {str(name)!r}: MPS is not available")
    elif device.type not in SUPPORTED:
        raise DeviceError(f"device {str(name)!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device
