"""Live streaming: decode ∥ upscale ∥ encode from a pipe or URL to a pipe, URL or file, with bounded latency.

Unlike `transcode`, nothing here seeks, needs the length, or holds more than a few frames: the input is
read once, straight through. Four threads share the work: a reader (demux + decode + RGB conversion), the
`run_pipeline` (hand-off, upscale in the caller's thread, encode + mux in a consumer thread) and a
stats reporter. The reader hands frames over through `_Pending`, which either back-pressures the source
(`block`) or drops the oldest frames (`drop`); the upscale stage drops a frame that could no longer meet
`max_latency` when a newer one is waiting. Audio packets travel the same path, in demux order, and are never
dropped: video frames keep their source timestamps, so a dropped frame leaves a gap, not a shift.

Latency is the wall time from a frame's packet leaving the demuxer to its encoded packet being muxed.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import select
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, cast

import av
import numpy as np
from av.video.reformatter import Interpolation

from ..budget import check_memory
from ..errors import VideoError
from .colour import frame_to_rgb
from .encode import (
    FrameSink,
    PacketCopy,
    add_copy,
    check_output_path,
    open_encoder,
    output_format,
    output_geometry,
    partial_path,
)
from .pipeline import run_pipeline
from .probe import VideoInfo, is_live, no_data, open_input, probe_container

STREAM_CODEC = {"webm": "libvpx-vp9", "yuv4mpegpipe": "rawvideo"}  # else libx264
REALTIME = ("block", "drop")
_RECENT = 300  # frames in the "current" latency window (p95 of the last ~10 s at 30 fps)


@dataclass
class StreamOptions:
    """Choices for `stream`; None means "follow the source" or a low-delay default."""

    format: str | None = None  # output container; default from the output's extension or URL scheme
    input_format: str | None = None  # FFmpeg demuxer name, for inputs it cannot guess
    input_options: dict[str, str] = field(default_factory=dict)
    codec: str | None = None
    crf: int | None = None
    preset: str | None = None
    pix_fmt: str | None = None
    encoder_options: dict[str, str] = field(default_factory=dict)
    size: tuple[int | None, int | None] | None = None
    audio: bool = True
    realtime: str = "block"
    max_latency: float = 2.0
    reconnect: bool = False
    timeout: float | None = None  # give up on a silent input (or a stalled output) after this many seconds
    native_rate: bool = False  # read the input no faster than its timestamps (like ffmpeg -re)
    overwrite: bool = False
    depth: int = 1  # frames waiting for the network: each one is a frame period more latency in block mode
    stats_every: float = 5.0


@dataclass
class StreamStats:
    """Counters of one run. Each field has one writer thread; readers only ever see a slightly old value."""

    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0
    bad_packets: int = 0
    resolution_changes: int = 0
    reconnects: int = 0
    stopped: bool = False
    timed_out: bool = False  # the input went silent for --timeout seconds after its first frame; the output is whole
    output: str = ""
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0
    latencies: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100_000))
    _mark: tuple[float, int, int] = (0.0, 0, 0)

    def percentile(self, q: float, last: int | None = None) -> float:
        """The q-th percentile of the frame latencies (of the `last` frames if given); nan before any frame."""
        values = list(self.latencies)[-last:] if last else list(self.latencies)
        return float(np.percentile(values, q)) if values else math.nan

    @property
    def median(self) -> float:
        return self.percentile(50)

    @property
    def p95(self) -> float:
        return self.percentile(95)

    @property
    def fps(self) -> float:
        return self.frames_out / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """Rates since the previous line, counts since the start, latency of the last frame and recent p95."""
        now = time.perf_counter()
        t, n_in, n_out = self._mark if self._mark[0] else (self.started, 0, 0)
        dt = max(now - t, 1e-9)
        self._mark = (now, self.frames_in, self.frames_out)
        current = self.latencies[-1] if self.latencies else math.nan
        text = (
            f"in {(self.frames_in - n_in) / dt:.1f} fps, out {(self.frames_out - n_out) / dt:.1f} fps, "
            f"{self.frames_out} frames, dropped {self.dropped}, "
            f"latency {current:.2f} s (p95 {self.percentile(95, _RECENT):.2f} s)"
        )
        extras = [(self.bad_packets, "bad packets skipped"), (self.resolution_changes, "resolution changes"),
                  (self.reconnects, "reconnects")]  # fmt: skip
        return text + "".join(f", {n} {what}" for n, what in extras if n)


def check_output(src: str, dst: str, opts: StreamOptions) -> str:
    """Everything about the output that can be refused before the model loads; returns the container."""
    if opts.realtime not in REALTIME:
        raise VideoError(f"--realtime {opts.realtime}: use one of {', '.join(REALTIME)}")
    if opts.max_latency <= 0:
        raise VideoError("--max-latency must be > 0 seconds")
    if opts.reconnect and not (is_live(src) and src != "-"):
        raise VideoError(f"{src}: --reconnect needs a URL input (a pipe or file cannot be reopened)")
    fmt = output_format(dst, opts.format, live=True)
    if dst == "-" and os.isatty(1):
        raise VideoError("stdout is a terminal: pipe it into a player (| ffplay -) or give an output URL or file")
    if not (dst == "-" or is_live(dst)):
        check_output_path(src if is_live(src) else Path(src), Path(dst), opts.overwrite)
    return fmt


def _low_delay(codec: str, rate: Fraction | None) -> dict[str, str]:
    """Encoder options for low delay: no B-frames or look-ahead, a keyframe every ~2 s for late joiners."""
    opts = {"g": str(max(1, round(2 * float(rate or 25))))}
    if codec in ("libx264", "libx265"):
        opts["tune"] = "zerolatency"  # no B-frames, no look-ahead, sliced threads (x264) / one frame thread
    elif codec in ("libvpx", "libvpx-vp9"):
        opts.update({"deadline": "realtime", "lag-in-frames": "0", "cpu-used": "8"})
    else:
        opts["bf"] = "0"
    return opts


class _Pending:
    """Reader -> upscaler hand-off. `block`: put waits while `depth` frames are pending (back-pressure on the
    source). `drop`: put never waits; past `capacity` pending frames the oldest frame is dropped. Packets of
    other streams are never dropped and do not count."""

    def __init__(self, depth: int, drop: bool, capacity: int, stats: StreamStats) -> None:
        self._items: collections.deque = collections.deque()
        self._frames = 0
        self._cond = threading.Condition()
        self._depth, self._drop, self._capacity = depth, drop, capacity
        self._ended = self._cancelled = False
        self._stats = stats

    def put(self, item: tuple, stop: threading.Event) -> bool:
        """Queue an item; False once the run is over (the reader should stop)."""
        frame = item[0] == "frame"
        with self._cond:
            while frame and not self._drop and self._frames >= self._depth:
                if self._cancelled or stop.is_set():
                    return False
                self._cond.wait(0.1)
            if self._cancelled:
                return False
            self._items.append(item)
            if frame:
                self._frames += 1
                if self._drop and self._frames > self._capacity:
                    self._drop_oldest_frame()
            self._cond.notify_all()
            return True

    def _drop_oldest_frame(self) -> None:
        for i, queued in enumerate(self._items):
            if queued[0] == "frame":
                del self._items[i]
                self._frames -= 1
                self._stats.dropped += 1
                return

    def end(self) -> None:
        """The reader is done: what is queued is still delivered."""
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def cancel(self) -> None:
        """The run is over: the reader's next put fails, pending items are discarded."""
        with self._cond:
            self._cancelled = True
            self._items.clear()
            self._cond.notify_all()

    def drain(self, stop: threading.Event) -> Iterator[tuple]:
        """Items in order until the reader ends or `stop` is set (pending frames are then discarded)."""
        while True:
            with self._cond:
                while not self._items and not self._ended and not stop.is_set():
                    self._cond.wait(0.1)
                if stop.is_set() or not self._items:
                    return
                item = self._items.popleft()
                if item[0] == "frame":
                    self._frames -= 1
                self._cond.notify_all()
            yield item


