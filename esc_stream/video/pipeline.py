"""A three-stage pipeline: produce (thread) -> transform (caller's thread) -> consume (thread).

Stages are joined by bounded queues, so memory stays bounded whatever the stream length, and decode and
encode overlap inference. Order is kept. The first exception in any stage stops all three and is
re-raised in the caller; `stop` (e.g. set by a signal handler) ends the run early but cleanly: whatever
was produced is transformed and consumed, then the consumer's `close` runs.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _put(q: queue.Queue, item: Any, abort: threading.Event) -> bool:
    """Put unless the run was aborted; returns False when it was."""
    while not abort.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def run_pipeline(
    produce: Iterable[Any],
    transform: Callable[[Any], Any],
    consume: Callable[[Any], None],
    *,
    depth: int = 4,
    stop: threading.Event | None = None,
) -> int:
    """Run the three stages; returns the number of items consumed."""
    stop = stop or threading.Event()
    abort = threading.Event()  # set on failure: every stage gives up at once
    inbox: queue.Queue = queue.Queue(maxsize=depth)
    outbox: queue.Queue = queue.Queue(maxsize=depth)
    errors: list[BaseException] = []
    consumed = 0

    def producer() -> None:
        try:
            for item in produce:
                if stop.is_set() or not _put(inbox, item, abort):
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)
            abort.set()
        finally:
            _put(inbox, _END, abort)

    def consumer() -> None:
        nonlocal consumed
        try:
            while True:
                item = outbox.get()
                if item is _END or abort.is_set():
                    return
                consume(item)
                consumed += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            abort.set()

    threads = [threading.Thread(target=producer, daemon=True), threading.Thread(target=consumer, daemon=True)]
    for t in threads:
        t.start()
    try:
        while not abort.is_set():
            try:
                item = inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _END:
                break
            if not _put(outbox, transform(item), abort):
                break
    except BaseException as exc:
        errors.append(exc)
        abort.set()
    finally:
        if not abort.is_set():
            _put(outbox, _END, abort)
        else:
            # unblock a consumer waiting on an empty queue
            try:
                outbox.put_nowait(_END)
            except queue.Full:
                pass
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return consumed
