"""Run segment tasks and whole-file tasks on Ray. The only module of esc-stream that imports Ray.

A task that dies (worker killed, out of memory, machine lost) is retried by Ray up to `retries` times; a
task that fails on bad input (VideoError) is not, since another attempt would fail the same way.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError, WorkerCrashedError

from ..errors import VideoError
from .segments import Job, Segment, SegmentDone, encode_segment

SegmentTask = Callable[[Job, Segment], dict[str, Any]]


@contextlib.contextmanager
def connect(address: str | None, workers: int | None = None) -> Iterator[None]:
    """Use the Ray runtime already initialised in this process, else join `address`, else start a local one
    (Ray's embedded default, `workers` CPUs). Only a runtime started here is shut down on leaving."""
    if address:
        _check_reachable(address)
    if ray.is_initialized():
        yield
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if address:
        kwargs["address"] = address
    elif workers:
        kwargs["num_cpus"] = workers
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise VideoError(f"--ray {address or '(local)'}: cannot start or reach a Ray cluster ({exc})") from None
    try:
        yield
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """One line at once for an address where nothing listens (Ray itself keeps retrying for minutes)."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        if address != "auto":
            raise VideoError(f"--ray {address}: expected HOST:PORT or ray://HOST:PORT")
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise VideoError(f"--ray {address}: no Ray cluster answers there ({exc.strerror or exc})") from None


def gpu_hint(device: str) -> str | None:
    """A note for a CPU run on a cluster that has GPUs (the default device is the CPU)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus and not device.startswith("cuda") and device != "auto":
        return f"note: the Ray cluster has {gpus} GPU(s); --device cuda (or auto) would give each task one"
    return None


def task_device(device: str) -> tuple[str, int]:
    """(device inside a task, GPUs each task asks Ray for). `auto`: one GPU per task when the cluster has
    GPUs. Ray hands every GPU task its own card as `cuda` (it sets CUDA_VISIBLE_DEVICES), so `cuda:N` means
    `cuda` here."""
    if device == "auto":
        device = "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
    if device.startswith("cuda"):
        if ray.cluster_resources().get("GPU", 0) < 1:
            raise VideoError(f"--device {device}: the Ray cluster has no GPU")
        return "cuda", 1
    return device, 0


def failure_reason(exc: BaseException, retries: int) -> str:
    """One line for a task that failed for good."""
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        if isinstance(cause, VideoError):
            return str(cause)
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    if isinstance(exc, WorkerCrashedError):
        return f"its worker died {retries + 1} times (killed, or out of memory)"
    if isinstance(exc, RayError):
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no details'}"
    return f"{type(exc).__name__}: {exc}"


def _run_segment(job: Job, seg: Segment, task: SegmentTask, threads: int) -> dict[str, Any]:
    """Executed on a worker: its own upscaler (cached per worker process), a normal pipeline run."""
    import torch

    torch.set_num_threads(threads)
    return task(job, seg)


def _run_file(do: Callable[..., dict[str, Any]], threads: int, *args: Any) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    return do(*args)


def _collect(
    refs: dict[Any, Any], submit: Callable[[], None], on_result: Callable[[Any, Any], None], retries: int
) -> list[tuple[Any, str]]:
    """Wait for every task, in the order they finish; refill through `submit`; failures as (key, reason)."""
    failures: list[tuple[Any, str]] = []
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                key = refs.pop(ref)
                submit()
                try:
                    on_result(key, ray.get(ref))
                except (RayError, VideoError) as exc:
                    failures.append((key, failure_reason(exc, retries)))
    except BaseException:  # Ctrl-C, SIGTERM: finished segments are on disk already, the rest is cancelled
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    return failures


class RayRunner:
    """A `segments.Runner` whose segment tasks run on Ray, at most `in_flight` at a time (None: all queued)."""

    def __init__(
        self,
        *,
        device: str = "cpu",
        retries: int = 3,
        cpus_per_task: int = 1,
        in_flight: int | None = None,
        task: SegmentTask = encode_segment,
    ) -> None:
        self.device, self.gpus = task_device(device)
        self.retries, self.cpus, self.in_flight, self.task = retries, cpus_per_task, in_flight, task

    def options(self) -> dict[str, Any]:
        # a dead worker is a system failure, retried up to max_retries; OSError (a flaky shared disk) too
        return {"num_cpus": self.cpus, "num_gpus": self.gpus, "max_retries": self.retries,
                "retry_exceptions": [OSError]}  # fmt: skip

    def __call__(self, job: Job, pending: list[Segment], on_done: SegmentDone) -> list[tuple[Segment, str]]:
        from dataclasses import replace

        job = replace(job, model=replace(job.model, device=self.device))
        remote = ray.remote(_run_segment).options(**self.options())
        job_ref = ray.put(job)  # sent to the object store once, not once per task
        queue = list(pending)
        refs: dict[Any, Segment] = {}

        def submit() -> None:
            while queue and (self.in_flight is None or len(refs) < self.in_flight):
                seg = queue.pop(0)
                refs[remote.remote(job_ref, seg, self.task, self.cpus)] = seg

        submit()
        return _collect(refs, submit, on_done, self.retries)


def run_files(
    do: Callable[..., dict[str, Any]],
    items: list[tuple[Any, tuple[Any, ...]]],
    on_result: Callable[[Any, dict[str, Any]], None],
    *,
    retries: int = 3,
    cpus_per_task: int = 1,
    gpus_per_task: int = 0,
    in_flight: int | None = None,
) -> list[tuple[Any, str]]:
    """Run `do(*args)` for each (key, args) as a Ray task; results arrive through `on_result` as they finish."""
    remote = ray.remote(_run_file).options(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=retries,
                                           retry_exceptions=[OSError])  # fmt: skip
    queue = list(items)
    refs: dict[Any, Any] = {}

    def submit() -> None:
        while queue and (in_flight is None or len(refs) < in_flight):
            key, args = queue.pop(0)
            refs[remote.remote(do, cpus_per_task, *args)] = key

    submit()
    return _collect(refs, submit, on_result, retries)
