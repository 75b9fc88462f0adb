"""Output that comes out as it went in: HDR10 metadata, full-quality defaults per container, colour tags.

Clips are built here with PyAV; outputs are checked with PyAV's own probe and, for the picture, as PSNR of the
decoded output against the upscaler's own output on the same decoded source frames.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from media import nearest_weights

import esc_stream
from esc_stream.video.colour import HdrMetadata, frame_to_rgb
from esc_stream.video.probe import probe
from esc_stream.video.transcode import TranscodeOptions, transcode

MASTER = "G(13250,34500)B(7500,3000)R(34000,16000)WP(15635,16450)L(10000000,1)"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return nearest_weights(tmp_path_factory.mktemp("weights") / "nearest_x2.pth")


@pytest.fixture(scope="module")
def up(weights):
    return esc_stream.load(weights)


def _pictures(n: int, w: int = 64, h: int = 48, deep: bool = False) -> list[np.ndarray]:
    """Smooth moving gradients with a little texture: compressible like camera footage."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        base = np.stack([0.5 + 0.4 * np.sin((xx + 3 * i) / 9 + c) * np.cos(yy / 7 - c) for c in range(3)], -1)
        pic = np.clip(base + 0.03 * rng.standard_normal(base.shape), 0, 1)
        out.append((pic * (65535 if deep else 255)).round().astype(np.uint16 if deep else np.uint8))
    return out


def _encode(path: Path, pictures: list[np.ndarray], codec: str, pix_fmt: str, *, fmt: str | None = None,
            tags: dict | None = None, options: dict | None = None, full_range: bool = False) -> Path:  # fmt: skip
    with av.open(str(path), "w", format=fmt) as out:
        vs = out.add_stream(codec, rate=25)
        vs.width, vs.height, vs.pix_fmt = pictures[0].shape[1], pictures[0].shape[0], pix_fmt
        for k, v in (tags or {}).items():
            setattr(vs.codec_context, k, v)
        vs.codec_context.options = options or {}
        matrix = {9: 9, 1: 1}.get((tags or {}).get("colorspace", 5), 5)
        for i, rgb in enumerate(pictures):
            f = av.VideoFrame.from_ndarray(rgb, format="rgb48le" if rgb.dtype == np.uint16 else "rgb24")
            f = f.reformat(format=pix_fmt, dst_colorspace=matrix, dst_color_range=2 if full_range else 1)
            f.colorspace = (tags or {}).get("colorspace", 2)  # the frame says only what the stream says
            f.color_range = (tags or {}).get("color_range", 0)
            f.pts = i
            for p in vs.encode(f):
                out.mux(p)
        for p in vs.encode(None):
            out.mux(p)
    return path


def _rgb(path: Path) -> list[np.ndarray]:
    """Decoded frames as RGB, converted with the colour description probe reads from the file."""
    colour = probe(path).colour
    with av.open(str(path)) as c:
        return [frame_to_rgb(f, colour) for f in c.decode(video=0)]


def _psnr_to_model(up, src: Path, dst: Path) -> float:
    """PSNR of the decoded output against the upscaler's output on the same decoded source frames."""
    ref = np.stack([up(f) for f in _rgb(src)]).astype(np.float64)
    got = np.stack(_rgb(dst)).astype(np.float64)
    assert ref.shape == got.shape
    peak = 65535.0 if ref.max() > 255 else 255.0
    mse = float(np.mean((ref - got) ** 2))
    return 10 * np.log10(peak**2 / max(mse, 1e-12))


def _first_frame_side_data(path: Path) -> dict:
    with av.open(str(path)) as c:
        f = next(c.decode(video=0))
        return {k.name: f.side_data[k] for k in f.side_data}


def test_hdr10_source_stays_hdr10_with_its_metadata(tmp_path, up):
    params = f"log-level=error:hdr10=1:master-display={MASTER}:max-cll=1000,400"
    tags = {"color_primaries": 9, "color_trc": 16, "colorspace": 9, "color_range": 1}
    src = _encode(tmp_path / "hdr.mkv", _pictures(3, deep=True), "libx265", "yuv420p10le", tags=tags,
                  options={"x265-params": params, "crf": "8", "preset": "ultrafast"})  # fmt: skip
    info = probe(src)
    assert info.hdr is not None and info.hdr.max_cll == 1000 and info.hdr.max_fall == 400
    assert info.hdr.max_luminance == 1000 and info.hdr.min_luminance == Fraction(1, 10000)
    for ext in (".mp4", ".mkv"):
        dst = tmp_path / f"out{ext}"
        transcode(src, dst, up)  # default encoder: the source is 10-bit PQ
        with av.open(str(dst)) as c:
            cc = c.streams.video[0].codec_context
            assert cc.name == "hevc" and cc.pix_fmt == "yuv420p10le"
            assert ext == ".mkv" or cc.codec_tag == "hvc1"
            assert (cc.color_primaries, cc.color_trc, cc.colorspace, cc.color_range) == (9, 16, 9, 1)
        out = HdrMetadata.from_side_data(_first_frame_side_data(dst))
        assert out == info.hdr, ext
        assert _psnr_to_model(up, src, dst) > 34
    probe_text = probe(dst).describe()
    assert "MaxCLL 1000" in probe_text and "WP(0.3127,0.3290)" in probe_text


