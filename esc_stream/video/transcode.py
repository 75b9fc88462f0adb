"""Transcode a file: decode ∥ upscale ∥ encode, keeping audio, subtitles, timestamps, colour and metadata.

Video frames keep their source pts (variable frame rate stays variable); audio and subtitle packets are
copied untouched, passing through the pipeline in demux order so the output interleaves naturally. The
output is written to `OUT.partial` and renamed when complete.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, cast

import av
import numpy as np

from ..engine.pipeline import run_pipeline
from .colour import Colour, frame_to_rgb, pixel_bits, rgb_to_frame, target_size
from .probe import VideoError, VideoInfo, is_live, open_input, probe, probe_container

# output container by file extension (the .partial name hides it from FFmpeg's own guess)
CONTAINERS = {
    ".mp4": "mp4",
    ".m4v": "mp4",
    ".mov": "mov",
    ".mkv": "matroska",
    ".webm": "webm",
    ".ts": "mpegts",
    ".m2ts": "mpegts",
    ".avi": "avi",
    ".nut": "nut",
    ".y4m": "yuv4mpegpipe",
}
RESUMABLE = {"matroska", "webm"}
DEFAULT_CODEC = {"webm": "libvpx-vp9", "avi": "mpeg4", "nut": "ffv1", "yuv4mpegpipe": "rawvideo"}


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


def partial_path(dst: Path) -> Path:
    return dst.with_name(dst.name + ".partial")


def output_format(dst: Path) -> str:
    fmt = CONTAINERS.get(dst.suffix.lower())
    if fmt is None:
        known = " ".join(sorted(CONTAINERS))
        raise VideoError(f"{dst}: unknown output container {dst.suffix or '(no extension)'!r}; use one of: {known}")
    return fmt


def default_pix_fmt(info: VideoInfo, codec: str) -> str:
    """Follow the source: same chroma subsampling, 8-bit stays 8-bit, deeper becomes 10-bit."""
    codec_formats = [f.name for f in (av.codec.Codec(codec, "w").video_formats or [])]
    src = info.pix_fmt
    sub = "444" if "444" in src else "422" if "422" in src else "420"
    want = f"yuv{sub}p" + ("10le" if info.colour.deep else "")
    for candidate in (want, f"yuv420p{'10le' if info.colour.deep else ''}", "yuv420p"):
        if not codec_formats or candidate in codec_formats:
            return candidate
    return codec_formats[0]


def _check_paths(src: Path | str, dst: Path, overwrite: bool) -> None:
    if isinstance(src, Path) and src.resolve() == dst.resolve():
        raise VideoError(f"{dst}: output would overwrite the input")
    if not dst.parent.exists():
        raise VideoError(f"{dst}: folder {dst.parent} does not exist")
    if dst.exists() and not overwrite:
        raise VideoError(f"{dst}: already exists (use --overwrite to replace it)")


def output_geometry(info: VideoInfo, scale: int, opts: TranscodeOptions) -> tuple[int, int, Fraction | None]:
    """(width, height, sample aspect) of the output: the model's scale, or the requested size."""
    if opts.size:
        try:
            return target_size(info.width, info.height, info.sar, opts.size)
        except ValueError as exc:
            raise VideoError(f"--size: {exc}") from None
    return info.width * scale, info.height * scale, info.sar


