"""Transcode a file: decode ∥ upscale ∥ encode, keeping audio, subtitles, timestamps, colour and metadata.

Video frames keep their source pts (variable frame rate stays variable); audio and subtitle packets are
copied untouched, passing through the pipeline in demux order so the output interleaves naturally. The
output is written to `OUT.partial` and renamed when complete.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, cast

import av

from ..errors import VideoError
from .colour import frame_to_rgb
from .encode import (
    CONTAINERS,
    REMUXED,
    RESUMABLE,
    FrameSink,
    PacketCopy,
    add_copied_streams,
    check_output_path,
    copy_metadata,
    finalize,
    join_resumed,
    open_encoder,
    open_output,
    output_format,
    output_geometry,
    partial_format,
    partial_options,
    partial_path,
    resume_plan,
    resume_point,
)
from .pipeline import run_pipeline
from .probe import VideoInfo, is_live, open_input, probe, probe_container

__all__ = [
    "CONTAINERS",
    "TranscodeOptions",
    "TranscodeResult",
    "output_geometry",
    "partial_path",
    "resume_point",
    "transcode",
]


@dataclass
class TranscodeOptions:
    """Encoder and stream choices; None means "follow the source" or the encoder's default."""

    codec: str | None = None
    crf: int | None = None
    preset: str | None = None
    pix_fmt: str | None = None
    encoder_options: dict[str, str] = field(default_factory=dict)
    audio: bool = True
    subtitles: bool = True
    overwrite: bool = False
    depth: int = 4
    start: float = 0.0
    duration: float | None = None
    resume: bool = False
    size: tuple[int | None, int | None] | None = None


@dataclass
class TranscodeResult:
    frames: int
    seconds: float
    output: Path
    output_bytes: int
    bad_spans: list[str] = field(default_factory=list)
    stopped: bool = False
    resumed_from: float | None = None

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


Progress = Callable[[int, VideoInfo, float], None]


