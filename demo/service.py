"""The demo's work apart from the web page: upload checks, cached models, jobs and their temporary files.

Nothing here imports Gradio, so every rule a shared host relies on (what is accepted, how big, where files go)
is tested without a browser. Uploads arrive as files Gradio wrote into its own cache; this module only ever
reads those and writes under its own temporary folder, and reports problems as `DemoError` with the upload's
base name, never a server path.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

from esc_stream.errors import CheckpointError, ImageError, UserError, VideoError
from esc_stream.images import Picture, read_image, upscale_picture, write_image
from esc_stream.upscaler import DEFAULT_TIER, TIERS, Upscaler, load
from esc_stream.video.colour import target_size
from esc_stream.video.probe import VideoInfo, probe
from esc_stream.video.transcode import TranscodeOptions, transcode

IMAGE_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "BMP": "BMP", "TIFF": "TIFF"}
IMAGE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"]
CHECKPOINT_EXTENSIONS = [".pth", ".safetensors"]
# demuxers FFmpeg may use on an upload; playlists and concat lists (which name other files) never get this far
VIDEO_DEMUXERS = {"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi"}
# audio codecs the MP4 muxer takes as they are; anything else goes into Matroska
MP4_AUDIO = {"aac", "mp3", "alac", "flac", "opus", "ac3", "eac3"}


class DemoError(UserError):
    """A problem the user can fix (an upload, a control), shown on the page as one line."""


@dataclass(frozen=True)
class Limits:
    """What one job may ask of the host; every value can be changed on the command line."""

    max_upload_mb: int = 100
    max_image_pixels: int = 4_000_000
    max_output_side: int = 8192
    max_video_seconds: float = 20.0
    max_video_size: tuple[int, int] = (1280, 720)
    concurrency: int = 1
    queue_size: int = 16


@dataclass(frozen=True)
class Settings:
    """The page's model and output-size controls, validated."""

    scale: int = 2
    checkpoint: Path | None = None
    tile: int | None = 512
    size: tuple[int | None, int | None] | None = None
    model: str = DEFAULT_TIER  # the embedded tier, when no checkpoint is given

    @staticmethod
    def from_controls(
        scale: object,
        checkpoint: str | None,
        tile: object,
        mode: str,
        width: object,
        height: object,
        model: object = DEFAULT_TIER,
    ) -> Settings:
        """Turn raw control values into Settings; a DemoError names the control that is wrong."""
        if model not in TIERS:
            raise DemoError(f"model must be one of {', '.join(TIERS)}, got {model!r}")
        s = _whole(scale, "scale")
        if s not in (2, 3, 4):
            raise DemoError(f"scale must be 2, 3 or 4, got {s}")
        t = _whole(tile, "tile") if tile not in (None, "") else 0
        if t < 0:
            raise DemoError(f"tile must be 0 (whole frame) or a number of pixels, got {t}")
        size = None
        if mode == "Exact size":
            w = _whole(width, "width") if width not in (None, "") else 0
            h = _whole(height, "height") if height not in (None, "") else 0
            if w < 0 or h < 0 or (w == 0 and h == 0):
                raise DemoError("exact size: give a width, a height or both (0 follows the picture's aspect)")
            if 0 < w < 2 or 0 < h < 2:
                raise DemoError(f"exact size must be at least 2x2, got {w}x{h}")
            size = (w or None, h or None)
        ckpt = Path(checkpoint) if checkpoint else None
        if ckpt is not None and ckpt.suffix.lower() not in CHECKPOINT_EXTENSIONS:
            raise DemoError(f"{ckpt.name}: a checkpoint must be a .pth or .safetensors file")
        return Settings(s, ckpt, t or None, size, str(model))


def _whole(value: object, name: str) -> int:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DemoError(f"{name}: not a number: {value!r}") from None
    if f != int(f):
        raise DemoError(f"{name}: not a whole number: {value!r}")
    return int(f)


def _scrub(message: str, paths: dict[Path, str]) -> str:
    """Replace server paths in a library message by the names the user knows."""
    for path, name in paths.items():
        message = message.replace(str(path), name)
    return message


def _check_upload_size(path: Path, limits: Limits) -> None:
    if not path.is_file():
        raise DemoError("the upload is gone; upload the file again")
    size = path.stat().st_size
    if size == 0:
        raise DemoError(f"{path.name}: the file is empty")
    if size > limits.max_upload_mb * 1_000_000:
        raise DemoError(f"{path.name}: {size / 1e6:.1f} MB is more than the {limits.max_upload_mb} MB this demo takes")