def _open_encoder(
    out: av.container.OutputContainer, info: VideoInfo, scale: int, opts: TranscodeOptions, fmt: str
) -> av.video.stream.VideoStream:
    codec = opts.codec or DEFAULT_CODEC.get(fmt, "libx264")
    if codec not in av.codecs_available:
        raise VideoError(f"-c:v {codec}: no such encoder in this FFmpeg build")
    pix_fmt = opts.pix_fmt or default_pix_fmt(info, codec)
    width, height, sar = output_geometry(info, scale, opts)
    if ("420" in pix_fmt or "422" in pix_fmt) and (width % 2 or (height % 2 and "420" in pix_fmt)):
        raise VideoError(f"output {width}x{height} has an odd side, which {pix_fmt} cannot hold; use --pix-fmt yuv444p")
    rate = info.average_rate if info.average_rate else Fraction(25)
    stream = cast(av.video.stream.VideoStream, out.add_stream(codec, rate=rate))
    stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
    if info.rotation:  # display metadata only: frames are upscaled as coded and shown rotated, as the source
        stream.set_display_rotation(info.rotation)
    stream.time_base = info.time_base
    cc = stream.codec_context
    cc.time_base = info.time_base
    c = info.colour
    cc.color_range = c.range if c.range else 1
    cc.colorspace, cc.color_primaries, cc.color_trc = c.matrix, c.primaries, c.transfer
    if sar and sar.numerator:
        cc.sample_aspect_ratio = sar
    options = dict(opts.encoder_options)
    if codec in ("libx264", "libx265"):
        options.setdefault("crf", str(opts.crf if opts.crf is not None else 18))
        options.setdefault("preset", opts.preset or "medium")
    elif codec in ("libvpx-vp9", "libsvtav1", "libaom-av1"):
        options.setdefault("crf", str(opts.crf if opts.crf is not None else 30))
        if codec == "libvpx-vp9":
            options.setdefault("b", "0")
        if opts.preset and codec == "libsvtav1":
            options.setdefault("preset", opts.preset)
    cc.options = options
    try:
        cc.open()
    except (av.error.FFmpegError, ValueError) as exc:
        raise VideoError(
            f"encoder {codec} refused {width}x{height} {pix_fmt} ({getattr(exc, 'strerror', None) or exc})"
        ) from None
    return stream


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
    _check_paths(src, dst, opts.overwrite)
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
            raise VideoError(f"{dst}: --resume works with .mkv/.webm outputs for now (MP4 muxers move track starts)")
        resume = _resume_plan(tmp, src)
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
        # every packet reaches the disk at once, so a killed Matroska run loses at most the GOP in progress
        out = av.open(str(tmp), mode="w", format=fmt, options={"flush_packets": "1"})
        try:
            ovs = _open_encoder(out, info, upscaler.scale, opts, fmt)
            copies = _add_copied_streams(inp, out, opts, dst)
            _copy_metadata(inp, out, chapters=opts.start == 0 and opts.duration is None)
            # a resumed run re-encodes video from the cut but copies audio/subtitles whole, so the muxer
            # lays them out exactly as in the uninterrupted run
            start, shift, trim_others = (resume[1], False, False) if resume else (opts.start, True, True)
            end = start + opts.duration if opts.duration else None
            window = (start, end, shift, trim_others)
            frames = _run(inp, out, ivs, ovs, copies, info, upscaler, opts, window, progress, stop, bad_spans)
            for packet in ovs.encode(None):
                out.mux(packet)
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
        _join(previous, tmp, resume, fmt)
        frames += resume[2]
    if frames == 0 and not stopped:
        tmp.unlink(missing_ok=True)
        raise VideoError(f"{src}: no video frame could be decoded")
    if not stopped:
        _finalize(tmp, dst, fmt)
    final = tmp if stopped else dst
    # stopped before a packet was written: some muxers (MP4) never create the file; nothing to keep then
    size = final.stat().st_size if final.exists() else 0
    return TranscodeResult(
        frames, time.perf_counter() - t0, final, size, bad_spans, stopped, resume[1] if resume else None
    )


def _copy_metadata(inp: av.container.InputContainer, out: av.container.OutputContainer, chapters: bool) -> None:
    for k, v in inp.metadata.items():
        if k.lower() not in ("encoder", "major_brand", "minor_version", "compatible_brands"):
            out.metadata[k] = v
    if chapters and inp.chapters():
        out.set_chapters(inp.chapters())


def resume_point(partial: Path) -> float | None:
    """Seconds of the last keyframe in a partial output: everything before it is complete GOPs.

    None when the file is unreadable or holds fewer than two keyframes (nothing worth keeping).
    """
    plan = _keyframes(partial)
    return plan[-1][0] if plan and len(plan) >= 2 else None


def _keyframes(partial: Path) -> list[tuple[float, int]] | None:
    """(time, packets before it) for each keyframe of the partial file's video, in decode order."""
    try:
        with av.open(str(partial)) as c:
            vs = c.streams.video[0]
            keys, count = [], 0
            for p in c.demux(vs):
                if p.size == 0 or p.pts is None:
                    continue
                if p.is_keyframe:
                    keys.append((float(p.pts * vs.time_base), count))
                count += 1
            return keys
    except (av.error.FFmpegError, IndexError, OSError):
        return None


def _resume_plan(partial: Path, src: Path) -> tuple[float, float, int] | None:
    """Where to continue: the last keyframe of `partial` (its time there, the same frame's source time, and
    the number of frames before it). Frames are matched by count, so container timestamp offsets cancel out."""
    keys = _keyframes(partial)
    if not keys or len(keys) < 2:
        return None
    cut, kept = keys[-1]
    with open_input(src) as c:
        vs = c.streams.video[0]
        tb = vs.time_base
        pts = sorted(p.pts for p in c.demux(vs) if p.size and p.pts is not None)
    if kept >= len(pts) or tb is None:
        return None
    return cut, float(pts[kept] * tb), kept