def test_hdr10_metadata_an_encoder_cannot_write_is_named(tmp_path, up):
    from esc_stream.video.encode import metadata_warnings

    tags = {"color_primaries": 9, "color_trc": 16, "colorspace": 9}
    src = _encode(tmp_path / "hdr.mkv", _pictures(2, deep=True), "libx265", "yuv420p10le", tags=tags,
                  options={"x265-params": f"log-level=error:master-display={MASTER}:max-cll=500,100"})  # fmt: skip
    info = probe(src)
    assert metadata_warnings(info, "libx265") == []
    (line,) = metadata_warnings(info, "libx264")
    assert "mastering-display" in line and "libx264" in line
    (line,) = metadata_warnings(replace(info, dynamic_hdr=["HDR10+ dynamic metadata"]), "libx265")
    assert "HDR10+ dynamic metadata" in line and "dropped" in line


@pytest.mark.parametrize(
    "ext, codec, out_range",
    [(".avi", None, 2), (".avi", "mpeg4", 1), (".nut", None, 1), (".mp4", None, 2)],
)  # mpeg4 in AVI and FFV1 in NUT cannot say "full range": converted to limited, which a player assumes
def test_full_range_mjpeg_avi_at_full_quality_in_every_container(tmp_path, up, ext, codec, out_range):
    src = _encode(tmp_path / "mjpeg.avi", _pictures(4), "mjpeg", "yuvj420p", full_range=True,
                  options={"qscale": "2"}, tags={"color_range": 2})  # fmt: skip
    assert probe(src).colour.full_range
    dst = tmp_path / f"out{ext}"
    transcode(src, dst, up, TranscodeOptions(codec=codec))
    with av.open(str(dst)) as c:
        cc = c.streams.video[0].codec_context
        assert (cc.color_range or 1) == out_range
        if codec is None and ext == ".avi":
            assert cc.name == "h264"
    assert probe(dst).colour.full_range == (out_range == 2)
    assert _psnr_to_model(up, src, dst) >= 34


def test_prores_422_10bit_mov_with_a_range_only_tag_keeps_its_range(tmp_path, up):
    src = _encode(tmp_path / "prores.mov", _pictures(3, deep=True), "prores_ks", "yuv422p10le",
                  tags={"color_range": 1}, options={"profile": "3"})  # fmt: skip
    info = probe(src)
    assert (info.colour.range, info.colour.matrix, info.colour.primaries, info.colour.transfer) == (1, 2, 2, 2)
    assert "assuming bt601" in info.describe()
    for ext in (".mov", ".mp4", ".mkv"):
        dst = tmp_path / f"out{ext}"
        transcode(src, dst, up)
        with av.open(str(dst)) as c:
            cc = c.streams.video[0].codec_context
            assert cc.pix_fmt == "yuv422p10le"
            # range kept; the matrix the source was decoded with (BT.601 for SD, as probe said) is now written
            assert (cc.color_range, cc.colorspace, cc.color_primaries, cc.color_trc) == (1, 6, 2, 2), ext
        assert _psnr_to_model(up, src, dst) >= 34


@pytest.mark.parametrize(
    "tags, expect",
    [({"colorspace": 1}, (1, 2, 2, 1)), ({"color_primaries": 9}, (6, 9, 2, 1)), ({"color_trc": 13}, (6, 2, 13, 1)),
     ({}, (6, 2, 2, 1))],
)  # fmt: skip
def test_partial_colour_tags_are_kept_and_untagged_gets_what_was_assumed(tmp_path, up, tags, expect):
    src = _encode(tmp_path / "in.mkv", _pictures(2), "libx264", "yuv420p", tags=tags,
                  options={"crf": "10", "preset": "ultrafast"})  # fmt: skip
    for key, value in tags.items():
        assert getattr(probe(src).colour, {"colorspace": "matrix", "color_primaries": "primaries",
                                           "color_trc": "transfer"}[key]) == value  # fmt: skip
    dst = tmp_path / "out.mp4"
    transcode(src, dst, up)
    with av.open(str(dst)) as c:
        cc = c.streams.video[0].codec_context
        assert (cc.colorspace, cc.color_primaries, cc.color_trc, cc.color_range) == expect


_ASS_HEADER = "\n".join([
    "[Script Info]", "ScriptType: v4.00+", "", "[V4+ Styles]",
    "Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, BackColour, Bold, Italic, "
    "Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, BorderStyle, Outline, Shadow, Alignment, MarginL, MarginR, "
    "MarginV, Encoding",
    "Style: Default,Arial,16,&Hffffff,&Hffffff,&H0,&H0,0,0,0,0,100,100,0,0,1,1,0,2,10,10,10,0", "", "[Events]",
    "Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text", "",
]).encode()  # fmt: skip


