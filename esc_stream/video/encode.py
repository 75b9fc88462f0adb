"""Writing video: the output container and encoder, the frame sink, copied streams, partial files.

Every writer of esc-stream goes through here: `transcode` (files), `stream` (pipes and URLs) and the scale-out
segments. So the choices an output makes live in one place:

- `output_format`: the container, from -f, the URL scheme or the file extension.
- `open_encoder`: the video encoder, declared like the source (rate, time base, colour tags, aspect,
  rotation), with each codec's quality defaults; `output_geometry` says what size it encodes.
- `FrameSink`: upscaled RGB frames in, packets muxed: output colour, increasing pts, rgb_to_frame -> encode ->
  mux, and the final flush. Subclasses watch the packets (`mux`) for latency or timestamp records.
- `PacketCopy`: audio/subtitle packets copied as they are, with non-increasing decode timestamps repaired;
  `add_copied_streams` declares those streams and `copy_metadata` carries tags and chapters over.
- `partial_path`/`finalize`: an output is written as OUT.partial (Matroska for MP4/MOV, see REMUXED) and moved
  (or remuxed) into place once complete; `resume_plan`/`join_resumed` continue a partial file from its last
  complete GOP.
- `choose_codec`/`output_colour`/`metadata_warnings`: each container's full-quality default encoder (10-bit HEVC
  for HDR sources), the colour tags written, and what source metadata (HDR10+, Dolby Vision) cannot be kept.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol, cast

import av
import numpy as np

from ..errors import VideoError
from .colour import HDR_TRANSFERS, Colour, pixel_bits, rgb_to_frame, target_size
from .probe import VideoInfo, is_live, open_input

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
# output container by URL scheme (and for "-"): MPEG-TS is what players and servers take from a pipe or socket
SCHEME_FORMATS = {"tcp": "mpegts", "udp": "mpegts", "srt": "mpegts", "rtp": "rtp_mpegts", "rtmp": "flv",
                  "rtmps": "flv", "http": "mpegts", "https": "mpegts", "pipe": "mpegts", "-": "mpegts"}  # fmt: skip
# containers whose partial file a resumed run continues
RESUMABLE = {"matroska", "webm", "mp4", "mov"}
# MP4/MOV outputs are written as a Matroska partial file (which a killed run leaves readable up to its last
# packet, timestamps exact) and remuxed by `finalize`, packets unchanged. Matroska cannot hold mov_text (nor can
# fragmented MP4: FFmpeg's muxer aborts on a sparse text track), so subtitle streams are copied from the source
# by `finalize` itself; a pipe or URL source, read once, is written as MP4 directly instead (not resumable)
REMUXED = {"mp4", "mov"}
# the encoder a container gets when none is asked for (else libx264)
DEFAULT_CODEC = {"webm": "libvpx-vp9", "nut": "ffv1", "yuv4mpegpipe": "rawvideo"}
# containers that take HEVC: a 10-bit PQ/HLG source is written there as 10-bit HEVC with its HDR10 metadata
HEVC_CONTAINERS = {"mp4", "mov", "matroska", "mpegts"}
# encoders that write HDR10 static metadata (mastering display, content light level) from our options
HDR10_ENCODERS = {"libx265"}
# where the colour tags of an output live: encoders whose bitstream signals matrix and range (H.264/HEVC VUI,
# VP9/AV1 headers), and containers that hold them for any codec (Matroska's Colour element, y4m's range)
TAGGING_CODECS = {"libx264", "libx264rgb", "libx265", "libvpx-vp9", "libaom-av1", "libsvtav1", "librav1e",
                  "h264_nvenc", "hevc_nvenc", "av1_nvenc", "h264_qsv", "hevc_qsv", "h264_vaapi",
                  "hevc_vaapi"}  # fmt: skip
RANGE_CONTAINERS = {"matroska", "webm", "yuv4mpegpipe"}
MATRIX_CONTAINERS = {"matroska", "webm"}
# encoders whose FFmpeg default is a low bitrate (200 kb/s): run at a constant quantiser instead
QUANTISER_CODECS = {"mpeg4", "mpeg2video", "mpeg1video", "msmpeg4v3", "mjpeg"}
MATRIX_CODECS = {"prores_ks", "prores", "prores_aw", "mpeg2video", "dnxhd"}  # their headers carry the matrix


class EncoderChoices(Protocol):
    """What the user chose about the encoder (TranscodeOptions and StreamOptions both say it)."""

    codec: str | None
    crf: int | None
    preset: str | None
    pix_fmt: str | None
    encoder_options: dict[str, str]
    size: tuple[int | None, int | None] | None


def output_format(dst: str | Path, fmt: str | None = None, *, live: bool = False) -> str:
    """The container to write: `fmt` (-f) when given; with `live`, the usual one of a "-" or URL output;
    else the file extension's. VideoError when none fits."""
    if fmt:
        if fmt not in av.formats_available:
            raise VideoError(f"-f {fmt}: no such output format in this FFmpeg build")
        return fmt
    name = str(dst)
    if live and (name == "-" or is_live(name)):
        return SCHEME_FORMATS.get("-" if name == "-" else name.split(":", 1)[0].lower(), "mpegts")
    suffix = Path(name).suffix.lower()
    found = CONTAINERS.get(suffix)
    if found is None:
        known = " ".join(sorted(CONTAINERS))
        hint = "-f FORMAT or " if live else ""
        raise VideoError(f"{dst}: unknown output container {suffix or '(no extension)'!r}; use {hint}one of: {known}")
    return found


