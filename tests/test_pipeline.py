"""The decode ∥ infer ∥ encode pipeline: order, bounded memory, errors from every stage, clean stop."""

import threading
import time

import pytest

from esc_stream.video.pipeline import run_pipeline


def test_order_and_count():
    out = []
    n = run_pipeline(range(100), lambda x: x * 2, out.append, depth=3)
    assert n == 100 and out == [2 * i for i in range(100)]


def test_memory_is_bounded():
    produced, consumed = [], []
    lead = []

    def produce():
        for i in range(60):
            produced.append(i)
            lead.append(len(produced) - len(consumed))
            yield i

    def consume(x):
        time.sleep(0.002)
        consumed.append(x)

    run_pipeline(produce(), lambda x: x, consume, depth=2)
    # in flight at most: 2 in each queue + one in each stage
    assert max(lead) <= 2 + 2 + 3


def test_stages_overlap():
    def produce():
        for i in range(8):
            time.sleep(0.03)
            yield i

    def slow(x):
        time.sleep(0.03)
        return x

    t0 = time.perf_counter()
    run_pipeline(produce(), slow, lambda x: time.sleep(0.03), depth=2)
    assert time.perf_counter() - t0 < 8 * 0.09 * 0.75  # serial would take 0.72 s


@pytest.mark.parametrize("stage", ["produce", "transform", "consume"])
def test_first_error_is_raised(stage):
    def produce():
        for i in range(50):
            if stage == "produce" and i == 5:
                raise OSError("decode failed")
            yield i

    def transform(x):
        if stage == "transform" and x == 5:
            raise RuntimeError("model failed")
        return x

    def consume(x):
        if stage == "consume" and x == 5:
            raise ValueError("encode failed")

    with pytest.raises((OSError, RuntimeError, ValueError), match="failed"):
        run_pipeline(produce(), transform, consume, depth=2)
    assert threading.active_count() < 10  # no stuck stage threads pile up


def test_stop_drains_what_was_produced():
    stop = threading.Event()
    seen = []

    def consume(x):
        seen.append(x)
        if x == 10:
            stop.set()

    n = run_pipeline(iter(range(10_000)), lambda x: x, consume, depth=2, stop=stop)
    assert n == len(seen) and 11 <= n < 100 and seen == list(range(n))