def _pipe_fd(src: str) -> int | None:
    """The file descriptor of "-" (stdin) and pipe:N inputs; None for URLs and files."""
    if src in ("-", "pipe:"):
        return 0
    if src.startswith("pipe:") and src[5:].isdigit():
        return int(src[5:])
    return None


class _SilentPipe:
    """stdin (or pipe:N) as the file-like object FFmpeg reads when --timeout is given: PyAV's timeout cannot
    interrupt a blocking read of a pipe, so each read here waits at most `timeout` seconds for data (select, in
    short slices so that a stop ends the wait too). When none comes it answers end of input, from then on, with
    `timed_out` set: the demuxer flushes what it holds and the stream ends as at a real end of input."""

    def __init__(self, fd: int, timeout: float, stop: threading.Event) -> None:
        self.fd, self.timeout, self.stop = fd, timeout, stop
        self.timed_out = False
        self.received = 0

    def read(self, size: int = -1) -> bytes:
        if self.timed_out or self.stop.is_set():
            return b""
        deadline = time.monotonic() + self.timeout
        while not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                self.timed_out = True
                return b""
            if select.select([self.fd], [], [], min(left, 0.2))[0]:
                data = os.read(self.fd, size if size > 0 else 65536)
                self.received += len(data)
                return data
        return b""