def check_output_path(src: Path | str, dst: Path, overwrite: bool) -> None:
    """An output file may not be the input, needs an existing folder, and replaces a file only when asked."""
    if isinstance(src, Path) and src.resolve() == dst.resolve():
        raise VideoError(f"{dst}: output would overwrite the input")
    if not dst.parent.exists():
        raise VideoError(f"{dst}: folder {dst.parent} does not exist")
    if dst.is_dir():
        raise VideoError(f"{dst}: is a folder; give an output file name")
    if not os.access(dst.parent, os.W_OK):
        raise VideoError(f"{dst}: folder {dst.parent} is not writable")
    if dst.exists() and not overwrite:
        raise VideoError(f"{dst}: already exists (use --overwrite to replace it)")


def is_hdr(info: VideoInfo) -> bool:
    """A source deeper than 8 bits with an HDR transfer (PQ or HLG)."""
    return info.colour.deep and info.colour.transfer in HDR_TRANSFERS


def choose_codec(info: VideoInfo, opts: EncoderChoices, fmt: str) -> str:
    """The encoder asked for, else the container's default; a 10-bit PQ/HLG source stays HDR (10-bit HEVC)
    where the container takes HEVC."""
    if opts.codec:
        return opts.codec
    if is_hdr(info) and fmt in HEVC_CONTAINERS and "libx265" in av.codecs_available:
        return "libx265"
    return DEFAULT_CODEC.get(fmt, "libx264")


def metadata_warnings(info: VideoInfo, codec: str) -> list[str]:
    """One line for each kind of source metadata that the output will not carry (empty when all is kept)."""
    lines = []
    if info.dynamic_hdr:
        lines.append(f"{info.path}: {', '.join(info.dynamic_hdr)} cannot be carried over and is dropped "
                     "(the output keeps HDR10 static metadata only)")  # fmt: skip
    if info.hdr is not None and codec not in HDR10_ENCODERS:
        lines.append(f"{info.path}: the HDR10 mastering-display/content-light-level metadata is dropped: {codec} "
                     "cannot write it (use -c:v libx265)")  # fmt: skip
    return lines