def transcode(
    src: str | Path,
    dst: str | Path,
    upscaler: Any,
    opts: TranscodeOptions | None = None,
    *,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> TranscodeResult:
    """Upscale every frame of `src` into `dst`; returns counts and timings. Raises VideoError on bad input.

    `src` may be "-" (stdin) or a URL: it is then opened once and read straight through (no seeking, so
    no --start or --resume), and the output file is finished when the input ends."""
    live = isinstance(src, str) and is_live(src)
    src, dst = (src if live else Path(src)), Path(dst)
    opts = opts or TranscodeOptions()
    check_output_path(src, dst, opts.overwrite)
    fmt = output_format(dst)
    if opts.start < 0 or (opts.duration is not None and opts.duration <= 0):
        raise VideoError("--start must be >= 0 and --duration > 0")
    if live:
        if opts.start or opts.resume:
            raise VideoError(f"{src}: --start and --resume need a seekable input file, not a pipe or URL")
        if partial_path(dst).exists() and not opts.overwrite:
            raise VideoError(f"{partial_path(dst)}: a partial output exists; use --overwrite to restart")
        live_input = open_input(src)
        try:
            info = probe_container(live_input, src, seekable=False)
        except BaseException:
            live_input.close()
            raise
        return _transcode_open(live_input, src, dst, fmt, info, upscaler, opts, progress, stop)
    src = Path(src)
    info = probe(src)
    if info.duration is not None and opts.start >= info.duration:
        raise VideoError(f"{src}: --start {opts.start:g} s is beyond the end ({info.duration:.2f} s)")
    if (opts.start or opts.duration) and info.average_rate and info.duration:
        left = (info.duration or 0) - opts.start
        span = min(left, opts.duration) if opts.duration else left
        info = replace(info, frames=max(1, round(span * float(info.average_rate))), frames_estimated=True)
    tmp = partial_path(dst)
    if tmp.exists() and not (opts.resume or opts.overwrite):
        raise VideoError(f"{tmp}: a partial output exists; use --resume to continue it or --overwrite to restart")
    resume = None  # (keyframe time in the partial file's timeline, same instant in the source, frames kept)
    previous = dst.with_name(dst.name + ".previous")
    if opts.resume and tmp.exists():
        if opts.start or opts.duration:
            raise VideoError("--resume cannot be combined with --start/--duration")
        if fmt not in RESUMABLE:
            raise VideoError(f"{dst}: --resume works with .mkv/.webm/.mp4/.mov outputs")
        resume = resume_plan(tmp, src)
        if resume is not None:
            tmp.replace(previous)
            info = replace(info, frames=max(info.frames - resume[2], 1), frames_estimated=info.frames_estimated)
    return _transcode_open(open_input(src), src, dst, fmt, info, upscaler, opts, progress, stop, resume)


def _transcode_open(
    inp: av.container.InputContainer,
    src: Path | str,
    dst: Path,
    fmt: str,
    info: VideoInfo,
    upscaler: Any,
    opts: TranscodeOptions,
    progress: Progress | None,
    stop: threading.Event | None,
    resume: tuple[float, float, int] | None = None,
) -> TranscodeResult:
    """The transcode proper, from an input already open (a pipe or URL can be opened only once)."""
    tmp = partial_path(dst)
    previous = dst.with_name(dst.name + ".previous")
    bad_spans: list[str] = []
    t0 = time.perf_counter()
    stopped = False
    with inp:
        ivs = inp.streams.video[0]
        ivs.thread_type = "AUTO"
        # every packet reaches the disk at once, so a killed run loses at most the GOP in progress; MP4/MOV are
        # written as Matroska until finalize (see REMUXED)
        subtitles = opts.subtitles and any(s.type == "subtitle" for s in inp.streams)
        # MP4/MOV subtitles (mov_text) cannot go into the Matroska partial: finalize copies them from the source
        held = subtitles and fmt in REMUXED and isinstance(src, Path)
        partial_fmt = partial_format(fmt, subtitles and not held)
        out = open_output(tmp, dst, partial_fmt, partial_options())
        try:
            ovs = open_encoder(out, info, upscaler.scale, opts, fmt)
            sink = FrameSink(out, ovs, info.colour, upscaler.scale, cast(Fraction, ivs.time_base))
            copies = add_copied_streams(inp, out, dst, audio=opts.audio, subtitles=opts.subtitles and not held)
            copy_metadata(inp, out, chapters=opts.start == 0 and opts.duration is None)
            # a resumed run re-encodes video from the cut but copies audio/subtitles whole, so the muxer
            # lays them out exactly as in the uninterrupted run
            start, shift, trim_others = (resume[1], False, False) if resume else (opts.start, True, True)
            end = start + opts.duration if opts.duration else None
            window = (start, end, shift, trim_others)
            frames = _run(inp, ivs, sink, copies, info, upscaler, opts, window, progress, stop, bad_spans)
            sink.flush()
        except BaseException:
            out.close()
            stopped = stop is not None and stop.is_set()
            if not stopped:
                tmp.unlink(missing_ok=True)
                if previous.exists():  # a failed resume gives the old partial file back
                    previous.replace(tmp)
            raise
        out.close()
    stopped = stop is not None and stop.is_set()
    if resume is not None:  # one file again: kept GOPs + source packets before the cut + the new part
        join_resumed(previous, tmp, resume, partial_fmt)
        frames += resume[2]
    if frames == 0 and not stopped:
        tmp.unlink(missing_ok=True)
        raise VideoError(f"{src}: no video frame could be decoded")
    if not stopped:
        finalize(tmp, dst, fmt, remux=partial_fmt != fmt, subtitles_from=(Path(src), window) if held else None)
    final = tmp if stopped else dst
    # stopped before a packet was written: some muxers (MP4) never create the file; nothing to keep then
    size = final.stat().st_size if final.exists() else 0
    return TranscodeResult(
        frames, time.perf_counter() - t0, final, size, bad_spans, stopped, resume[1] if resume else None
    )


def _spans(corrupt: list[tuple[int, float]]) -> list[str]:
    """Merge consecutive corrupt frame numbers into readable spans."""
    groups: list[list[tuple[int, float]]] = []
    for item in corrupt:
        if groups and item[0] == groups[-1][-1][0] + 1:
            groups[-1].append(item)
        else:
            groups.append([item])
    spans = []
    for g in groups:
        (i0, t0), (i1, t1) = g[0], g[-1]
        frames = f"frame {i0}" if i0 == i1 else f"frames {i0}-{i1}"
        spans.append(f"{frames} ({t0:.3f}-{t1:.3f} s) had decoding errors (concealed by the decoder)")
    return spans


def _run(
    inp: av.container.InputContainer,
    ivs: av.video.stream.VideoStream,
    sink: FrameSink,
    copies: dict[int, av.stream.Stream],
    info: VideoInfo,
    upscaler: Any,
    opts: TranscodeOptions,
    window: tuple[float, float | None, bool, bool],
    progress: Progress | None,
    stop: threading.Event | None,
    bad_spans: list[str],
) -> int:
    """Demux and decode (thread) -> upscale (here) -> encode and mux (thread); copied packets ride along in
    demux order. Returns the number of frames encoded."""
    colour = info.colour
    tb = ivs.time_base
    started = time.perf_counter()

    corrupt: list[tuple[int, float]] = []

    start_s, end_s, shift, trim_others = window
    trimming = start_s > 0 or end_s is not None
    shifts = {i: round(start_s / inp.streams[i].time_base) if shift else 0 for i in [ivs.index, *copies]}
    if start_s > 0 and trim_others:
        inp.seek(round(start_s / tb), stream=ivs, backward=True)

    def produce() -> Iterator[tuple]:
        count = 0
        for packet in inp.demux(ivs, *(inp.streams[i] for i in copies)):
            index = packet.stream.index
            if index != ivs.index:
                if packet.dts is None or packet.pts is None:
                    continue
                t = float(packet.pts * packet.stream.time_base)
                if trimming and trim_others and (t < start_s - 1e-6 or (end_s is not None and t >= end_s)):
                    continue
                packet.pts -= shifts[index]
                packet.dts -= shifts[index]
                yield ("packet", packet)
                continue
            try:
                decoded = packet.decode()
            except av.error.FFmpegError as exc:
                where = f"{float(packet.pts * tb):.3f} s" if packet.pts is not None else f"after frame {count}"
                bad_spans.append(f"undecodable data at {where} ({exc.strerror or type(exc).__name__})")
                continue
            for frame in cast(list[av.VideoFrame], decoded):
                pts = frame.pts if frame.pts is not None else count
                t = float(pts * tb)
                if trimming and t < start_s - 1e-6:
                    continue
                if end_s is not None and t >= end_s:
                    bad_spans.extend(_spans(corrupt))
                    return
                if frame.is_corrupt:
                    corrupt.append((count, t))
                count += 1
                yield ("frame", pts - shifts[ivs.index], frame_to_rgb(frame, colour))
        bad_spans.extend(_spans(corrupt))

    def transform(item: tuple) -> tuple:
        if item[0] == "frame":
            return ("frame", item[1], upscaler(item[2]))
        return item

    copy = PacketCopy()

    def consume(item: tuple) -> None:
        if item[0] == "packet":
            packet = item[1]
            copy.mux(sink.out, packet, copies[packet.stream.index])
            return
        sink.write(item[2], item[1])
        if progress is not None:
            progress(sink.frames, info, time.perf_counter() - started)

    run_pipeline(produce(), transform, consume, depth=opts.depth, stop=stop)
    return sink.frames
