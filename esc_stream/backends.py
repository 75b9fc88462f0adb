"""Inference back-ends: who runs the network for an `Upscaler`.

- `torch` (default): PyTorch. On the CPU the ESC blocks take the fast path of `esc_stream.fast` (FFT large
  kernel, contiguous window attention, channels_last); elsewhere the re-parameterised modules run as they are.
- `torch-eager`: the re-parameterised modules without the fast path (a reference, for tests and benchmarks).
- `onnxruntime`: the network exported to ONNX (`esc_stream.onnx_export`) and run by ONNX Runtime's CPU
  provider, float32 only.

Every back-end takes and returns (N, 3, H, W) tensors whose sides are multiples of the window size (the
tiling pads to that) and computes the same function as the reference to <= 1e-4.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

BACKENDS = ("torch", "torch-eager", "onnxruntime")
Network = Callable[[torch.Tensor], torch.Tensor]


class BackendError(ValueError):
    """A back-end that cannot run here or with these settings; the message says why."""


def build_network(model: nn.Module, backend: str, device: torch.device, dtype: torch.dtype) -> Network:
    """The callable that runs `model` (already prepared for inference, on `device`/`dtype`) on `backend`."""
    if backend == "torch":
        from .fast import accelerate, can_accelerate

        if device.type == "cpu" and can_accelerate(model):
            accelerate(model)
        return model
    if backend == "torch-eager":
        return model
    if backend == "onnxruntime":
        if device.type != "cpu" or dtype != torch.float32:
            raise BackendError("--backend onnxruntime runs on the CPU in float32 only")
        from .onnx_export import OnnxRuntimeNetwork

        return OnnxRuntimeNetwork(model)
    raise BackendError(f"unknown back-end {backend!r}; known: {', '.join(BACKENDS)}")
