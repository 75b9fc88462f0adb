"""Segmented transcode: split the source at keyframes, upscale each segment on its own, join losslessly.

Why segments: from a keyframe on, a decoder needs nothing earlier, so the frames with pts in
[keyframe k, keyframe k+1) are an independent piece of work. Each segment task is an ordinary pipeline run
(decode ∥ upscale ∥ encode, bounded queues) with the final encoder settings, written to a NUT file (NUT
keeps any time base) in a work folder next to the output, followed by a JSON marker holding the encoder's
own pts/dts for every packet. The join copies those packets, unchanged, into the final container, puts
back the exact timestamps, and muxes audio/subtitles once from the source. A segment whose marker exists
is never redone, so running the same command again resumes.

Nothing here imports Ray: `run_segmented` takes a runner, and `local_runner` does the segments in turn.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import itertools
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, cast

import av
import numpy as np

from ..errors import VideoError
from ..video.colour import frame_to_rgb
from ..video.encode import (
    FrameSink,
    PacketCopy,
    add_copied_streams,
    check_output_path,
    choose_codec,
    copy_metadata,
    finalize,
    open_encoder,
    output_format,
    partial_path,
)
from ..video.pipeline import run_pipeline
from ..video.probe import VideoInfo, open_input, probe
from ..video.transcode import TranscodeOptions

# final containers a join can write: all take global codec headers, like the NUT segments
JOINABLE = {"matroska": ".mkv", "webm": ".webm", "mp4": ".mp4", "mov": ".mov", "nut": ".nut"}
SEGMENT_FORMAT = "nut"
DEFAULT_SEGMENT_SECONDS = 30.0


@dataclass(frozen=True)
class ModelSpec:
    """What a task needs to build its own upscaler; small and picklable (weights travel as a path)."""

    weights: str | None = None
    scale: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    tile: int | None = None
    overlap: int = 64
    backend: str = "torch"
    model: str | None = None  # the embedded tier when `weights` is None

    def load(self) -> Any:
        """The upscaler, built once per process: a worker running many tasks loads the model once."""
        up = _UPSCALERS.get(self)
        if up is None:
            import torch

            from ..upscaler import load

            up = load(self.weights, scale=self.scale, model=self.model, device=self.device,
                      dtype=getattr(torch, self.dtype), tile=self.tile, overlap=self.overlap,
                      backend=self.backend)  # fmt: skip
            _UPSCALERS[self] = up
        return up

    def fingerprint(self) -> dict[str, Any]:
        """Settings plus the weights file's size and mtime: a changed checkpoint invalidates old segments."""
        out: dict[str, Any] = asdict(self)
        out.pop("device")  # the device does not change the output enough to matter for resuming
        if self.weights:
            st = Path(self.weights).stat()
            out["weights_stat"] = [st.st_size, st.st_mtime_ns]
        return out


_UPSCALERS: dict[ModelSpec, Any] = {}


@dataclass(frozen=True)
class Segment:
    """Source frames with pts in [start, end) (source time base); None means open on that side."""

    index: int
    start: int | None
    end: int | None

    def holds(self, pts: int) -> bool:
        return (self.start is None or pts >= self.start) and (self.end is None or pts < self.end)


@dataclass
class Job:
    """Everything a segment task needs; picklable, sent once per task."""

    src: str
    work: str
    info: VideoInfo
    opts: TranscodeOptions
    model: ModelSpec
    fmt: str
    scale: int
    depth: int = 4

    def segment_path(self, seg: Segment) -> Path:
        return Path(self.work) / f"seg_{seg.index:05d}.{SEGMENT_FORMAT}"

    def marker_path(self, seg: Segment) -> Path:
        return Path(self.work) / f"seg_{seg.index:05d}.json"


@dataclass
class SegmentedResult:
    frames: int
    seconds: float
    output: Path
    output_bytes: int
    segments: int
    reused: int
    plan_seconds: float
    encode_seconds: float
    join_seconds: float
    bad_spans: list[str] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


# (segment, marker) after each finished segment, for progress lines
SegmentDone = Callable[[Segment, dict[str, Any]], None]
# runs the pending segments of a job; returns (segment, one-line reason) for each that failed
Runner = Callable[[Job, list[Segment], SegmentDone], list[tuple[Segment, str]]]


