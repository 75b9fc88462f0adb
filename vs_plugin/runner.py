"""The work behind one `core.esc.Upscale` node: frames in from VapourSynth's threads, batched through one shared
Upscaler, frames out."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from esc_stream import Upscaler

Plane = tuple[memoryview, int]  # a plane's memory and its stride in bytes, as the C shim hands them over


class Batcher:
    """Run `fn` on batches of the arrays waiting at the moment a worker is free.

    One worker thread per stream; a worker takes the oldest waiting array and up to `batch - 1` more that are
    already queued (it never waits for more), so batches form only where several frames are in flight.
    """

    def __init__(self, fn: Callable[[np.ndarray, Any], np.ndarray], batch: int, contexts: Sequence[Any]) -> None:
        self._fn = fn
        self._batch = batch
        self._queue: queue.Queue[tuple[np.ndarray, Future[np.ndarray]] | None] = queue.Queue()
        self.batch_sizes: list[int] = []  # for tests and diagnostics
        self._workers = [
            threading.Thread(target=self._work, args=(ctx,), name=f"esc-worker-{i}", daemon=True)
            for i, ctx in enumerate(contexts)
        ]
        for w in self._workers:
            w.start()

    def submit(self, x: np.ndarray) -> Future[np.ndarray]:
        fut: Future[np.ndarray] = Future()
        self._queue.put((x, fut))
        return fut

    def close(self) -> None:
        for _ in self._workers:
            self._queue.put(None)
        for w in self._workers:
            w.join()

    def _work(self, ctx: Any) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is None:
                return
            items = [item]
            while len(items) < self._batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:  # finish what was taken, then stop
                    stop = True
                    break
                items.append(nxt)
            self.batch_sizes.append(len(items))
            try:
                out = self._fn(np.stack([x for x, _ in items]), ctx)
            except BaseException as exc:  # hand every failure to the frames waiting for it
                for _, fut in items:
                    fut.set_exception(exc)
                continue
            for i, (_, fut) in enumerate(items):
                fut.set_result(out[i])


class NodeRunner:
    """One Upscaler shared by every frame of a node; `process` is called by the shim on VapourSynth threads."""

    def __init__(self, up: Upscaler, width: int, height: int, *, half: bool, batch: int, streams: int) -> None:
        self.up = up
        self.width, self.height = width, height
        self.dtype = np.dtype(np.float16 if half else np.float32)
        self._torch_out = torch.float16 if half else torch.float32
        contexts: list[Any] = [None]
        if up.device.type == "cuda":  # per worker: its own upload/compute/download streams and pinned buffers
            from esc_stream.cuda.scheduler import StreamPipeline, TorchCudaDevice

            device = TorchCudaDevice(up.device)
            contexts = [StreamPipeline(device, self._on_device, depth=1) for _ in range(streams)]
        self.batcher = Batcher(self._infer, batch, contexts)

    def _view(self, plane: Plane, width: int, height: int) -> np.ndarray:
        mem, stride = plane
        return np.frombuffer(mem, self.dtype).reshape(height, stride // self.dtype.itemsize)[:, :width]

    def process(self, n: int, src: Sequence[Plane], dst: Sequence[Plane]) -> None:
        """Upscale frame `n`: read the three planes of `src`, write the three planes of `dst`."""
        x = np.stack([self._view(p, self.width, self.height) for p in src])  # a copy: src dies after the call
        y = self.batcher.submit(x).result()
        s = self.up.scale
        for plane, values in zip(dst, y, strict=True):
            self._view(plane, self.width * s, self.height * s)[...] = values

    def _on_device(self, x: torch.Tensor) -> torch.Tensor:
        return self.up.upscale_tensor(x).clamp_(0, 1).to(self._torch_out)

    @torch.inference_mode()
    def _infer(self, batch: np.ndarray, pipeline: Any) -> np.ndarray:
        if pipeline is None:
            return self._on_device(torch.from_numpy(batch)).numpy()
        # pooled pinned buffers, copies on their own streams; waits for this worker's frames only
        return pipeline.run(batch)

    def close(self) -> None:
        self.batcher.close()