def check_image(path: Path, limits: Limits) -> Picture:
    """Decode an uploaded image after checking, from its content, that it is one of the accepted kinds and sizes."""
    _check_upload_size(path, limits)
    name = path.name
    kinds = ", ".join(IMAGE_FORMATS.values())
    try:
        with Image.open(path) as im:  # reads the header only: the size is known before any pixel is decoded
            fmt, (w, h) = im.format, im.size
    except Image.DecompressionBombError:
        raise DemoError(f"{name}: the picture is far too large for this demo") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise DemoError(f"{name}: not an image (its content is none of {kinds})") from None
    if fmt not in IMAGE_FORMATS:
        raise DemoError(f"{name}: {fmt} images are not accepted; use {kinds}")
    if w * h > limits.max_image_pixels:
        raise DemoError(
            f"{name}: {w}x{h} is {w * h / 1e6:.1f} megapixels; this demo takes up to "
            f"{limits.max_image_pixels / 1e6:.1f}"
        )
    try:
        return read_image(path)
    except ImageError as exc:
        raise DemoError(_scrub(str(exc), {path: name})) from None


def _sniff_video(path: Path) -> None:
    """Refuse anything but MP4/MOV, Matroska/WebM and AVI by their first bytes, before FFmpeg parses it."""
    with open(path, "rb") as f:
        head = f.read(12)
    mp4 = len(head) >= 8 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")
    mkv = head[:4] == b"\x1a\x45\xdf\xa3"
    avi = head[:4] == b"RIFF" and head[8:12] == b"AVI "
    if not (mp4 or mkv or avi):
        raise DemoError(f"{path.name}: not a video this demo takes (its content is not MP4/MOV, Matroska/WebM or AVI)")


def check_video(path: Path, limits: Limits) -> VideoInfo:
    """Probe an uploaded video after checking its content kind; refuse clips over the length/size caps."""
    _check_upload_size(path, limits)
    name = path.name
    _sniff_video(path)
    try:
        info = probe(path)
    except VideoError as exc:
        raise DemoError(_scrub(str(exc), {path: name})) from None
    if info.format_name not in VIDEO_DEMUXERS:
        raise DemoError(f"{name}: {info.format_name} files are not accepted")
    cap_w, cap_h = limits.max_video_size
    long_side, short_side = max(info.width, info.height), min(info.width, info.height)
    if long_side > max(cap_w, cap_h) or short_side > min(cap_w, cap_h):
        raise DemoError(f"{name}: {info.width}x{info.height} is larger than the {cap_w}x{cap_h} this demo takes")
    if info.duration is None:
        raise DemoError(f"{name}: the clip's length is unknown, so it cannot be checked against the demo's cap")
    if info.duration > limits.max_video_seconds:
        raise DemoError(
            f"{name}: {info.duration:.1f} s is longer than the {limits.max_video_seconds:g} s this demo takes; "
            "trim it first"
        )
    return info


def _output_size(
    width: int, height: int, sar: Fraction | None, scale: int, settings: Settings, limits: Limits
) -> tuple[int, int]:
    """The model's scale, or the exact size asked for (a missing side follows the display aspect), within caps."""
    w, h = (width * scale, height * scale) if not settings.size else target_size(width, height, sar, settings.size)[:2]
    if max(w, h) > limits.max_output_side:
        raise DemoError(f"output {w}x{h} is larger than this demo makes ({limits.max_output_side} px a side at most)")
    return w, h


class Models:
    """A few loaded Upscalers, keyed by checkpoint content, scale and tile, so repeated jobs skip loading."""

    def __init__(self, capacity: int = 3) -> None:
        self.capacity = capacity
        self._cache: OrderedDict[tuple[str, str, int, int | None], Upscaler] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, settings: Settings) -> Upscaler:
        ckpt = settings.checkpoint
        digest = _sha256(ckpt) if ckpt is not None else "default"
        key = (digest, settings.model, settings.scale, settings.tile)  # arbitrary-scale checkpoints take the scale
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            up = self._load(settings)
            self._cache[key] = up
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
            return up

    @staticmethod
    def _load(settings: Settings) -> Upscaler:
        ckpt = settings.checkpoint
        try:
            up = load(ckpt, scale=settings.scale, model=settings.model, tile=settings.tile)
        except CheckpointError as exc:
            if ckpt is None:  # the tier has no model at this scale: the message lists the scales it has
                raise DemoError(str(exc)) from None
            raise DemoError(_scrub(str(exc), {ckpt: ckpt.name})) from None
        if ckpt is not None:
            up.source = f"uploaded {ckpt.name}"
        return up


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class _Session:
    busy: bool = False
    stop: threading.Event = field(default_factory=threading.Event)


