"""Preparing a network for a device: the one place that chooses which kernels run it.

The networks in esc_stream.models are pure torch. What runs them faster is chosen here:

Inference (`build_network` for an `Upscaler`, by back-end name):

- `torch` (default): PyTorch. On the CPU the ESC blocks take the fast path of `esc_stream.fast` (FFT large
  kernel, contiguous window attention with the native kernels of `esc_stream.native`, channels_last); on CUDA
  `accelerate_cuda` adds the fused ConvAttn (cupy), FlexAttention/FlashBias window attention and CUDA graphs
  (`esc_stream.cuda`); elsewhere the re-parameterised modules run as they are.
- `torch-eager`: the re-parameterised modules without the fast path (a reference, for tests and benchmarks).
- `onnxruntime`: the network exported to ONNX (`esc_stream.onnx_export`) and run by ONNX Runtime's CPU
  provider, float32 only.

Every back-end takes and returns (N, 3, H, W) tensors whose sides are multiples of the window size (the
tiling pads to that) and computes the same function as the reference to <= 1e-4.

Training (`prepare_for_training`): on a CPU the window attention's forward and backward run in the native
kernels of `esc_stream.native` where they support the shapes; elsewhere PyTorch's attention.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import BackendError
from .models.blocks import WindowAttention

BACKENDS = ("torch", "torch-eager", "onnxruntime")
Network = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["BACKENDS", "BackendError", "Network", "accelerate_cuda", "build_network", "prepare_for_training"]


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


def accelerate_cuda(
    model: nn.Module, network: Network, device: torch.device, dtype: torch.dtype, options: Any = None
) -> tuple[Network, Any]:
    """The `torch` back-end on CUDA: `network` with the fast paths of esc_stream.cuda swapped into `model`,
    plus what was switched on (a `CudaReport`). cupy is imported only where the fused kernels run."""
    from .cuda.accelerate import accelerate

    return accelerate(model, network, device, dtype, options)


class NativeTrainingAttention:
    """The native CPU kernels (`esc_stream.native.window_attention_train`) as a WindowAttention training kernel."""

    def supports(self, x: torch.Tensor, channels: int, heads: int, tokens: int) -> bool:
        from . import native

        return native.supports_training(x, channels, heads, tokens)

    def __call__(self, qkv: torch.Tensor, bias: torch.Tensor, heads: int, tokens: int, scale: float) -> torch.Tensor:
        from . import native

        return native.window_attention_train(qkv, bias, heads, tokens, scale)


def prepare_for_training(model: nn.Module, *, native: bool = True) -> nn.Module:
    """Install the kernels `model` trains with, in place, and return it: the native window attention, used on a
    CPU where it supports the shapes (`native=False`, or ESC_STREAM_NATIVE=0, keeps PyTorch's attention)."""
    kernel = NativeTrainingAttention() if native else None
    for m in model.modules():
        if isinstance(m, WindowAttention):
            m.training_kernel = kernel
    return model