def output_colour(info: VideoInfo, codec: str, fmt: str) -> Colour:
    """The colour description the output is converted with and tagged with.

    Whatever the source tags (range, matrix, primaries, transfer, any subset) is kept. An untagged matrix or
    range is written as what was assumed when decoding it (`probe` says which). Where neither the encoder nor
    the container can say the range or matrix (mpeg4 in AVI, FFV1 in NUT), the output is converted to what a
    player assumes of an untagged stream: limited range, and BT.709 for HD or BT.601 for SD (of the output size).
    """
    c = info.colour
    matrix = c.matrix if c.matrix_known else (1 if c.sws_matrix == 1 else 6)  # what the conversion used
    rng = c.range if c.range else 1
    if codec == "mjpeg":  # JPEG's YCbCr: full range, BT.601
        return replace(c, matrix=5, range=2)
    if codec not in TAGGING_CODECS and fmt not in RANGE_CONTAINERS:
        rng = 1
    if codec not in TAGGING_CODECS | MATRIX_CODECS and fmt not in MATRIX_CONTAINERS:
        matrix = 2
    return replace(c, matrix=matrix, range=rng)


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


def check_pix_fmt(codec: str, pix_fmt: str) -> None:
    """VideoError unless `pix_fmt` is a pixel format the encoder `codec` takes (naming those it does)."""
    try:
        av.VideoFormat(pix_fmt)
    except (ValueError, TypeError):
        raise VideoError(f"--pix-fmt {pix_fmt}: no such pixel format (e.g. yuv420p, yuv422p10le, yuv444p)") from None
    formats = [f.name for f in (av.codec.Codec(codec, "w").video_formats or [])]
    if formats and pix_fmt not in formats:
        raise VideoError(f"--pix-fmt {pix_fmt}: {codec} does not take it; it takes {' '.join(formats)}")


def output_geometry(info: VideoInfo, scale: int, opts: EncoderChoices) -> tuple[int, int, Fraction | None]:
    """(width, height, sample aspect) of the output: the model's scale, or the requested size."""
    if opts.size:
        try:
            return target_size(info.width, info.height, info.sar, opts.size)
        except ValueError as exc:
            raise VideoError(f"--size: {exc}") from None
    return info.width * scale, info.height * scale, info.sar


def _x265_params(info: VideoInfo, options: dict[str, str]) -> str:
    """x265-params: the user's, plus the source's HDR10 metadata (unless given) and quiet logging."""
    given: dict[str, str] = {}
    for kv in options.get("x265-params", "").split(":"):
        if kv:
            key, _, value = kv.partition("=")
            given[key] = value if _ else "1"
    given.setdefault("log-level", "error")
    if info.hdr is not None:
        for k, v in info.hdr.x265_params().items():
            given.setdefault(k, v)
        given.setdefault("hdr10", "1")
    return ":".join(f"{k}={v}" for k, v in given.items())


# --crf: each encoder's range (outside it, encoders clamp silently)
CRF_RANGE = {"libx264": (0, 51), "libx265": (0, 51), "libvpx-vp9": (0, 63), "libaom-av1": (0, 63),
             "libsvtav1": (1, 63)}  # fmt: skip


def _quality_options(codec: str, opts: EncoderChoices, info: VideoInfo | None = None) -> dict[str, str]:
    """The user's -e options, plus each codec's quality defaults where the user left them out."""
    options = dict(opts.encoder_options)
    if opts.crf is not None and codec in CRF_RANGE:
        lo, hi = CRF_RANGE[codec]
        if not lo <= opts.crf <= hi:
            raise VideoError(f"--crf {opts.crf}: {codec} takes {lo} (best) to {hi}")
    if codec in ("libx264", "libx265"):
        options.setdefault("crf", str(opts.crf if opts.crf is not None else 18))
        options.setdefault("preset", opts.preset or "medium")
        if codec == "libx265" and info is not None:
            options["x265-params"] = _x265_params(info, options)
    elif codec in ("libvpx-vp9", "libsvtav1", "libaom-av1"):
        options.setdefault("crf", str(opts.crf if opts.crf is not None else 30))
        if codec == "libvpx-vp9":
            options.setdefault("b", "0")
        if opts.preset and codec == "libsvtav1":
            options.setdefault("preset", opts.preset)
    elif codec in QUANTISER_CODECS and not {"b", "qscale", "global_quality"} & set(options):
        # FFmpeg's default for these is a low bitrate (200 kb/s): use a constant quantiser, -q:v 2 (--crf N: -q:v N)
        q = opts.crf if opts.crf is not None else 2
        if not 1 <= q <= 31:
            raise VideoError(f"--crf {q}: {codec} takes a quantiser from 1 (best) to 31")
        options.setdefault("flags", "+qscale")
        options.setdefault("global_quality", str(q * 118))  # FF_QP2LAMBDA
    return options