class _Source(threading.Thread):
    """Opens the input (and reopens it with --reconnect), demuxes, decodes and queues frames and packets.

    Runs in its own thread so that a source that blocks (a pause, a server waiting for its client) never
    keeps the main thread from handling a signal; on a stop while blocked it is simply left behind. Before
    the output exists it reads up to the first decoded frame, whose size (not the probed one, which may come
    from further on) sets the output size."""

    def __init__(self, src: str, opts: StreamOptions, stats: StreamStats, stop: threading.Event) -> None:
        super().__init__(daemon=True, name="esc-stream-reader")
        self.src, self.opts, self.stats, self.stop = src, opts, stats, stop
        self.opened = threading.Event()  # set once the first frame was read, or the input failed
        self.go = threading.Event()  # set by the caller once the output is ready
        self.error: BaseException | None = None
        self.info: VideoInfo | None = None
        self.audio: list[av.stream.Stream] = []  # the first connection's audio streams, copied to the output
        self.pending: _Pending | None = None
        self.latest_seq = -1
        self._offset = Fraction(0)  # seconds added to every timestamp of the current connection
        self._need_offset = False
        self._end = Fraction(0)  # where the latest packet or frame queued so far ends, output timeline, seconds
        self.pipe: _SilentPipe | None = None  # stdin/pipe:N read under --timeout
        self._interrupted = False  # PyAV's --timeout ended a wait for the current connection's next packet

    @property
    def silent(self) -> bool:
        """True once the input sent nothing for --timeout seconds (the reason its reading ended)."""
        return self._interrupted or (self.pipe is not None and self.pipe.timed_out)

    def _open(self) -> av.container.InputContainer:
        t = self.opts.timeout
        # FFmpeg's default 5 s of stream analysis would be 5 s of start-up delay on a live source
        options = {"analyzeduration": "500000", **self.opts.input_options}
        fd = _pipe_fd(self.src)
        if t and fd is not None:
            self.pipe = _SilentPipe(fd, t, self.stop)
            return open_input(self.src, format=self.opts.input_format, options=options, reader=self.pipe)
        return open_input(self.src, format=self.opts.input_format, options=options, timeout=(t, t) if t else None)

    def run(self) -> None:
        container = None
        try:
            try:
                container = self._open()
                info = probe_container(container, self.src, seekable=False)
                self.info = info
                self.audio = list(container.streams.audio) if self.opts.audio else []
                items = self._items(container)
                first = self._read_to_first_frame(items)
            except VideoError:
                if self.silent and not self.stop.is_set():  # not a bad input: a quiet one, said so
                    where = "stdin" if self.src == "-" else self.src
                    raise VideoError(no_data(where, cast(float, self.opts.timeout))) from None
                raise
            finally:
                self.opened.set()
            while not self.go.wait(0.1):
                if self.stop.is_set():
                    return
            assert self.pending is not None
            while container is not None:
                try:
                    for item in itertools.chain(first, items):  # lazily: the input never ends
                        if not self.pending.put(item, self.stop):
                            return
                finally:
                    container.close()
                container, first = self._reopen(), []
                if container is not None:
                    items = self._items(container)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self.error = exc
        finally:
            if self.pending is not None:
                self.pending.end()

    def _read_to_first_frame(self, items: Iterator[tuple]) -> list[tuple]:
        """Items up to the first frame, which sets the output size; VideoError if the input ends first."""
        assert self.info is not None
        first: list[tuple] = []
        for item in items:
            first.append(item)
            if item[0] == "frame":
                h, w = item[3].shape[:2]
                self.info = replace(self.info, width=w, height=h)
                return first
        where = "stdin" if self.src == "-" else self.src
        raise VideoError(f"{where}: ended before a video frame could be decoded")

    def _reopen(self) -> av.container.InputContainer | None:
        """With --reconnect, open the URL again (once a second) until it answers or the run is stopped."""
        while self.opts.reconnect and not self.stop.is_set():
            try:
                container = self._open()
                if not container.streams.video:
                    container.close()
                    raise VideoError("no video stream")
            except VideoError:
                self.stop.wait(1.0)
                continue
            self.stats.reconnects += 1
            self._need_offset, self._interrupted = True, False
            return container
        return None

    def _audio_slots(self, c: av.container.InputContainer) -> dict[int, int]:
        """Input audio stream index -> output audio slot: by order, where codec and rate are as at the start."""
        slots = {}
        for i, (s, o) in enumerate(zip(c.streams.audio, self.audio, strict=False)):
            a, b = cast(Any, s.codec_context), cast(Any, o.codec_context)
            if a.name == b.name and a.sample_rate == b.sample_rate:
                slots[s.index] = i
        return slots

    def _items(self, c: av.container.InputContainer) -> Iterator[tuple]:
        """One connection's frames ("frame", seq, pts, rgb, arrival) and audio ("packet", packet, slot), in
        demux order, to its end or the first unrecoverable error; timestamps on the output timeline."""
        assert self.info is not None
        vs = c.streams.video[0]
        vs.thread_type = "SLICE"  # frame threads would hold back one frame per thread
        slots = self._audio_slots(c) if self.opts.audio else {}
        wanted = [vs, *(s for s in c.streams if s.index in slots)]
        colour, out_tb = self.info.colour, self.info.time_base
        tb = vs.time_base or Fraction(1, 90000)
        step = Fraction(1, 1) / (self.info.average_rate or 25)
        size: tuple[int, int] | None = (self.info.width, self.info.height) if self.stats.frames_in else None
        last_pts: Fraction | None = None
        pace: tuple[float, float] | None = None
        failures = 0
        while True:
            try:
                for packet in c.demux(*wanted):
                    arrival = time.perf_counter()
                    failures = 0
                    if self.stop.is_set():
                        return
                    if packet.is_corrupt:  # flagged by the demuxer (e.g. MPEG-TS continuity errors)
                        self.stats.bad_packets += 1  # still decoded: the decoder conceals what it can
                    t = _seconds(packet)
                    if t is not None and self._need_offset:  # first packet after a reconnect
                        self._offset, self._need_offset = self._end - t, False
                    if self.opts.native_rate and t is not None:
                        pace = pace or (arrival, float(t))
                        self.stop.wait(max(0.0, pace[0] + float(t) - pace[1] - time.perf_counter()))
                    if packet.stream.index != vs.index:
                        if packet.pts is None or packet.dts is None or packet.time_base is None:
                            continue
                        shift = round(self._offset / packet.time_base)
                        packet.pts, packet.dts = packet.pts + shift, packet.dts + shift
                        self._end = max(self._end, Fraction((packet.pts + (packet.duration or 0)) * packet.time_base))
                        yield ("packet", packet, slots[packet.stream.index])
                        continue
                    try:
                        frames = cast(list[av.VideoFrame], packet.decode())
                    except av.error.FFmpegError:
                        self.stats.bad_packets += 1  # skipped; the decoder conceals its loss in later frames
                        continue
                    for frame in frames:
                        pts = Fraction(frame.pts * tb) if frame.pts is not None else (last_pts or Fraction(0)) + step
                        last_pts = pts
                        if frame.is_corrupt:
                            self.stats.bad_packets += 1
                        if size is not None and (frame.width, frame.height) != size:
                            self.stats.resolution_changes += 1
                        size = (frame.width, frame.height)
                        when = pts + self._offset
                        self._end = max(self._end, when + step)
                        seq = self.stats.frames_in
                        self.stats.frames_in += 1
                        self.latest_seq = seq
                        yield ("frame", seq, round(when / out_tb), frame_to_rgb(frame, colour), arrival)
                return  # end of input (the demuxer's final empty packets flushed the decoder)
            except av.error.FFmpegError as exc:
                if isinstance(exc, av.error.ExitError) and self.opts.timeout:
                    self._interrupted = True  # PyAV's --timeout: nothing came for that long
                if isinstance(exc, av.error.ExitError | av.error.EOFError) or failures >= 20:
                    return  # timed out, or the connection is gone: this connection is over
                failures += 1
                self.stats.bad_packets += 1