class Workspace:
    """The demo's own temporary folder: one sub-folder per browser session, one job running per session.

    A session keeps only its latest job's files (its download link must keep working); older ones go when the
    next job starts, the whole session folder when the tab closes, and everything when the demo stops.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="esc-demo-", dir=root))
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    def _dir(self, session: str) -> Path:
        return self.root / (re.sub(r"[^A-Za-z0-9_-]", "_", session)[:64] or "anonymous")

    @contextmanager
    def job(self, session: str) -> Iterator[Path]:
        """Claim the session for one job and give it a fresh folder; a second job at once is refused."""
        with self._lock:
            state = self._sessions.setdefault(session, _Session())
            if state.busy:
                raise DemoError("you already have a job running; wait for it to finish (or press Stop)")
            state.busy = True
            state.stop.clear()
        try:
            folder = self._dir(session)
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
            out = folder / f"job-{time.monotonic_ns()}"
            out.mkdir(parents=True)
            yield out
        finally:
            with self._lock:
                state.busy = False

    def stop_event(self, session: str) -> threading.Event:
        with self._lock:
            return self._sessions.setdefault(session, _Session()).stop

    def end_session(self, session: str) -> None:
        with self._lock:
            state = self._sessions.pop(session, None)
        if state is not None:
            state.stop.set()
        shutil.rmtree(self._dir(session), ignore_errors=True)

    def close(self) -> None:
        for state in list(self._sessions.values()):
            state.stop.set()
        shutil.rmtree(self.root, ignore_errors=True)


def _stem(path: Path) -> str:
    """A safe file name stem from the upload's name."""
    return re.sub(r"[^\w.-]", "_", path.stem)[:60] or "upload"


def _to_8bit(rgb: np.ndarray) -> np.ndarray:
    return rgb if rgb.dtype == np.uint8 else (rgb >> 8).astype(np.uint8)


def _describe_model(up: Upscaler) -> str:
    text = f"{up.variant} ×{up.scale} ({up.source})"
    if not up.pretrained:
        text += " — random weights: the picture shows the pipeline, not real upscaling quality"
    return text


@dataclass
class ImageResult:
    before: np.ndarray
    after: np.ndarray
    png: Path
    text: str


def upscale_image(src: Path, settings: Settings, models: Models, limits: Limits, out_dir: Path) -> ImageResult:
    """Upscale one uploaded image (alpha and 16 bits kept), resample to an exact size if asked, write a PNG."""
    pic = check_image(src, limits)
    h, w = pic.rgb.shape[:2]
    up = models.get(settings)
    size = _output_size(w, h, None, up.scale, settings, limits)
    t0 = time.perf_counter()
    # an exact size: arbitrary-scale models render it directly, the others run at their scale and are resampled
    out = upscale_picture(up, pic, size if settings.size else None)
    rgb, alpha = out.rgb, out.alpha
    seconds = time.perf_counter() - t0
    tag = f"x{up.scale}" if not settings.size else f"{size[0]}x{size[1]}"
    png = write_image(out_dir / f"{_stem(src)}_{tag}.png", out)
    bits = 16 if rgb.dtype == np.uint16 else 8
    text = (
        f"{w}×{h} → **{rgb.shape[1]}×{rgb.shape[0]}** ({bits}-bit{', alpha' if alpha is not None else ''}) "
        f"in {seconds:.2f} s with {_describe_model(up)}"
    )
    return ImageResult(_to_8bit(pic.rgb), _to_8bit(rgb), png, text)


@dataclass
class VideoResult:
    video: Path
    text: str


Progress = Callable[[int, int, float], None]


def _audio_codecs(path: Path) -> set[str]:
    with av.open(str(path)) as c:
        return {s.codec_context.name for s in c.streams.audio if s.codec_context}


def upscale_video(
    src: Path,
    settings: Settings,
    models: Models,
    limits: Limits,
    out_dir: Path,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> VideoResult:
    """Upscale one uploaded clip with the transcoder (audio copied); MP4 when its audio fits, else Matroska."""
    info = check_video(src, limits)
    up = models.get(settings)
    opts = TranscodeOptions(preset="veryfast", subtitles=False, size=settings.size)
    size = _output_size(info.width, info.height, info.sar, up.scale, settings, limits)
    if size[0] % 2 or size[1] % 2:
        raise DemoError(f"video sizes must be even (4:2:0 video cannot hold an odd side); got {size[0]}x{size[1]}")
    ext = ".mp4" if _audio_codecs(src) <= MP4_AUDIO else ".mkv"
    tag = f"x{up.scale}" if not settings.size else f"{size[0]}x{size[1]}"
    dst = out_dir / f"{_stem(src)}_{tag}{ext}"

    def report(done: int, vinfo: VideoInfo, elapsed: float) -> None:
        if progress is not None:
            progress(done, vinfo.frames, elapsed)

    try:
        result = transcode(src, dst, up, opts, progress=report, stop=stop)
    except VideoError as exc:
        raise DemoError(_scrub(str(exc), {src: src.name, dst: dst.name})) from None
    if result.stopped:
        result.output.unlink(missing_ok=True)
        raise DemoError(f"stopped after {result.frames} frames")
    text = (
        f"{info.width}×{info.height} → **{size[0]}×{size[1]}**, {result.frames} frames in {result.seconds:.1f} s "
        f"({result.fps:.2f} fps), {result.output_bytes / 1e6:.2f} MB, with {_describe_model(up)}"
    )
    if info.audio:
        text += f"; audio copied ({len(info.audio)} track{'s' if len(info.audio) > 1 else ''})"
    if ext == ".mkv":
        text += ". The audio needs Matroska, which browsers may not play: download the file"
    for span in result.bad_spans:
        text += f"\n\nwarning: {span}"
    return VideoResult(result.output, text)