def open_encoder(
    out: av.container.OutputContainer, info: VideoInfo, scale: int, opts: EncoderChoices, fmt: str
) -> av.video.stream.VideoStream:
    """Add the video stream to `out` and open its encoder, declared like the source; VideoError if refused."""
    codec = choose_codec(info, opts, fmt)
    if codec not in av.codecs_available:
        raise VideoError(f"-c:v {codec}: no such encoder in this FFmpeg build")
    pix_fmt = opts.pix_fmt or default_pix_fmt(info, codec)
    check_pix_fmt(codec, pix_fmt)
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
    c = output_colour(info, codec, fmt)
    cc.color_range = c.range
    cc.colorspace, cc.color_primaries, cc.color_trc = c.matrix, c.primaries, c.transfer
    if pix_fmt.startswith(("rgb", "bgr", "gbr")):
        cc.colorspace = 0  # RGB output: no matrix
    if sar and sar.numerator:
        cc.sample_aspect_ratio = sar
    if codec == "libx265" and out.format.name in ("mp4", "mov"):
        cc.codec_tag = "hvc1"  # the tag Apple players require for HEVC
    cc.options = _quality_options(codec, opts, info)
    try:
        cc.open()
    except (av.error.FFmpegError, ValueError) as exc:
        raise VideoError(
            f"encoder {codec} refused {width}x{height} {pix_fmt} ({getattr(exc, 'strerror', None) or exc})"
        ) from None
    return stream


class FrameSink:
    """Upscaled RGB frames -> the encoder of `stream` -> the muxer of `out`.

    Frames are converted with the output's colour description (matrix, range) at the encoder's bit depth and
    resampled to the encoder's size when they differ from it. Presentation timestamps (in `time_base`) must
    increase for the encoder to accept a frame, so a repeated or backwards one becomes the previous one + 1.
    """

    def __init__(
        self,
        out: av.container.OutputContainer,
        stream: av.video.stream.VideoStream,
        colour: Colour,
        scale: int,
        time_base: Fraction,
    ) -> None:
        self.out, self.stream, self.time_base = out, stream, time_base
        cc = stream.codec_context
        self.pix_fmt = cc.pix_fmt or "yuv420p"
        self.size = (cc.width, cc.height)
        # the encoder was declared with the output's colour (output_colour): convert to exactly that
        bits, height = pixel_bits(self.pix_fmt), cc.height or colour.height * scale
        self.colour = replace(colour, matrix=int(cc.colorspace), range=int(cc.color_range), bits=bits, height=height)
        self.last_pts: int | None = None
        self.frames = 0

    def next_pts(self, pts: int) -> int:
        """The timestamp the frame of `pts` is encoded with: `pts`, or the previous one + 1 (duplicates)."""
        if self.last_pts is not None and pts <= self.last_pts:
            pts = self.last_pts + 1
        self.last_pts = pts
        return pts

    def encode(self, rgb: np.ndarray, pts: int) -> None:
        """Encode one frame at `pts` (already from `next_pts`) and mux what the encoder gives back."""
        frame = rgb_to_frame(np.asarray(rgb), self.pix_fmt, self.colour, self.size)
        frame.pts, frame.time_base = pts, self.time_base
        self.mux(self.stream.encode(frame))
        self.frames += 1

    def write(self, rgb: np.ndarray, pts: int) -> None:
        """Encode one frame at the next valid timestamp from `pts`."""
        self.encode(rgb, self.next_pts(pts))

    def flush(self) -> None:
        """Drain the encoder at the end of the input."""
        self.mux(self.stream.encode(None))

    def mux(self, packets: Iterable[av.Packet]) -> None:
        for packet in packets:
            self.out.mux(packet)


