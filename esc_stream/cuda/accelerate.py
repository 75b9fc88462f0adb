"""What `device="cuda"` turns on: the fused ConvAttn and window-attention fast paths, CUDA graphs, the frame
pipeline.

`Upscaler` calls `accelerate` (through esc_stream.backends) when its device is CUDA; the VapourSynth filter and
`CudaFrames` run frames through `scheduler.StreamPipeline`. Nothing here imports cupy unless the fused kernels
are switched on, on a CUDA device.
"""

from __future__ import annotations

import importlib.util
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import DeviceError
from .attention import DEFAULT_TOLERANCE, swap_window_attention
from .scheduler import StreamPipeline, TorchCudaDevice


def cupy_available() -> bool:
    """True when cupy (the fused kernels' runtime, `esc-stream[cuda]`) is installed."""
    return importlib.util.find_spec("cupy") is not None


@dataclass
class CudaOptions:
    """How the CUDA path runs. `fused`: "auto" uses the cupy kernels when cupy is installed; "on" requires it."""

    fused: str = "auto"
    attention: str = "auto"  # auto | exact | flex | flashbias
    flashbias_rank: int | None = None  # None: smallest rank within `flashbias_tolerance`
    flashbias_tolerance: float = DEFAULT_TOLERANCE
    compile: bool = False  # torch.compile the network (minutes of warm-up; graph breaks at the cupy calls)
    cuda_graphs: bool = True  # replay a captured graph per fixed input shape


@dataclass
class CudaReport:
    """What `accelerate` switched on, for logs and benchmarks."""

    fused_convattn: int = 0
    attention: dict[str, int] = field(default_factory=dict)
    flashbias_error: float = 0.0
    flashbias_rank: int = 0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        att = ", ".join(f"{k} x{v}" for k, v in sorted(self.attention.items())) or "none"
        fb = (
            f" (FlashBias rank {self.flashbias_rank}, bias error {self.flashbias_error:.1e})"
            if self.flashbias_rank
            else ""
        )
        return f"CUDA path: fused ConvAttn x{self.fused_convattn}; attention {att}{fb}" + "".join(
            f"; {n}" for n in self.notes
        )


def enable_cuda_fast_paths(
    model: nn.Module, *, dtype: torch.dtype, device: torch.device, options: CudaOptions | None = None
) -> CudaReport:
    """Swap the fused ConvAttn and the chosen window-attention back-end into `model` in place (on `device`)."""
    options = options or CudaOptions()
    report = CudaReport()
    if options.fused not in ("auto", "on", "off"):
        raise ValueError(f"fused must be auto, on or off, got {options.fused!r}")
    if options.fused == "on" or (options.fused == "auto" and device.type == "cuda"):
        if cupy_available():
            from .convattn import fuse_convattn

            report.fused_convattn = fuse_convattn(model)
        elif options.fused == "on":
            raise DeviceError("the fused ConvAttn kernels need cupy: pip install 'esc-stream[cuda]'")
        else:
            report.notes.append("cupy not installed, ConvAttn runs as torch ops (pip install 'esc-stream[cuda]')")
    wrapped = swap_window_attention(
        model,
        options.attention,
        dtype=dtype,
        device=device,
        rank=options.flashbias_rank,
        tol=options.flashbias_tolerance,
        compiled_flex=device.type == "cuda",
    )
    for w in wrapped:
        report.attention[w.backend] = report.attention.get(w.backend, 0) + 1
        if w.factors is not None:
            report.flashbias_error = max(report.flashbias_error, w.flashbias_error)
            report.flashbias_rank = max(report.flashbias_rank, w.factors.rank)
    return report


class GraphedNetwork:
    """Replays one captured CUDA graph per (input shape, stream); other shapes beyond `max_graphs` run eagerly.

    Tiles and video frames have few distinct shapes, so after one capture each call is a single graph launch
    instead of hundreds of kernel launches. Each stream gets its own graph and static buffers, so concurrent
    streams never share them.
    """

    def __init__(self, network: Callable[[torch.Tensor], torch.Tensor], max_graphs: int = 8) -> None:
        self.network = network
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, tuple[Any, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda or torch.is_grad_enabled():
            return self.network(x)
        stream = torch.cuda.current_stream(x.device)
        key = (tuple(x.shape), x.dtype, x.device, stream.cuda_stream)
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None and len(self._graphs) < self.max_graphs:
                entry = self._capture(x, stream)
                self._graphs[key] = entry
        if entry is None:
            return self.network(x)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()

    def _capture(self, x: torch.Tensor, stream: torch.cuda.Stream) -> tuple[Any, torch.Tensor, torch.Tensor]:
        static_in = x.clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: cuDNN/cupy/flex compile and load outside the capture
                self.network(static_in)
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.network(static_in)
        return graph, static_in, static_out


def accelerate(
    model: nn.Module,
    network: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    options: CudaOptions | None = None,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], CudaReport]:
    """The network an `Upscaler` runs on CUDA: fast paths swapped in, optionally compiled and graph-captured."""
    options = options or CudaOptions()
    report = enable_cuda_fast_paths(model, dtype=dtype, device=device, options=options)
    if options.compile:
        network = torch.compile(network)  # type: ignore[assignment]
        report.notes.append("torch.compile")
    if options.cuda_graphs and device.type == "cuda":
        network = GraphedNetwork(network)
        report.notes.append("CUDA graphs per input shape")
    return network, report


class CudaFrames:
    """Stream 8-bit RGB frames (HxWx3 or NxHxWx3 uint8) through an Upscaler on CUDA with copy/compute overlap.

    Frames cross the bus as uint8 (a quarter of float32's bytes) through pooled pinned buffers; conversion to
    the network's dtype and back happens on the GPU.
    """

    def __init__(self, up: Any, depth: int = 3) -> None:
        if up.device.type != "cuda":
            raise DeviceError(f"CudaFrames needs an Upscaler on CUDA, this one is on {up.device}")
        self.up = up
        self.pipeline = StreamPipeline(TorchCudaDevice(up.device), self._infer, depth=depth)

    def _infer(self, frames: torch.Tensor) -> torch.Tensor:
        single = frames.ndim == 3
        x = (frames[None] if single else frames).permute(0, 3, 1, 2).float().div_(255)
        y = self.up.upscale_tensor(x).clamp_(0, 1).mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 1)
        return y[0] if single else y

    def map(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        return self.pipeline.map(frames)
