"""Build real media files for tests: frames from realvideo_demo000, a sine audio track, SRT subtitles."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def demo_frames(n: int, size: tuple[int, int] = (64, 36)) -> list[np.ndarray]:
    """`n` consecutive real camera frames (RGB uint8), resized to `size` (w, h)."""
    files = sorted((SHARED / "realvideo_demo000").glob("*.png"))[:n]
    if files:
        return [np.asarray(Image.open(f).convert("RGB").resize(size, Image.BICUBIC)) for f in files]
    # without ../shared (a bare clone): the same camera's frames from the clip bundled for `make example`
    clip = Path(__file__).resolve().parents[1] / "examples" / "realvideo_demo000.mp4"
    with av.open(str(clip)) as src:
        decoded = zip(range(n), src.decode(video=0), strict=False)
        frames = [f.to_image().resize(size, Image.BICUBIC) for _, f in decoded]
    return [np.asarray(im.convert("RGB")) for im in frames]


def nearest_weights(path: Path) -> Path:
    """A seeded x2 esc_small whose output is the nearest-neighbour upscale (to_img zeroed): fast, deterministic."""
    import torch

    from esc_stream.checkpoints import save_checkpoint
    from esc_stream.models import create_model

    torch.manual_seed(0)
    m = create_model("esc_small", 2)
    with torch.no_grad():
        m.to_img.weight.zero_()
        m.to_img.bias.zero_()
    return save_checkpoint(path, m)


def smooth_pictures(folder: Path, n: int, size: tuple[int, int]) -> Path:
    """`n` blocky-smooth random RGB PNGs of `size` (h, w) in `folder` (made): a stand-in validation set."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    for i in range(n):
        smooth = np.kron(rng.random((h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))[:h, :w]
        Image.fromarray((smooth * 255).astype(np.uint8)).save(folder / f"im{i}.png")
    return folder


def write_srt(path: Path, cues: list[tuple[float, float, str]]) -> Path:
    def ts(t: float) -> str:
        ms = int(round(t * 1000))
        return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"

    path.write_text("".join(f"{i + 1}\n{ts(a)} --> {ts(b)}\n{text}\n\n" for i, (a, b, text) in enumerate(cues)))
    return path


def make_clip(
    path: Path,
    frames: list[np.ndarray],
    *,
    fmt: str | None = None,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    rate: int = 25,
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    audio: bool = False,
    srt: Path | None = None,
    colour: dict | None = None,
    x264: dict | None = None,
    rotation: int = 0,
    chapters: list[tuple[float, float, str]] | None = None,
) -> Path:
    """Encode `frames` (RGB uint8 or uint16) into `path`; optional VFR pts, sine audio, subtitles, colour tags."""
    time_base = time_base or Fraction(1, rate)
    with av.open(str(path), "w", format=fmt) as out:
        vs = out.add_stream(codec, rate=rate)
        vs.width, vs.height, vs.pix_fmt = frames[0].shape[1], frames[0].shape[0], pix_fmt
        vs.codec_context.time_base = time_base
        vs.time_base = time_base
        if codec == "libx264":
            vs.codec_context.options = x264 or {"crf": "10", "preset": "ultrafast"}
        if rotation:
            vs.set_display_rotation(rotation)
        if chapters:
            ms = Fraction(1, 1000)
            out.set_chapters([{"id": i + 1, "start": round(a * 1000), "end": round(b * 1000), "time_base": ms,
                               "metadata": {"title": t}} for i, (a, b, t) in enumerate(chapters)])  # fmt: skip
        colour = colour or {}
        for k, v in colour.items():
            setattr(vs.codec_context, k, v)
        sub_in = sub_stream = None
        if srt is not None:
            sub_in = av.open(str(srt))
            sub_stream = out.add_stream_from_template(sub_in.streams[0])
            sub_stream.metadata["language"] = "eng"
        astream = None
        if audio:
            astream = out.add_stream("aac", rate=48000)
            astream.layout = "stereo"
            astream.metadata["language"] = "fin"
        for i, rgb in enumerate(frames):
            f = av.VideoFrame.from_ndarray(rgb, format="rgb48le" if rgb.dtype == np.uint16 else "rgb24")
            kw = {}
            if "colorspace" in colour:
                kw["dst_colorspace"] = {1: 1, 5: 5, 6: 5, 9: 9}.get(colour["colorspace"], 1)
            if "color_range" in colour:
                kw["dst_color_range"] = colour["color_range"]
            f = f.reformat(format=pix_fmt, **kw)
            f.pts = pts[i] if pts else i
            f.time_base = time_base
            for p in vs.encode(f):
                out.mux(p)
        for p in vs.encode(None):
            out.mux(p)
        if astream is not None:
            seconds = (pts[-1] * time_base if pts else Fraction(len(frames), rate)) + Fraction(1, rate)
            n = int(48000 * seconds)
            t = np.arange(n) / 48000
            wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            samples = np.stack([wave, wave])
            for start in range(0, n, 1024):
                chunk = np.ascontiguousarray(samples[:, start : start + 1024])
                af = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
                af.sample_rate = 48000
                af.pts = start
                for p in astream.encode(af):
                    out.mux(p)
            for p in astream.encode(None):
                out.mux(p)
        if sub_in is not None:
            for p in sub_in.demux(sub_in.streams[0]):
                if p.dts is None:
                    continue
                p.stream = sub_stream
                out.mux(p)
            sub_in.close()
    return path


def _ms(v, tb):
    return None if v is None else round(float(v * tb) * 1000)


def packets(path: Path, kind: str) -> list[tuple[int | None, int | None, bytes]]:
    """(pts, dts, payload) of every packet of the first stream of `kind`, in stream time base seconds*1000."""
    with av.open(str(path)) as c:
        s = [st for st in c.streams if st.type == kind][0]
        tb = s.time_base
        out = []
        for p in c.demux(s):
            if p.dts is None and p.size == 0:
                continue
            out.append((_ms(p.pts, tb), _ms(p.dts, tb), bytes(p)))
        return out


def video_pts_ms(path: Path) -> list[int]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return [round(float(f.pts * s.time_base) * 1000) for f in c.decode(s)]