class PacketCopy:
    """Copied packets (audio, subtitles) with decode timestamps kept increasing per stream.

    Some sources repeat or step back a DTS; a muxer refuses such a packet, so it is moved just after the
    previous one (and its pts with it, where the pts would now precede the dts) instead of failing the run.
    """

    def __init__(self) -> None:
        self._last_dts: dict[Any, int] = {}

    def repair(self, packet: av.Packet, key: Any) -> None:
        """Fix the timestamps of `packet`, one of the stream named by `key`, in place."""
        assert packet.dts is not None  # only timestamped packets are copied
        last = self._last_dts.get(key)
        if last is not None and packet.dts <= last:
            packet.dts = last + 1
            if packet.pts is not None and packet.pts < packet.dts:
                packet.pts = packet.dts
        self._last_dts[key] = packet.dts

    def mux(self, out: av.container.OutputContainer, packet: av.Packet, stream: av.stream.Stream) -> None:
        """Repair `packet`, then mux it as a packet of the output's `stream`."""
        self.repair(packet, stream.index)
        packet.stream = stream  # type: ignore[assignment]
        out.mux(packet)


def add_copy(out: av.container.OutputContainer, source: av.stream.Stream, refusal: str) -> av.stream.Stream:
    """Declare a copy of the input stream `source` in `out`; VideoError `refusal` (+ FFmpeg's reason) if the
    container cannot carry it."""
    try:
        return out.add_stream_from_template(source)
    except (av.error.FFmpegError, ValueError) as exc:
        raise VideoError(f"{refusal} ({exc})") from None


def add_copied_streams(
    inp: av.container.InputContainer, out: av.container.OutputContainer, dst: Path, *, audio: bool, subtitles: bool
) -> dict[int, av.stream.Stream]:
    """Declare the audio and/or subtitle streams of `inp` (with their tags) in `out`: input index -> output."""
    copies: dict[int, av.stream.Stream] = {}
    for s in inp.streams:
        if s.type == "audio" and audio or s.type == "subtitle" and subtitles:
            flag = "--no-audio" if s.type == "audio" else "--no-subtitles"
            refusal = (f"{dst}: this container cannot carry the {s.type} stream #{s.index} "
                       f"({s.codec_context.name}): use {flag} or another container such as .mkv")  # fmt: skip
            o = add_copy(out, s, refusal)
            copy_tags(s.metadata, o)
            copies[s.index] = o
    return copies


def copy_tags(tags: Mapping[str, str], target: Any) -> None:
    """Copy metadata tags onto a stream or container."""
    for k, v in tags.items():
        target.metadata[k] = v


def copy_metadata(inp: av.container.InputContainer, out: av.container.OutputContainer, chapters: bool) -> None:
    """The container's tags (less those the muxer writes itself) and, if asked, its chapters."""
    for k, v in inp.metadata.items():
        if k.lower() not in ("encoder", "major_brand", "minor_version", "compatible_brands"):
            out.metadata[k] = v
    if chapters and inp.chapters():
        out.set_chapters(inp.chapters())


# ---- partial files: OUT.partial until complete; a resumed run continues one from its last complete GOP ----