def _seconds(packet: av.Packet) -> Fraction | None:
    ts = packet.dts if packet.dts is not None else packet.pts
    if ts is None or packet.time_base is None or packet.size == 0:
        return None
    return Fraction(ts * packet.time_base)


def _fit(rgb: np.ndarray, box: tuple[int, int]) -> np.ndarray:
    """A frame whose aspect differs from the output's, resized to fit `box` (w, h) and centred on black."""
    h, w = rgb.shape[:2]
    k = min(box[0] / w, box[1] / h)
    fw, fh = min(box[0], max(2, round(w * k / 2) * 2)), min(box[1], max(2, round(h * k / 2) * 2))
    fmt = "rgb48le" if rgb.dtype == np.uint16 else "rgb24"
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format=fmt)
    small = frame.reformat(width=fw, height=fh, interpolation=Interpolation.LANCZOS).to_ndarray()
    canvas = np.zeros((box[1], box[0], 3), rgb.dtype)
    y, x = (box[1] - fh) // 2, (box[0] - fw) // 2
    canvas[y : y + fh, x : x + fw] = small
    return canvas


class _Sink(FrameSink):
    """The encoder side of a stream: frames of another aspect fitted, copied audio, and the latency of each
    frame, measured when its packet has been muxed."""

    def __init__(self, out: av.container.OutputContainer, ovs: av.video.stream.VideoStream,
                 audio: list[av.stream.Stream], info: VideoInfo, stats: StreamStats, scale: int) -> None:  # fmt: skip
        super().__init__(out, ovs, info.colour, scale, cast(Fraction, ovs.codec_context.time_base))
        self.audio, self.stats = audio, stats
        self.copy = PacketCopy()
        self.arrivals: dict[int, float] = {}
        self.encode_seconds: collections.deque = collections.deque(maxlen=8)

    def consume(self, item: tuple) -> None:
        if item[0] == "packet":
            self.copy.mux(self.out, item[1], self.audio[item[2]])
        elif item[0] == "frame":
            self._encode(item)

    def _encode(self, item: tuple) -> None:
        t0 = time.perf_counter()
        _, _, pts, rgb, arrival = item
        pts = self.next_pts(pts)
        if (rgb.shape[1], rgb.shape[0]) != self.size:
            aspect_out = self.size[0] / self.size[1]
            if abs(rgb.shape[1] / rgb.shape[0] - aspect_out) > 0.01 * aspect_out:
                rgb = _fit(rgb, self.size)
        self.arrivals[pts] = arrival
        if len(self.arrivals) > 1000:  # an encoder that swallows frames must not grow this forever
            for k in sorted(self.arrivals)[:500]:
                del self.arrivals[k]
        self.encode(rgb, pts)
        self.encode_seconds.append(time.perf_counter() - t0)

    def mux(self, packets: Iterable[av.Packet]) -> None:
        for packet in packets:
            arrival = self.arrivals.pop(packet.pts, None) if packet.pts is not None else None
            self.out.mux(packet)
            if arrival is not None:
                self.stats.latencies.append(time.perf_counter() - arrival)
                self.stats.frames_out += 1