def work_dir(dst: Path) -> Path:
    """Where segments of `dst` are kept until the join succeeds (next to the output, same filesystem)."""
    return dst.with_name(dst.name + ".segments")


def keyframes(src: str | Path) -> tuple[list[int], Fraction]:
    """Presentation timestamps of the video keyframes (demux only, nothing decoded) and their time base."""
    with open_input(src) as c:
        vs = c.streams.video[0]
        if vs.time_base is None:
            raise VideoError(f"{src}: the video stream has no time base; it cannot be split into segments")
        keys = sorted({p.pts for p in c.demux(vs) if p.is_keyframe and p.size and p.pts is not None})
        return keys, Fraction(vs.time_base.numerator, vs.time_base.denominator)


def plan_segments(keys: list[int], time_base: Fraction, seconds: float) -> list[Segment]:
    """Cut at keyframes so that every segment but the last lasts at least `seconds`.

    Segment 0 starts at the very beginning (frames before the first keyframe included, as a straight run
    decodes them) and the last one runs to the end, so every source frame belongs to exactly one segment."""
    bounds: list[int] = []
    for k in keys[1:]:
        ref = bounds[-1] if bounds else keys[0]
        if float((k - ref) * time_base) >= seconds - 1e-9:
            bounds.append(k)
    edges: list[int | None] = [None, *bounds, None]
    return [Segment(i, edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Written under a temporary name and renamed: a marker either exists whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def read_marker(job: Job, seg: Segment) -> dict[str, Any] | None:
    """The marker of a finished segment, or None when the segment has to be (re)done."""
    marker, data = job.marker_path(seg), job.segment_path(seg)
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not data.is_file() or data.stat().st_size != done.get("bytes") or done.get("index") != seg.index:
        return None
    return done


def encode_segment(job: Job, seg: Segment) -> dict[str, Any]:
    """Upscale the frames of `seg` into its NUT file and write its marker; returns the marker.

    The decoder starts at the keyframe that opens the segment and runs on past its end up to the next
    keyframe after the end, so that open-GOP frames shown before the end but coded after it are complete;
    only frames whose pts lie in the segment are kept."""
    t0 = time.perf_counter()
    up = job.model.load()
    info = job.info
    path = job.segment_path(seg)
    tmp = path.with_name(path.name + ".partial")
    bad: list[str] = []
    with open_input(job.src) as inp:
        ivs = inp.streams.video[0]
        ivs.thread_type = "AUTO"
        if seg.start is not None:
            try:
                inp.seek(seg.start, stream=ivs, backward=True)
            except av.error.FFmpegError:  # unseekable: decode from the start; frames are chosen by pts anyway
                pass
        out = av.open(str(tmp), mode="w", format=SEGMENT_FORMAT)
        try:
            ovs = open_encoder(out, info, up.scale, job.opts, job.fmt)
            sink = _RecordingSink(out, ovs, info.colour, up.scale, cast(Fraction, ivs.time_base))
            frames = _encode_frames(job, seg, inp, ivs, sink, up, bad)
            sink.flush()
            records = sink.records
        except BaseException:
            out.close()
            tmp.unlink(missing_ok=True)
            raise
        out.close()
    tmp.replace(path)
    marker = {
        "index": seg.index,
        "start": seg.start,
        "end": seg.end,
        "frames": frames,
        "time_base": str(info.time_base),
        "packets": records,
        "bytes": path.stat().st_size,
        "bad_spans": bad,
        "seconds": time.perf_counter() - t0,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    _write_json(job.marker_path(seg), marker)
    return marker


class _RecordingSink(FrameSink):
    """Keeps the encoder's own pts, dts and duration of every packet: the join restores them exactly, whatever
    NUT does with them."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.records: list[list[int]] = []  # [pts, dts, duration] of every packet, in muxing order

    def mux(self, packets: Iterable[av.Packet]) -> None:
        for packet in packets:
            pts = packet.pts if packet.pts is not None else packet.dts
            dts = packet.dts if packet.dts is not None else pts
            if pts is None or dts is None:
                raise VideoError("the encoder gave a packet without timestamps; segments cannot be joined")
            self.records.append([int(pts), int(dts), int(packet.duration or 0)])
            self.out.mux(packet)


def _encode_frames(
    job: Job,
    seg: Segment,
    inp: av.container.InputContainer,
    ivs: av.video.stream.VideoStream,
    sink: FrameSink,
    up: Any,
    bad: list[str],
) -> int:
    """Decode from the segment's keyframe (thread) -> upscale (here) -> encode (thread) the frames of `seg`."""
    colour = job.info.colour
    tb = ivs.time_base

    def frames_of(decoded: list[Any]) -> Iterator[tuple[int, np.ndarray]]:
        for frame in cast(list[av.VideoFrame], decoded):
            if frame.pts is None:
                raise VideoError(f"{job.src}: frames without timestamps cannot be split into segments; "
                                 "run without --ray")  # fmt: skip
            if seg.holds(frame.pts):
                if frame.is_corrupt:
                    bad.append(f"{float(frame.pts * tb):.3f} s had decoding errors (concealed by the decoder)")
                yield frame.pts, frame_to_rgb(frame, colour)

    def produce() -> Iterator[tuple[int, np.ndarray]]:
        for packet in inp.demux(ivs):
            if seg.end is not None and packet.is_keyframe and packet.pts is not None and packet.pts > seg.end:
                break
            try:
                decoded = packet.decode()
            except av.error.FFmpegError as exc:
                where = f"{float(packet.pts * tb):.3f} s" if packet.pts is not None else "an unknown time"
                bad.append(f"undecodable data at {where} ({exc.strerror or type(exc).__name__})")
                continue
            yield from frames_of(decoded)
        else:
            return
        yield from frames_of(ivs.codec_context.decode(None))  # stopped early: drain the decoder

    # as a straight run does: a repeated pts becomes the previous one + 1 (duplicates would stop the encoder)
    run_pipeline(produce(), lambda item: (item[0], up(item[1])), lambda item: sink.write(item[1], item[0]),
                 depth=job.depth)  # fmt: skip
    return sink.frames


def join_segments(job: Job, segments: list[Segment], markers: dict[int, dict[str, Any]], tmp: Path, dst: Path) -> int:
    """Copy the segments' packets into `tmp` (the final container) with the source's audio/subtitles.

    Packets are not re-encoded. Each segment's encoder started afresh, so its first packets carry decode
    timestamps from before the segment's first frame, which would collide with the end of the previous
    segment; those few decode timestamps are replaced by the latest presentation times already written,
    which keeps dts increasing and never above pts (exactly what one long encode would have produced)."""
    used = [s for s in segments if markers[s.index]["packets"]]
    if not used:
        raise VideoError(f"{job.src}: no video frame could be decoded")
    tb = job.info.time_base
    with open_input(job.src) as inp:
        out = av.open(str(tmp), mode="w", format=job.fmt)
        try:
            # the video stream is declared exactly as a straight run declares it (rate, colour, aspect, rotation);
            # its encoder only supplies the codec headers, which must be those every segment was encoded with
            ovs = open_encoder(out, job.info, job.scale, job.opts, job.fmt)
            extradata = ovs.codec_context.extradata
            copies = add_copied_streams(inp, out, dst, audio=job.opts.audio, subtitles=job.opts.subtitles)
            copy_metadata(inp, out, chapters=True)
            order = itertools.count()

            def video() -> Iterator[tuple[float, int, av.Packet]]:
                recent: list[int] = []  # the latest presentation times written
                last_dts: int | None = None
                for seg in used:
                    for packet, (pts, dts, duration) in _segment_packets(job, seg, markers[seg.index], extradata):
                        if last_dts is not None and dts <= last_dts:
                            dts = _lead_dts(recent, last_dts, pts, seg)
                        packet.pts, packet.dts, packet.duration = pts, dts, duration
                        packet.time_base = tb
                        packet.stream = ovs  # type: ignore[assignment]
                        last_dts = dts
                        recent = sorted([*recent, pts])[-64:]
                        yield float(dts * tb), next(order), packet

            def others() -> Iterator[tuple[float, int, av.Packet]]:
                if not copies:  # demux() without streams would read every stream
                    return
                copy = PacketCopy()  # repairs non-increasing DTS as transcode does
                for packet in inp.demux(*(inp.streams[i] for i in copies)):
                    if packet.dts is None or packet.pts is None:
                        continue
                    index = packet.stream.index
                    copy.repair(packet, index)
                    t = float(packet.dts * packet.stream.time_base)
                    packet.stream = copies[index]
                    yield t, next(order), packet

            for _, _, packet in heapq.merge(video(), others()):
                out.mux(packet)
        except BaseException:
            out.close()
            tmp.unlink(missing_ok=True)
            raise
        out.close()
    return sum(int(markers[s.index]["frames"]) for s in used)


def _lead_dts(recent: list[int], last_dts: int, pts: int, seg: Segment) -> int:
    """The decode time for a packet whose encoder-given dts falls before what was already written."""
    later = [p for p in recent if last_dts < p <= pts]
    if not later:
        raise VideoError(f"segment {seg.index}: its decode timestamps cannot follow the previous segment's")
    return later[0]


def _segment_packets(
    job: Job, seg: Segment, marker: dict[str, Any], extradata: bytes | None
) -> Iterator[tuple[av.Packet, tuple[int, int, int]]]:
    """The packets of one segment file, each with the encoder's (pts, dts, duration) from the marker."""
    path = job.segment_path(seg)
    records = marker["packets"]
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        if vs.codec_context.extradata != extradata:
            raise VideoError(f"{path}: encoded with other codec headers than this run's encoder gives "
                             f"(another FFmpeg build?); remove {job.work} and run again")  # fmt: skip
        n = 0
        for packet in c.demux(vs):
            if not packet.size:
                continue
            if n >= len(records):
                break
            yield packet, (records[n][0], records[n][1], records[n][2])
            n += 1
    if n != len(records):
        raise VideoError(f"{path}: holds {n} packets but its marker lists {len(records)}; "
                         f"remove {job.work} and run again")  # fmt: skip


def local_runner(job: Job, pending: list[Segment], on_done: SegmentDone) -> list[tuple[Segment, str]]:
    """Do the segments one after another in this process (no Ray); the first error stops the run."""
    for seg in pending:
        on_done(seg, encode_segment(job, seg))
    return []


class WorkFolder:
    """OUT.segments/: the plan (source, settings, cut points) and the finished segments.

    A re-run with the same source and settings reuses it; different ones are refused unless `overwrite`,
    which clears it (only files this module writes; anything else there makes it refuse)."""

    PLAN = "plan.json"

    def __init__(self, dst: Path) -> None:
        self.path = work_dir(dst)

    def prepare(self, fingerprint: dict[str, Any], overwrite: bool) -> bool:
        """Create or check the folder; True when it already held segments of this very run."""
        plan = self.path / self.PLAN
        if self.path.exists():
            try:
                same = json.loads(plan.read_text()).get("fingerprint") == fingerprint
            except (OSError, ValueError):
                same = False
            if same and not overwrite:
                return True
            if not overwrite:
                raise VideoError(f"{self.path}: holds segments of another run (other source or settings); "
                                 "use --overwrite to start again")  # fmt: skip
            self.remove()
        self.path.mkdir()
        _write_json(plan, {"fingerprint": fingerprint})
        return False

    def remove(self) -> None:
        if not self.path.exists():
            return
        strangers = [p.name for p in self.path.iterdir() if not _ours(p.name)]
        if strangers:
            raise VideoError(f"{self.path}: holds files esc-video did not write ({strangers[0]}); "
                             "move them away first")  # fmt: skip
        shutil.rmtree(self.path)


def _ours(name: str) -> bool:
    return name == WorkFolder.PLAN or (name.startswith("seg_") and name.endswith((".nut", ".json", ".partial", ".tmp")))


def _fingerprint(src: Path, info: VideoInfo, opts: TranscodeOptions, model: ModelSpec, segs: list[Segment]) -> dict:
    st = src.stat()
    settings = {k: v for k, v in asdict(opts).items() if k not in ("overwrite", "resume", "depth")}
    cuts = hashlib.sha256(json.dumps([[s.start, s.end] for s in segs]).encode()).hexdigest()
    fingerprint = {"source": [str(src.resolve()), st.st_size, st.st_mtime_ns], "settings": settings,
                   "model": model.fingerprint(), "cuts": cuts, "frames": info.frames}  # fmt: skip
    return json.loads(json.dumps(fingerprint))  # as it reads back from plan.json (tuples become lists)


def check_encoder(info: VideoInfo, scale: int, opts: TranscodeOptions, fmt: str) -> None:
    """Open the encoder once here, in memory, so a bad codec/pixel format/size is one line before any task runs."""
    with av.open(io.BytesIO(), mode="w", format=SEGMENT_FORMAT) as probe_out:
        open_encoder(probe_out, info, scale, opts, fmt)


def check_request(
    src: Path, dst: Path, model: ModelSpec, opts: TranscodeOptions | None, segment_seconds: float
) -> tuple[VideoInfo, TranscodeOptions, str, int]:
    """Everything that can be refused before any task starts: paths, container, options, source, weights,
    encoder. Returns the source's description, the options with the codec made explicit, the output
    container and the model's scale."""
    opts = opts or TranscodeOptions()
    check_output_path(src, dst, opts.overwrite)
    fmt = output_format(dst)
    if fmt not in JOINABLE:
        raise VideoError(f"{dst}: segmented runs write {', '.join(sorted(JOINABLE.values()))} outputs")
    if opts.start or opts.duration or opts.resume:
        raise VideoError("--start/--duration/--resume do not apply to segmented runs (a re-run resumes by itself)")
    if segment_seconds <= 0:
        raise VideoError("the segment length must be > 0 seconds")
    info = probe(src)
    opts = replace(opts, codec=choose_codec(info, opts, fmt))
    scale = replace(model, device="cpu").load().scale  # the head may have no GPU; CPU loading checks the weights
    check_encoder(info, scale, opts, fmt)
    return info, opts, fmt, scale


def run_segmented(
    src: str | Path,
    dst: str | Path,
    model: ModelSpec,
    opts: TranscodeOptions | None = None,
    *,
    runner: Runner = local_runner,
    segment_seconds: float = DEFAULT_SEGMENT_SECONDS,
    on_plan: Callable[[VideoInfo, list[Segment], list[dict[str, Any]]], None] | None = None,
    on_done: SegmentDone | None = None,
) -> SegmentedResult:
    """Transcode `src` to `dst` segment by segment with `runner`; raises VideoError on bad input or failure.

    On failure the finished segments stay in OUT.segments/ and the same call later resumes from them."""
    src, dst = Path(src), Path(dst)
    t0 = time.perf_counter()
    info, opts, fmt, scale = check_request(src, dst, model, opts, segment_seconds)
    keys, _ = keyframes(src)
    if not keys:
        raise VideoError(f"{src}: the video has no keyframe; it cannot be split into segments")
    segments = plan_segments(keys, info.time_base, segment_seconds)
    tmp = partial_path(dst)
    folder = WorkFolder(dst)
    if tmp.exists() and not folder.path.exists() and not opts.overwrite:
        raise VideoError(f"{tmp}: a partial output exists; use --overwrite to restart")
    folder.prepare(_fingerprint(src, info, opts, model, segments), opts.overwrite)
    job = Job(str(src), str(folder.path), info, opts, model, fmt, scale, opts.depth)
    markers = {s.index: m for s in segments if (m := read_marker(job, s)) is not None}
    reused = len(markers)
    pending = [s for s in segments if s.index not in markers]
    if on_plan is not None:
        on_plan(info, segments, list(markers.values()))
    t_plan = time.perf_counter() - t0

    def done(seg: Segment, marker: dict[str, Any]) -> None:
        markers[seg.index] = marker
        if on_done is not None:
            on_done(seg, marker)

    failures = runner(job, pending, done) if pending else []
    for seg in pending:  # a task may have finished after its runner gave up on it: trust the disk
        if seg.index not in markers and (m := read_marker(job, seg)) is not None:
            markers[seg.index] = m
    missing = [s for s in segments if s.index not in markers]
    if missing:
        reasons = dict((s.index, why) for s, why in failures)
        first = missing[0]
        raise VideoError(
            f"{len(missing)} of {len(segments)} segments failed (segment {first.index}: "
            f"{reasons.get(first.index, 'not done')}); the {len(markers)} finished ones are kept in {folder.path}, "
            "run the same command again to resume"
        )
    t_enc = time.perf_counter() - t0 - t_plan
    frames = join_segments(job, segments, markers, tmp, dst)
    finalize(tmp, dst, fmt)
    folder.remove()
    t_join = time.perf_counter() - t0 - t_plan - t_enc
    bad = [span for s in segments for span in markers[s.index].get("bad_spans", [])]
    return SegmentedResult(frames, time.perf_counter() - t0, dst, dst.stat().st_size, len(segments), reused,
                           t_plan, t_enc, t_join, bad)  # fmt: skip