def _join(previous: Path, part: Path, resume: tuple[float, float, int], fmt: str) -> None:
    """Rewrite `part` as the video GOPs of `previous` before the cut followed by all of `part`; copies packets.

    `part` holds the audio and subtitles whole and the video from the cut on. Muxers may move where a
    track starts (MP4 stretches a late first sample), so the video of `part` is put back on the timeline of
    `previous` by aligning its first keyframe with the cut."""
    cut = resume[0]
    staged = part.with_name(part.name + ".join")
    with av.open(str(part)) as probe_part:  # a fresh handle: seeking back would skip packets before the cut
        pvs = probe_part.streams.video[0]
        first_key = next((p.pts for p in probe_part.demux(pvs) if p.is_keyframe and p.pts is not None), None)
        if first_key is None or pvs.time_base is None:
            raise VideoError(f"{part}: the resumed part holds no keyframe")
        shift = round((cut - float(first_key * pvs.time_base)) / pvs.time_base)
    with av.open(str(previous)) as old, av.open(str(part)) as new:
        nvs, ovs = new.streams.video[0], old.streams.video[0]
        with av.open(str(staged), "w", format=fmt) as out:
            streams = {s.index: out.add_stream_from_template(s) for s in new.streams}
            for s in new.streams:
                for k, v in s.metadata.items():
                    streams[s.index].metadata[k] = v
            _copy_metadata(new, out, chapters=True)

            def head() -> Iterator[tuple[float, int, av.Packet]]:
                for p in old.demux(ovs):
                    if p.size and p.pts is not None and p.dts is not None and float(p.pts * ovs.time_base) < cut - 1e-6:
                        p.stream = streams[nvs.index]  # type: ignore[assignment]
                        yield float(p.dts * ovs.time_base), id(p), p

            def tail() -> Iterator[tuple[float, int, av.Packet]]:
                for p in new.demux():
                    if p.size == 0 or p.dts is None or p.pts is None:
                        continue
                    if p.stream.index == nvs.index:
                        p.pts += shift
                        p.dts += shift
                    t = float(p.dts * p.stream.time_base)
                    p.stream = streams[p.stream.index]
                    yield t, id(p), p

            for _, _, packet in heapq.merge(head(), tail()):
                out.mux(packet)
    staged.replace(part)
    previous.unlink()


def _finalize(tmp: Path, dst: Path, fmt: str) -> None:
    """Move the finished partial file into place."""
    tmp.replace(dst)


def _add_copied_streams(
    inp: av.container.InputContainer, out: av.container.OutputContainer, opts: TranscodeOptions, dst: Path
) -> dict[int, av.stream.Stream]:
    copies: dict[int, av.stream.Stream] = {}
    for s in inp.streams:
        if s.type == "audio" and opts.audio or s.type == "subtitle" and opts.subtitles:
            try:
                o = out.add_stream_from_template(s)
            except (av.error.FFmpegError, ValueError) as exc:
                flag = "--no-audio" if s.type == "audio" else "--no-subtitles"
                raise VideoError(
                    f"{dst}: this container cannot carry the {s.type} stream #{s.index} "
                    f"({s.codec_context.name}): use {flag} or another container such as .mkv ({exc})"
                ) from None
            for k, v in s.metadata.items():
                o.metadata[k] = v
            copies[s.index] = o
    return copies


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
    out: av.container.OutputContainer,
    ivs: av.video.stream.VideoStream,
    ovs: av.video.stream.VideoStream,
    copies: dict[int, av.stream.Stream],
    info: VideoInfo,
    upscaler: Any,
    opts: TranscodeOptions,
    window: tuple[float, float | None, bool, bool],
    progress: Progress | None,
    stop: threading.Event | None,
    bad_spans: list[str],
) -> int:
    colour: Colour = info.colour
    pix_fmt = ovs.codec_context.pix_fmt or "yuv420p"
    size = (ovs.codec_context.width, ovs.codec_context.height)
    out_colour = Colour(colour.matrix, colour.primaries, colour.transfer, colour.range,
                        pixel_bits(pix_fmt), colour.height * upscaler.scale)  # fmt: skip
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

    last_pts: int | None = None
    last_dts: dict[int, int] = {}
    done = 0

    def consume(item: tuple) -> None:
        nonlocal last_pts, done
        if item[0] == "packet":
            packet = item[1]
            index = packet.stream.index
            if index in last_dts and packet.dts <= last_dts[index]:  # repair non-increasing DTS, do not crash
                shift = last_dts[index] + 1 - packet.dts
                packet.dts += shift
                if packet.pts is not None and packet.pts < packet.dts:
                    packet.pts = packet.dts
            last_dts[index] = packet.dts
            packet.stream = copies[index]
            out.mux(packet)
            return
        _, pts, rgb = item
        if last_pts is not None and pts <= last_pts:  # duplicate timestamps would stop the encoder
            pts = last_pts + 1
        last_pts = pts
        frame = rgb_to_frame(np.asarray(rgb), pix_fmt, out_colour, size)
        frame.pts, frame.time_base = pts, tb
        for packet in ovs.encode(frame):
            out.mux(packet)
        done += 1
        if progress is not None:
            progress(done, info, time.perf_counter() - started)

    run_pipeline(produce(), transform, consume, depth=opts.depth, stop=stop)
    return done
