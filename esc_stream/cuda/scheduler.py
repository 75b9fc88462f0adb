"""Overlap host→device copies, inference and device→host copies of different frames on separate CUDA streams.

The scheduler is written against `Device`, a small interface (streams, events, pinned host buffers, async copies),
so its ordering logic runs unchanged on the real `TorchCudaDevice` and on the recording fake of the tests:

- frame i is copied up on the upload stream, computed on the compute stream after the upload's event, and copied
  down on the download stream after the compute's event; while frame i computes, frame i+1 uploads and frame i-1
  downloads;
- a pinned input buffer goes back to its pool with the event of the upload that reads it, and is written again
  only after that event (the host waits for it if it must); a pinned output buffer is reused only after the host
  has read the frame out of it;
- a device tensor made on one stream and used on another is announced to that stream (`retain`, i.e.
  `Tensor.record_stream`), so the caching allocator does not hand its memory out while the other stream uses it;
- results come back strictly in submission order, and at most `depth` frames are in flight, so memory is bounded:
  `depth` pinned buffers of each kind per frame shape, `max_shapes` shapes kept.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np


class Device(Protocol):
    """What the scheduler needs from an accelerator. Buffers and events are opaque to it."""

    def new_stream(self) -> Any: ...

    def pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """A page-locked host buffer."""
        ...

    def write(self, host: Any, array: np.ndarray) -> None:
        """Host fills a pinned buffer (synchronous, on the host)."""
        ...

    def read(self, host: Any) -> np.ndarray:
        """Host copies a pinned buffer out (synchronous, on the host)."""
        ...

    def upload(self, host: Any, stream: Any) -> Any:
        """Enqueue a host→device copy on `stream`; returns the device buffer."""
        ...

    def compute(self, fn: Callable[[Any], Any], x: Any, stream: Any) -> Any:
        """Enqueue `fn(x)` on `stream`; returns its device result."""
        ...

    def download(self, dev: Any, host: Any, stream: Any) -> None:
        """Enqueue a device→host copy of `dev` into the pinned buffer `host` on `stream`."""
        ...

    def shape_of(self, dev: Any) -> tuple[tuple[int, ...], np.dtype]:
        """Host-side shape and dtype of a device buffer (known as soon as the work is enqueued)."""
        ...

    def retain(self, dev: Any, stream: Any) -> None:
        """`dev` will be used on `stream`: keep its memory until the work queued there so far is done."""
        ...

    def record(self, stream: Any) -> Any:
        """An event that completes when the work queued on `stream` so far is done."""
        ...

    def wait(self, stream: Any, event: Any) -> None:
        """Work queued on `stream` from now on starts after `event`."""
        ...

    def synchronize(self, event: Any) -> None:
        """Block the host until `event` completes."""
        ...


class PinnedPool:
    """Pinned host buffers by (shape, dtype): at most `per_shape` each, `max_shapes` shapes, reused round-robin.

    A buffer comes back with the event after which it may be written again (None: at once). `take` hands out the
    least recently returned buffer of the shape, waiting on the host for its event, or makes a new one while the
    shape has fewer than `per_shape`.
    """

    def __init__(self, device: Device, per_shape: int, max_shapes: int = 4) -> None:
        if per_shape < 1:
            raise ValueError(f"a pool needs at least one buffer per shape, got {per_shape}")
        self.device = device
        self.per_shape = per_shape
        self.max_shapes = max_shapes
        self._free: OrderedDict[tuple, deque[tuple[Any, Any]]] = OrderedDict()
        self._made: dict[tuple, int] = {}
        self.allocations = 0  # pinned buffers made so far (for tests and diagnostics)

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        key = (tuple(shape), np.dtype(dtype).str)
        free = self._free.setdefault(key, deque())
        self._free.move_to_end(key)
        made = self._made.get(key, 0)
        if not free and made >= self.per_shape:
            raise RuntimeError(f"pinned pool exhausted for {key}: every buffer is still held")
        if free and (made >= self.per_shape or free[0][1] is None):
            buf, ready = free.popleft()
            if ready is not None:
                self.device.synchronize(ready)
            return buf
        self._evict()
        self._made[key] = made + 1
        self.allocations += 1
        return self.device.pinned(tuple(shape), np.dtype(dtype))

    def give(self, buf: Any, shape: tuple[int, ...], dtype: np.dtype, ready: Any = None) -> None:
        key = (tuple(shape), np.dtype(dtype).str)
        self._free.setdefault(key, deque()).append((buf, ready))

    def _evict(self) -> None:
        """Forget the least recently used shapes whose buffers are all free, beyond `max_shapes`."""
        for key in list(self._free)[:-1]:
            if len(self._free) <= self.max_shapes:
                break
            if len(self._free[key]) == self._made.get(key, 0):
                for _, ready in self._free.pop(key):
                    if ready is not None:
                        self.device.synchronize(ready)  # its upload may still read it
                self._made.pop(key, None)


class StreamPipeline:
    """Run `fn` (device tensor -> device tensor) over host frames with upload ∥ compute ∥ download overlap.

    `map(frames)` yields `fn(frame)` for every frame, in order, with up to `depth` frames in flight; `run(frame)`
    is one frame through the same streams and buffers (what a worker thread of the VapourSynth filter calls).
    One pipeline belongs to one thread at a time.
    """

    def __init__(self, device: Device, fn: Callable[[Any], Any], *, depth: int = 3, max_shapes: int = 4) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.device = device
        self.fn = fn
        self.depth = depth
        self.up_stream = device.new_stream()
        self.compute_stream = device.new_stream()
        self.down_stream = device.new_stream()
        self.inputs = PinnedPool(device, depth + 1, max_shapes)  # +1: the next frame fills while depth fly
        self.outputs = PinnedPool(device, depth, max_shapes)

    def _submit(self, frame: np.ndarray) -> tuple[Any, Any, tuple[tuple[int, ...], np.dtype]]:
        d = self.device
        host_in = self.inputs.take(frame.shape, frame.dtype)
        d.write(host_in, frame)
        dev_in = d.upload(host_in, self.up_stream)
        uploaded = d.record(self.up_stream)
        self.inputs.give(host_in, frame.shape, frame.dtype, ready=uploaded)
        d.wait(self.compute_stream, uploaded)
        d.retain(dev_in, self.compute_stream)
        dev_out = d.compute(self.fn, dev_in, self.compute_stream)
        computed = d.record(self.compute_stream)
        shape, dtype = d.shape_of(dev_out)
        host_out = self.outputs.take(shape, dtype)
        d.wait(self.down_stream, computed)
        d.retain(dev_out, self.down_stream)
        d.download(dev_out, host_out, self.down_stream)
        return host_out, d.record(self.down_stream), (shape, dtype)

    def _collect(self, pending: tuple[Any, Any, tuple[tuple[int, ...], np.dtype]]) -> np.ndarray:
        host_out, downloaded, (shape, dtype) = pending
        self.device.synchronize(downloaded)
        result = self.device.read(host_out)
        self.outputs.give(host_out, shape, dtype)  # read: free at once
        return result

    def map(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        in_flight: deque[tuple[Any, Any, tuple[tuple[int, ...], np.dtype]]] = deque()
        for frame in frames:
            if len(in_flight) == self.depth:
                yield self._collect(in_flight.popleft())
            in_flight.append(self._submit(np.ascontiguousarray(frame)))
        while in_flight:
            yield self._collect(in_flight.popleft())

    def run(self, frame: np.ndarray) -> np.ndarray:
        return self._collect(self._submit(np.ascontiguousarray(frame)))


class TorchCudaDevice:
    """`Device` on one CUDA device through torch: torch streams and events, pinned CPU tensors."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)

    def new_stream(self) -> Any:
        return self.torch.cuda.Stream(self.device)

    def pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        t = self.torch.from_numpy(np.empty(0, dtype)).dtype
        return self.torch.empty(shape, dtype=t, pin_memory=True)

    def write(self, host: Any, array: np.ndarray) -> None:
        host.numpy()[...] = array

    def read(self, host: Any) -> np.ndarray:
        return host.numpy().copy()

    def upload(self, host: Any, stream: Any) -> Any:
        with self.torch.cuda.stream(stream):
            return host.to(self.device, non_blocking=True)

    def compute(self, fn: Callable[[Any], Any], x: Any, stream: Any) -> Any:
        with self.torch.cuda.stream(stream), self.torch.inference_mode():
            return fn(x)

    def download(self, dev: Any, host: Any, stream: Any) -> None:
        with self.torch.cuda.stream(stream):
            host.copy_(dev, non_blocking=True)

    def shape_of(self, dev: Any) -> tuple[tuple[int, ...], np.dtype]:
        return tuple(dev.shape), self.torch.empty(0, dtype=dev.dtype).numpy().dtype

    def retain(self, dev: Any, stream: Any) -> None:
        dev.record_stream(stream)

    def record(self, stream: Any) -> Any:
        event = self.torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def synchronize(self, event: Any) -> None:
        event.synchronize()