def open_output(tmp: Path, dst: Path, fmt: str, options: dict[str, str] | None = None) -> av.container.OutputContainer:
    """Open the partial file `tmp` of `dst` for writing; VideoError naming the folder when it cannot be created."""
    try:
        return av.open(str(tmp), mode="w", format=fmt, options=options or {})
    except (av.error.FFmpegError, OSError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise VideoError(f"{dst}: cannot write in folder {dst.parent} ({reason})") from None


def partial_path(dst: Path) -> Path:
    """Where `dst` is written until it is complete."""
    return dst.with_name(dst.name + ".partial")


def partial_format(fmt: str, subtitles: bool = False) -> str:
    """The container of the partial file of a `fmt` output (carrying subtitle streams or not)."""
    return "matroska" if fmt in REMUXED and not subtitles else fmt


def partial_options() -> dict[str, str]:
    """Muxer options of a partial file: every packet reaches the disk at once, so a killed run loses at most
    the GOP in progress."""
    return {"flush_packets": "1"}


def finalize(
    tmp: Path, dst: Path, fmt: str, remux: bool = False, subtitles_from: tuple[Path, Window] | None = None
) -> None:
    """Move the finished partial file into place; with `remux` (a Matroska partial of an MP4/MOV output) its
    packets are copied into a `fmt` file first, unchanged, with the index at the front, together with the
    subtitle streams of `subtitles_from` = (source, window): its packets in the window, as `window_packets`."""
    if not remux:
        tmp.replace(dst)
        return
    staged = tmp.with_name(tmp.name + ".final")
    try:
        with av.open(str(tmp)) as inp, av.open(str(staged), "w", format=fmt, options={"movflags": "+faststart"}) as out:
            streams = {s.index: out.add_stream_from_template(s) for s in inp.streams if s.type in _COPYABLE}
            for s in inp.streams:
                if s.index not in streams:
                    continue
                copy_tags(s.metadata, streams[s.index])
                if s.codec_context.name == "hevc":
                    streams[s.index].codec_tag = "hvc1"  # the tag Apple players require for HEVC
            copy_metadata(inp, out, chapters=True)

            def partial() -> Iterator[tuple[float, int, av.Packet]]:
                for packet in inp.demux(*(inp.streams[i] for i in streams)):
                    if packet.dts is None and packet.size == 0:
                        continue
                    t = float(packet.dts * packet.time_base) if packet.dts is not None else 0.0
                    packet.stream = streams[packet.stream.index]  # type: ignore[assignment]
                    yield t, id(packet), packet

            if subtitles_from is None:
                for _, _, packet in partial():
                    out.mux(packet)
            else:
                with open_input(subtitles_from[0]) as source:
                    subs = {s.index: add_copy(out, s, f"{dst}: cannot carry subtitle stream #{s.index}")
                            for s in source.streams if s.type == "subtitle"}  # fmt: skip
                    for s in source.streams:
                        if s.index in subs:
                            copy_tags(s.metadata, subs[s.index])
                    copy = PacketCopy()

                    def subtitles() -> Iterator[tuple[float, int, av.Packet]]:
                        for packet in window_packets(source, list(subs), subtitles_from[1]):
                            copy.repair(packet, packet.stream.index)
                            assert packet.dts is not None
                            t = float(packet.dts * packet.time_base)
                            packet.stream = subs[packet.stream.index]  # type: ignore[assignment]
                            yield t, id(packet), packet

                    for _, _, packet in heapq.merge(partial(), subtitles()):
                        out.mux(packet)
        staged.replace(dst)
    finally:
        staged.unlink(missing_ok=True)
    tmp.unlink(missing_ok=True)


# (start s, end s or None, shift timestamps to start at 0, trim copied streams to [start, end))
Window = tuple[float, float | None, bool, bool]


def window_packets(inp: av.container.InputContainer, indices: list[int], window: Window) -> Iterator[av.Packet]:
    """The timestamped packets of streams `indices` of `inp` a transcode copies for `window`: those inside it
    when trimming, shifted to start at 0 when asked."""
    start, end, shift, trim = window
    trimming = start > 0 or end is not None
    for packet in inp.demux(*(inp.streams[i] for i in indices)):
        if packet.dts is None or packet.pts is None:
            continue
        tb = packet.time_base
        t = float(packet.pts * tb)
        if trimming and trim and (t < start - 1e-6 or (end is not None and t >= end)):
            continue
        if shift:
            packet.pts -= round(start / tb)
            packet.dts -= round(start / tb)
        yield packet


_COPYABLE = ("video", "audio", "subtitle", "data")


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


def resume_plan(partial: Path, src: Path) -> tuple[float, float, int] | None:
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


def join_resumed(previous: Path, part: Path, resume: tuple[float, float, int], fmt: str) -> None:
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
                copy_tags(s.metadata, streams[s.index])
            copy_metadata(new, out, chapters=True)

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