def _mp4_with_everything(path: Path, n: int, mov_text: bool = True) -> Path:
    """An MP4 with B-frames (negative first DTS), AAC (priming: starts before 0) and, if asked, mov_text."""
    pictures = _pictures(6)
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        vs.codec_context.options = {"crf": "10", "preset": "fast", "bf": "2", "g": "12"}
        a = out.add_stream("aac", rate=48000)
        a.layout = "stereo"
        a.metadata["language"] = "fin"
        t = None
        if mov_text:
            t = out.add_stream("mov_text")
            t.metadata["language"] = "eng"
            t.codec_context.subtitle_header = _ASS_HEADER
        for i in range(n):
            f = av.VideoFrame.from_ndarray(pictures[i % 6], format="rgb24").reformat(format="yuv420p")
            f.pts = i
            for p in vs.encode(f):
                out.mux(p)
        for p in vs.encode(None):
            out.mux(p)
        samples = int(48000 * (n / 25 + 0.04))
        wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / 48000)).astype(np.float32)
        for start in range(0, samples, 1024):
            chunk = np.ascontiguousarray(np.stack([wave, wave])[:, start : start + 1024])
            af = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            af.sample_rate, af.pts = 48000, start
            for p in a.encode(af):
                out.mux(p)
        for p in a.encode(None):
            out.mux(p)
        for start, end, text in [(0, 500, "before the cut"), (1500, 2000, "after the cut")] if t else []:
            data = text.encode()
            pk = av.Packet(len(data).to_bytes(2, "big") + data)
            pk.pts = pk.dts = start
            pk.duration, pk.time_base, pk.stream = end - start, Fraction(1, 1000), t
            out.mux(pk)
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "esc_stream.cli", *args], capture_output=True, text=True)


def test_mp4_killed_and_resumed_equals_a_straight_run(tmp_path, weights):
    from media import packets, video_pts_ms

    from esc_stream.video.transcode import partial_path, resume_point

    src = _mp4_with_everything(tmp_path / "in.mp4", 50)  # 2 s, B-frames, AAC, mov_text
    with av.open(str(src)) as c:
        assert any(p.dts is not None and p.dts < 0 for p in c.demux(c.streams.video[0]))  # B-frames: DTS < 0
    common = ["--weights", str(weights), "--crf", "0", "-e", "g=6", "--quiet"]
    straight = tmp_path / "straight.mp4"
    assert _cli("transcode", str(src), str(straight), *common).returncode == 0
    dst = tmp_path / "resumed.mp4"
    partial = partial_path(dst)
    proc = subprocess.Popen([sys.executable, "-m", "esc_stream.cli", "transcode", str(src), str(dst), *common],
                            stderr=subprocess.DEVNULL)  # fmt: skip
    for _ in range(2400):  # a few complete GOPs in the partial file, then a hard kill
        if partial.exists() and (resume_point(partial) or 0) >= 0.5:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not dst.exists() and partial.exists() and len(_rgb(partial)) >= 12  # readable after the kill
    done = _cli("transcode", str(src), str(dst), *common, "--resume")
    assert done.returncode == 0 and "resumed at" in done.stderr, done.stderr
    assert not partial.exists()
    with av.open(str(dst)) as c:
        assert c.format.name.startswith("mov,mp4") and c.streams.video[0].codec_context.name == "h264"
    assert video_pts_ms(dst) == video_pts_ms(straight) == video_pts_ms(src)
    a, b = _rgb(straight), _rgb(dst)
    assert len(a) == len(b) == 50 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert packets(dst, "audio") == packets(straight, "audio") == packets(src, "audio")
    assert packets(dst, "subtitle") == packets(straight, "subtitle") == packets(src, "subtitle")
    with av.open(str(dst)) as c:
        assert c.streams.subtitles[0].codec_context.name == "mov_text"
        assert c.streams.subtitles[0].metadata.get("language") == "eng"


def test_mp4_with_mov_text_is_copied_and_trimmed(tmp_path, up):
    from media import packets

    src = _mp4_with_everything(tmp_path / "in.mp4", 50)
    dst = tmp_path / "out.mp4"
    transcode(src, dst, up)
    assert packets(dst, "subtitle") == packets(src, "subtitle") and packets(dst, "audio") == packets(src, "audio")
    cut = tmp_path / "cut.mp4"
    transcode(src, cut, up, TranscodeOptions(start=1.2, duration=0.6))
    subs = [p for p in packets(cut, "subtitle") if p[2][2:]]  # the cue with text, shifted by the start
    assert len(subs) == 1 and subs[0][0] == 300 and b"after the cut" in subs[0][2]


def test_rgb_output_is_tagged_rgb_and_lossless(tmp_path, up):
    src = _encode(tmp_path / "in.mkv", _pictures(2), "libx264", "yuv444p", tags={"colorspace": 1},
                  options={"crf": "0", "preset": "ultrafast"})  # fmt: skip
    dst = tmp_path / "out.mkv"
    transcode(src, dst, up, TranscodeOptions(codec="ffv1", pix_fmt="bgr0"))
    with av.open(str(dst)) as c:
        cc = c.streams.video[0].codec_context
        assert cc.pix_fmt == "bgr0" and cc.colorspace == 0
    assert _psnr_to_model(up, src, dst) > 60