def _open_output(dst: str, fmt: str, timeout: float | None) -> tuple[av.container.OutputContainer, str]:
    """(container, where it is being written): stdout, a URL, or DST.partial for a file."""
    options = {"flush_packets": "1"}  # every packet leaves at once: latency, and a readable file if killed
    if dst == "-":
        target = "pipe:1"
    elif is_live(dst):
        target = dst
    else:
        target = str(partial_path(Path(dst)))
    try:
        t = (timeout, timeout) if timeout else None
        return av.open(target, mode="w", format=fmt, options=options, timeout=t), target
    except (av.error.FFmpegError, ValueError) as exc:
        name = "stdout" if dst == "-" else dst
        raise VideoError(f"{name}: cannot open for writing ({getattr(exc, 'strerror', None) or exc})") from None


def stream(
    src: str,
    dst: str,
    upscaler: Any,
    opts: StreamOptions | None = None,
    *,
    stop: threading.Event | None = None,
    report: Callable[[StreamStats], None] | None = None,
) -> StreamStats:
    """Upscale a live input into `dst` until the input ends or `stop` is set; returns the run's stats.

    `src`/`dst` are "-" (stdin/stdout), URLs FFmpeg opens, or file paths (a file output is written as
    DST.partial and renamed once closed, also after a stop). Raises VideoError on bad input or output."""
    opts = opts or StreamOptions()
    stop = stop or threading.Event()
    fmt = check_output(src, dst, opts)
    stats = StreamStats()
    source = _Source(src, opts, stats, stop)
    source.start()
    while not source.opened.wait(0.1):  # a short wait, so that signal handlers run in this thread
        if stop.is_set():  # stopped while the source was still connecting: nothing was written
            stats.stopped = True
            return stats
    if stop.is_set():  # stopped just as the source gave up (a stop also ends a --timeout wait on a pipe)
        stats.stopped = True
        return stats
    if source.error is not None:
        raise source.error
    info = cast(VideoInfo, source.info)
    try:  # the first frame's size is known now: refused before the output exists if it cannot fit
        out_w, out_h, _ = output_geometry(info, upscaler.scale, opts)
        check_memory(upscaler, info.width, info.height, out_size=(out_w, out_h), in_flight=opts.depth + 2,
                     what="stdin" if src == "-" else src)  # fmt: skip
    except BaseException:
        stop.set()  # the reader, waiting for the go, ends
        raise
    out, target = _open_output(dst, fmt, opts.timeout)
    stats.output = "stdout" if dst == "-" else dst
    finished = threading.Event()
    try:
        sink, pending = _prepare(out, source, info, upscaler, opts, fmt, stats)
        # the first call of a network is slow (allocations, kernel selection): not on a live frame's clock
        upscaler(np.zeros((info.height, info.width, 3), np.uint16 if info.colour.deep else np.uint8))
        _start(out, stats.output, opts.timeout)  # connect (or wait for a client), write the header, errors included
        source.go.set()
        reporter = None
        if report is not None and opts.stats_every > 0:
            reporter = threading.Thread(target=_report_loop, args=(report, stats, opts.stats_every, finished))
            reporter.daemon = True
            reporter.start()
        try:
            run_pipeline(pending.drain(stop), _transform(upscaler, opts, source, sink, stats), sink.consume,
                         depth=1, stop=stop)  # fmt: skip
        finally:
            pending.cancel()
            stop_reader = stop.is_set()
            finished.set()
        sink.flush()
        source.join(timeout=1.0 if stop_reader else None)  # left behind if blocked in a read
        if source.error is not None:
            raise source.error
    except (av.error.FFmpegError, OSError) as exc:  # the reader's errors are handled there: this is the output
        source.go.set()
        stop.set()
        _close(out)
        kept = f"; {target} kept" if target.endswith(".partial") and Path(target).exists() else ""
        why = getattr(exc, "strerror", None) or exc
        if isinstance(exc, av.error.ExitError) and opts.timeout:
            why = f"it took nothing for {opts.timeout:g} s (--timeout)"
        raise VideoError(f"{stats.output}: writing failed ({why}){kept}") from None
    except BaseException:
        source.go.set()
        stop.set()
        _close(out)
        raise
    _close(out)
    stats.stopped = stop.is_set()
    stats.timed_out = source.silent and not stats.stopped
    stats.seconds = time.perf_counter() - stats.started
    if stats.frames_in == 0 and not stats.stopped:
        raise VideoError(f"{'stdin' if src == '-' else src}: no video frame could be decoded")
    if target.endswith(".partial") and Path(target).exists():
        Path(target).replace(dst)
    return stats


