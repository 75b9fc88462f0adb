"""Look at an input before transcoding: streams, frame-rate mode, colour tags, bit depth, frame count."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from ..errors import VideoError
from .colour import DYNAMIC_HDR, Colour, HdrMetadata, pixel_bits

__all__ = ["VideoError", "VideoInfo", "check_pixel_format", "is_live", "open_input", "probe", "probe_container"]


@dataclass
class VideoInfo:
    """What `probe` found; enough to plan the transcode and to explain it to the user."""

    path: Path | str  # a str for stdin ("-") and URLs, which Path would mangle
    format_name: str
    width: int
    height: int
    pix_fmt: str
    codec: str
    time_base: Fraction
    average_rate: Fraction | None
    frames: int
    frames_estimated: bool
    duration: float | None
    colour: Colour
    variable_rate: bool
    rotation: int = 0
    audio: list[str] = field(default_factory=list)
    subtitles: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    sar: Fraction | None = None
    hdr: HdrMetadata | None = None  # HDR10 static metadata (mastering display, content light level)
    dynamic_hdr: list[str] = field(default_factory=list)  # dynamic HDR metadata found (HDR10+, Dolby Vision)

    def describe(self) -> str:
        rate = f"{float(self.average_rate):.3f} fps" if self.average_rate else "unknown rate"
        mode = "variable frame rate (timestamps kept per frame)" if self.variable_rate else "constant frame rate"
        count = f"{'~' if self.frames_estimated else ''}{self.frames} frames"
        if self.frames_estimated:
            count += " (estimated from duration)"
        lines = [
            f"{self.path}: {self.format_name}, {self.duration or 0:.2f} s",
            f"  video: {self.codec} {self.width}x{self.height} {self.pix_fmt}, {rate}, {mode}, {count}",
            f"  colour: {self.colour.describe()}",
        ]
        if self.hdr is not None:
            lines.append(f"  hdr10: {self.hdr.describe()} (carried over)")
        if self.dynamic_hdr:
            lines.append(f"  dynamic hdr: {', '.join(self.dynamic_hdr)} (not carried)")
        if self.rotation:
            lines.append(f"  rotation: {self.rotation} degrees (display matrix, carried over)")
        lines += [f"  audio: {a} (copied)" for a in self.audio]
        lines += [f"  subtitles: {s} (copied)" for s in self.subtitles]
        lines += [f"  other: {o} (not copied)" for o in self.other]
        return "\n".join(lines)


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://|pipe:\d*$)")  # tcp://..., pipe:0; not C:\\x nor a file "a:1.ts"


def is_live(src: str | Path) -> bool:
    """True for stdin ("-") and URLs (tcp://, udp://, srt://, rtmp://, http://, pipe:N): read once, never seeked."""
    if isinstance(src, Path):
        return False
    return src == "-" or (_URL.match(src) is not None and not src.startswith("file:"))


def _ffmpeg_url(src: str) -> str:
    return "pipe:0" if src == "-" else src


def no_data(label: str, seconds: float) -> str:
    """The one line for an input that sent nothing for `seconds` (`stream --timeout`)."""
    return f"no data from {label} within {seconds:g} s (--timeout)"


def open_input(
    path: str | Path,
    *,
    format: str | None = None,
    options: dict[str, str] | None = None,
    timeout: float | tuple[float | None, float | None] | None = None,
    reader: Any = None,
) -> av.container.InputContainer:
    """Open for reading only, with one clear error for the usual problems.

    `path` may also be "-" (stdin) or a URL FFmpeg opens; `format`, `options` and `timeout` apply to those.
    `reader`, a file-like object, is read instead of a live `path` (which then only names it in messages)."""
    if is_live(path):
        label = "stdin" if path == "-" else str(path)
        try:
            target = reader if reader is not None else _ffmpeg_url(str(path))
            return av.open(target, mode="r", format=format, options=options or {}, timeout=timeout)
        except av.error.ExitError as exc:  # PyAV's timeout interrupted the wait (connect, accept or first bytes)
            first = timeout[0] if isinstance(timeout, tuple) else timeout
            if first is None:
                raise VideoError(f"{label}: cannot open ({exc.strerror})") from None
            raise VideoError(no_data(label, first)) from None
        except av.error.FFmpegError as exc:
            raise VideoError(f"{label}: cannot open ({exc.strerror or type(exc).__name__})") from None
        except ValueError as exc:  # e.g. an unknown -f name
            raise VideoError(f"{label}: cannot open ({exc})") from None
    path = Path(path)
    if not path.exists():
        raise VideoError(f"{path}: no such file")
    if path.is_dir():
        raise VideoError(f"{path}: is a folder, not a video file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: file is empty")
    try:
        return av.open(str(path), mode="r", format=format, options=options or {})
    except av.error.FFmpegError as exc:
        raise VideoError(f"{path}: not a readable media file ({exc.strerror or type(exc).__name__})") from None


def _stream_label(s: av.stream.Stream) -> str:
    lang = s.metadata.get("language", "")
    name = s.codec_context.name if s.codec_context else "unknown"
    extra = ""
    if isinstance(s, av.audio.stream.AudioStream):
        extra = f" {s.codec_context.sample_rate} Hz {s.codec_context.layout.name}"
    return f"#{s.index} {name}{extra}{' [' + lang + ']' if lang else ''}"


def _first_frame(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> tuple[int, HdrMetadata | None, list[str]]:
    """What only a decoded frame tells: display rotation (degrees counter-clockwise, from the display matrix),
    HDR10 static metadata and the dynamic HDR metadata present (frame side data, or the decoder's stream-wide
    side data)."""
    rotation, hdr, dynamic = 0, None, []
    try:
        for frame in container.decode(stream):
            rotation = int(round(frame.rotation or 0)) % 360
            side: dict[str, Any] = {getattr(k, "name", str(k)).upper(): frame.side_data[k] for k in frame.side_data}
            for k, v in stream.codec_context.decoded_side_data.items():
                side.setdefault(getattr(k, "name", str(k)).upper(), v)
            hdr = HdrMetadata.from_side_data(side)
            dynamic = [label for name, label in DYNAMIC_HDR.items() if name in side]
            break
    except (av.error.FFmpegError, AttributeError):
        pass
    finally:
        container.seek(0)
    if "dovi_conf" in {str(k) for k in stream.codec_context.coded_side_data} and "Dolby Vision RPU" not in dynamic:
        dynamic.append("Dolby Vision configuration")
    return rotation, hdr, dynamic


def _fraction(value: Any) -> Fraction | None:
    """PyAV rationals as Fractions; None for missing or 0/0."""
    if value is None or not getattr(value, "denominator", 0):
        return None
    return Fraction(value.numerator, value.denominator)


def check_pixel_format(path: str | Path, pix_fmt: str) -> None:
    """VideoError unless frames of `pix_fmt` can be converted to RGB (hardware surfaces, for one, cannot)."""
    try:
        av.VideoFrame(16, 16, pix_fmt).reformat(format="rgb24")
    except (av.error.FFmpegError, ValueError, TypeError) as exc:
        raise VideoError(f"{path}: pixel format {pix_fmt} is not supported ({exc})") from None


def probe(path: str | Path) -> VideoInfo:
    """Describe the first video stream of `path` and list the streams that will be copied."""
    with open_input(path) as c:
        return probe_container(c, path)


def probe_container(c: av.container.InputContainer, path: str | Path, *, seekable: bool = True) -> VideoInfo:
    """Describe an open input; `seekable=False` (pipes, live URLs) reads nothing beyond what FFmpeg probed,
    so the display rotation and HDR metadata, which need a decoded frame and a seek back, are left unset."""
    if not c.streams.video:
        raise VideoError(f"{path}: has no video stream")
    vs = c.streams.video[0]
    cc = vs.codec_context
    if cc.width <= 0 or cc.height <= 0 or cc.pix_fmt is None:
        raise VideoError(f"{path}: video stream #{vs.index} has no decodable picture size or pixel format")
    check_pixel_format(path, cc.pix_fmt)
    duration = float(c.duration / av.time_base) if c.duration else None
    if vs.duration and vs.time_base:
        duration = float(vs.duration * vs.time_base)
    rate = vs.average_rate or vs.guessed_rate
    frames, estimated = int(vs.frames or 0), False
    if frames <= 0 and duration and rate:
        frames, estimated = int(round(duration * float(rate))), True
    # a container's declared base rate far above its average rate marks variable frame rate
    vfr = bool(vs.base_rate and vs.average_rate and abs(float(vs.base_rate) / float(vs.average_rate) - 1) > 0.01)
    colour = Colour(
        matrix=int(cc.colorspace or 2),
        primaries=int(cc.color_primaries or 2),
        transfer=int(cc.color_trc or 2),
        range=int(cc.color_range or 0),
        bits=pixel_bits(cc.pix_fmt),
        height=cc.height,
    )
    info = VideoInfo(
        path=path if isinstance(path, str) and is_live(path) else Path(path),
        format_name=c.format.name,
        width=cc.width,
        height=cc.height,
        pix_fmt=cc.pix_fmt,
        codec=cc.name,
        time_base=_fraction(vs.time_base) or Fraction(1, 25),
        average_rate=_fraction(rate),
        frames=frames,
        frames_estimated=estimated,
        duration=duration,
        colour=colour,
        variable_rate=vfr,
        sar=_fraction(cc.sample_aspect_ratio),
    )
    if seekable:
        info.rotation, info.hdr, info.dynamic_hdr = _first_frame(c, vs)
    for s in c.streams:
        if s is vs:
            continue
        if s.type == "audio":
            info.audio.append(_stream_label(s))
        elif s.type == "subtitle":
            info.subtitles.append(_stream_label(s))
        else:
            info.other.append(f"#{s.index} {s.type}")
    return info
