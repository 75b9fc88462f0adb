"""Per-frame latency and throughput of `esc-video stream` on a loopback TCP MPEG-TS stream (320x180, x2, CPU).

    python benchmarks/stream_latency.py [--frames N] [--drop-seconds S] [--max-latency S] [--weights FILE]

The bundled clip's 320x180 frames are encoded to H.264 MPEG-TS (looped to N frames, 25 fps). A sender thread
serves them over 127.0.0.1 to `stream`, which upscales x2 and sends MPEG-TS on to a receiver thread that
decodes every frame. Two runs:

- block: the sender writes as fast as the pipeline takes it (back-pressure), so the output rate is the
  pipeline's throughput; latency is then set by the queues (a few frames' worth).
- drop: the sender keeps the clip's 25 fps for --drop-seconds; `stream --realtime drop` drops what would
  miss --max-latency.

Latency is per frame, from its packet leaving the demuxer to its encoded packet being written; "model only"
is the upscaler alone on the same frames, for comparison.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import tempfile
import threading
import time
from pathlib import Path

import av
import numpy as np
import torch

import esc_stream
from esc_stream.video.stream import StreamOptions, stream

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "examples" / "realvideo_demo000.mp4"
WAIT = 600.0


def _frames(n: int) -> list[np.ndarray]:
    with av.open(str(CLIP)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return [frames[i % len(frames)] for i in range(n)]


def _encode(frames: list[np.ndarray], path: Path) -> None:
    with av.open(str(path), "w", format="mpegts") as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        vs.codec_context.options = {"crf": "18", "preset": "veryfast", "tune": "zerolatency"}
        for i, rgb in enumerate(frames):
            f = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            f.pts = i
            out.mux(vs.encode(f))
        out.mux(vs.encode(None))


def _port() -> int:
    """A free port below the ephemeral range: a client retrying a connect to an ephemeral port that nobody
    listens on can be given that same port as its own and connect to itself (TCP self-connect)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(max(1024, low - 8000), low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def _send(path: Path, url: str, paced: bool) -> None:
    with av.open(str(path)) as inp:
        t_end = time.monotonic() + WAIT
        while True:  # the connection is made when the header is written; retry until `stream` listens
            out = av.open(url, "w", format="mpegts", timeout=WAIT)
            streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
            try:
                out.start_encoding()
                break
            except (OSError, av.error.FFmpegError):
                if time.monotonic() > t_end:
                    raise
                time.sleep(0.05)
        t0 = time.monotonic()
        first = None
        for p in inp.demux():
            if p.dts is None:
                continue
            if paced:
                t = float(p.dts * p.time_base)
                first = t if first is None else first
                time.sleep(max(0.0, t0 + t - first - time.monotonic()))
            p.stream = streams[p.stream.index]
            out.mux(p)
        out.close()


def _receive(url: str, count: list[int]) -> None:
    t_end = time.monotonic() + WAIT
    while True:
        try:
            c = av.open(url, format="mpegts", timeout=WAIT)
            break
        except (OSError, av.error.FFmpegError):
            if time.monotonic() > t_end:
                raise
            time.sleep(0.05)
    with c:
        for _ in c.decode(video=0):
            count[0] += 1


def _run(clip: Path, up, opts: StreamOptions, paced: bool) -> tuple:
    a, b = _port(), _port()
    received = [0]
    threads = [
        threading.Thread(target=_send, args=(clip, f"tcp://127.0.0.1:{a}", paced), daemon=True),
        threading.Thread(target=_receive, args=(f"tcp://127.0.0.1:{b}", received), daemon=True),
    ]
    for t in threads:
        t.start()
    stats = stream(f"tcp://127.0.0.1:{a}?listen=1", f"tcp://127.0.0.1:{b}?listen=1", up, opts)
    for t in threads:
        t.join(WAIT)
    return stats, received[0]


def _line(name: str, stats, received: int) -> str:
    worst = max(stats.latencies, default=float("nan"))
    return (
        f"  {name:<6}: {stats.frames_in} frames in, {stats.frames_out} out ({received} received), "
        f"{stats.dropped} dropped; throughput {stats.fps:.3f} fps; "
        f"latency median {stats.median:.3f} s, p95 {stats.p95:.3f} s, max {worst:.3f} s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=31, help="frames for the block run (default 31)")
    ap.add_argument("--drop-seconds", type=float, default=10.0, help="source seconds for the drop run (0: skip)")
    ap.add_argument("--max-latency", type=float, default=2.0, help="bound for the drop run (default 2 s)")
    ap.add_argument("--weights")
    args = ap.parse_args()

    up = esc_stream.load(args.weights)
    frames = _frames(max(args.frames, round(args.drop_seconds * 25)))
    h, w = frames[0].shape[:2]
    print(f"{CLIP.name} {w}x{h} -> x{up.scale}, {up.variant} [{up.source}], loopback TCP MPEG-TS")
    print(f"  torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    up(frames[0])  # warm-up
    t0 = time.perf_counter()
    for f in frames[:8]:
        up(f)
    model = (time.perf_counter() - t0) / 8
    print(f"  model only: {1 / model:.3f} fps ({model:.3f} s a frame)")
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "block.ts"
        _encode(frames[: args.frames], clip)
        stats, received = _run(clip, up, StreamOptions(), paced=False)
        print(_line("block", stats, received))
        if args.drop_seconds > 0:
            clip = Path(tmp) / "drop.ts"
            _encode(frames[: round(args.drop_seconds * 25)], clip)
            opts = StreamOptions(realtime="drop", max_latency=args.max_latency)
            stats, received = _run(clip, up, opts, paced=True)
            print(_line("drop", stats, received) + f" (source 25 fps, bound {args.max_latency:g} s)")


if __name__ == "__main__":
    main()