def _start(out: av.container.OutputContainer, name: str, timeout: float | None) -> None:
    try:
        out.start_encoding()
    except av.error.ExitError:
        if not timeout:
            raise VideoError(f"{name}: cannot open for writing (interrupted)") from None
        raise VideoError(f"{name}: no peer took the output within {timeout:g} s (--timeout)") from None
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoError(f"{name}: cannot open for writing ({getattr(exc, 'strerror', None) or exc})") from None


def _close(out: av.container.OutputContainer) -> None:
    try:
        out.close()
    except (av.error.FFmpegError, OSError):
        pass  # a peer that went away cannot take the trailer


def _prepare(
    out: av.container.OutputContainer,
    source: _Source,
    info: VideoInfo,
    upscaler: Any,
    opts: StreamOptions,
    fmt: str,
    stats: StreamStats,
) -> tuple[_Sink, _Pending]:
    """Open the encoder (low-delay unless the user's -e options say otherwise) and the copied audio streams."""
    codec = opts.codec or STREAM_CODEC.get(fmt, "libx264")
    choices = replace(opts, codec=codec, preset=opts.preset or "veryfast",
                      encoder_options={**_low_delay(codec, info.average_rate), **opts.encoder_options})  # fmt: skip
    output_geometry(info, upscaler.scale, choices)  # a bad --size is refused before the encoder is opened
    ovs = open_encoder(out, info, upscaler.scale, choices, fmt)
    audio = [
        add_copy(
            out,
            s,
            f"{fmt} cannot carry the audio stream #{s.index} ({s.codec_context.name}): "
            "use --no-audio or another format",
        )  # fmt: skip
        for s in source.audio
    ]
    rate = float(info.average_rate or 25)
    capacity = max(2, min(64, math.ceil(opts.max_latency * rate) + 1))
    source.pending = _Pending(opts.depth, opts.realtime == "drop", capacity, stats)
    return _Sink(out, ovs, audio, info, stats, upscaler.scale), source.pending


def _transform(
    upscaler: Any, opts: StreamOptions, source: _Source, sink: _Sink, stats: StreamStats
) -> Callable[[tuple], tuple]:
    """The upscale stage. In drop mode a frame is skipped when, given the recent worst upscale + encode time
    (with 20 % to spare), it would leave later than `max_latency`: a late frame is of no use to a live viewer.
    When that time alone exceeds the bound no frame can make it, and only frames with a newer one waiting are
    skipped, so the output keeps moving."""
    recent: collections.deque = collections.deque(maxlen=8)
    drop = opts.realtime == "drop"

    def transform(item: tuple) -> tuple:
        if item[0] != "frame":
            return item
        _, seq, pts, rgb, arrival = item
        if drop:
            cost = (max(recent) if recent else 0.0) + (max(sink.encode_seconds) if sink.encode_seconds else 0.0)
            late = time.perf_counter() - arrival + 1.2 * cost > opts.max_latency
            if late and (source.latest_seq > seq or 1.2 * cost < opts.max_latency):
                stats.dropped += 1
                return ("dropped",)
        t0 = time.perf_counter()
        up = upscaler(rgb)
        recent.append(time.perf_counter() - t0)
        return ("frame", seq, pts, up, arrival)

    return transform


def _report_loop(
    report: Callable[[StreamStats], None], stats: StreamStats, every: float, done: threading.Event
) -> None:
    """Call `report` every `every` seconds until `done`; from its own thread, so a paused source still reports."""
    while not done.wait(every):
        report(stats)
