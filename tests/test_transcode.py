"""`esc-video transcode` on real files: streams kept, timestamps kept, colour kept, safe failures."""

import subprocess
import sys
import threading
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from media import demo_frames, make_clip, packets, video_pts_ms, write_srt

import esc_stream
from esc_stream.checkpoints import save_checkpoint
from esc_stream.models import create_model
from esc_stream.video.probe import VideoError, probe
from esc_stream.video.transcode import TranscodeOptions, partial_path, transcode


def _nearest_model(scale: int):
    """An ESC whose output is exactly the nearest-neighbour upscale (to_img zeroed): makes colour testable."""
    torch.manual_seed(0)
    m = create_model("esc_small", scale)
    with torch.no_grad():
        m.to_img.weight.zero_()
        m.to_img.bias.zero_()
    return m


@pytest.fixture(scope="module")
def wdir(tmp_path_factory, shared_data):
    d = tmp_path_factory.mktemp("weights")
    save_checkpoint(d / "nearest_x2.pth", _nearest_model(2))
    save_checkpoint(d / "nearest_x3.pth", _nearest_model(3))
    return d


@pytest.fixture(scope="module")
def up(wdir):
    return esc_stream.load(wdir / "nearest_x2.pth")


@pytest.fixture(scope="module")
def frames(shared_data):
    return demo_frames(6)


def _decode_rgb(path, fmt="rgb24"):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format=fmt) for f in c.decode(video=0)]


def test_audio_and_subtitles_survive_with_identical_packets(tmp_path, up, frames):
    srt = write_srt(tmp_path / "s.srt", [(0.0, 0.08, "first"), (0.1, 0.2, "second line")])
    src = make_clip(tmp_path / "in.mkv", frames, audio=True, srt=srt)
    dst = tmp_path / "out.mkv"
    result = transcode(src, dst, up)
    assert result.frames == len(frames) and dst.exists() and not partial_path(dst).exists()
    for kind in ("audio", "subtitle"):
        before, after = packets(src, kind), packets(dst, kind)
        assert before and before == after, kind
    with av.open(str(dst)) as c:
        assert c.streams.audio[0].metadata.get("language") == "fin"
        assert (c.streams.video[0].width, c.streams.video[0].height) == (128, 72)


def test_mp4_with_audio(tmp_path, up, frames):
    src = make_clip(tmp_path / "in.mp4", frames, audio=True)
    dst = tmp_path / "out.mp4"
    transcode(src, dst, up)
    assert packets(src, "audio") == packets(dst, "audio")
    assert len(_decode_rgb(dst)) == len(frames)


def test_variable_frame_rate_keeps_every_timestamp(tmp_path, up, frames):
    pts = [0, 40, 100, 120, 200, 330]
    src = make_clip(tmp_path / "vfr.mkv", frames, pts=pts, time_base=Fraction(1, 1000))
    assert video_pts_ms(src) == pts
    dst = tmp_path / "vfr_out.mkv"
    transcode(src, dst, up)
    assert video_pts_ms(dst) == pts


def test_colour_is_converted_with_the_source_matrix_and_range(tmp_path, up, frames):
    # the model is an exact nearest-neighbour upscale, so decoded output subsampled by 2 must equal the input
    for rng in (1, 2):
        tags = {"colorspace": 1, "color_primaries": 1, "color_trc": 1, "color_range": rng}
        src = make_clip(tmp_path / f"c{rng}.mkv", frames, pix_fmt="yuv444p", colour=tags)
        dst = tmp_path / f"c{rng}_out.mkv"
        transcode(src, dst, up, TranscodeOptions(crf=0))
        with av.open(str(dst)) as c:
            cc = c.streams.video[0].codec_context
            assert (cc.colorspace, cc.color_primaries, cc.color_trc, cc.color_range) == (1, 1, 1, rng)
        info = probe(dst)
        assert info.colour.matrix == 1 and info.colour.range == rng
        a = np.stack(_decode_rgb(src)).astype(int)
        b = np.stack(_decode_rgb(dst)).astype(int)[:, ::2, ::2]
        assert np.abs(a - b).mean() < 1.0 and np.percentile(np.abs(a - b), 99) <= 3


def test_ten_bit_source_gives_ten_bit_output(tmp_path, up, frames):
    deep = [(f.astype(np.uint16) * 257 + np.uint16(100)) for f in frames[:3]]
    src = make_clip(tmp_path / "p10.mkv", deep, pix_fmt="yuv420p10le")
    assert probe(src).colour.bits == 10
    dst = tmp_path / "p10_out.mkv"
    transcode(src, dst, up)
    with av.open(str(dst)) as c:
        assert c.streams.video[0].codec_context.pix_fmt == "yuv420p10le"
        frame = next(c.decode(video=0))
        y = frame.to_ndarray()[: frame.height]  # luma plane, 10-bit codes
    assert y.max() < 1024 and np.any(y % 4 != 0)  # values an 8-bit path (x4) could not produce


def test_stop_leaves_a_playable_partial_file(tmp_path, up, frames):
    src = make_clip(tmp_path / "in.mp4", frames * 3)
    dst = tmp_path / "stopped.mp4"
    stop = threading.Event()

    def progress(done, info, elapsed):
        if done >= 4:
            stop.set()

    result = transcode(src, dst, up, progress=progress, stop=stop)
    assert result.stopped and not dst.exists() and partial_path(dst).exists()
    n = len(_decode_rgb(partial_path(dst)))
    assert 4 <= n < len(frames) * 3


def test_stop_before_the_first_frame_writes_nothing_and_says_so(tmp_path, up, frames):
    src = make_clip(tmp_path / "in.mp4", frames[:3])
    stop = threading.Event()
    stop.set()
    result = transcode(src, tmp_path / "early.mp4", up, stop=stop)
    assert result.stopped and result.frames == 0 and result.output_bytes == 0
    assert not (tmp_path / "early.mp4").exists()


def test_sigterm_stops_cleanly(tmp_path, wdir, frames):
    src = make_clip(tmp_path / "long.mkv", frames * 40)
    dst = tmp_path / "long_out.mkv"
    cmd = [sys.executable, "-m", "esc_stream.cli", "transcode", str(src), str(dst),
           "--weights", str(wdir / "nearest_x2.pth")]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    partial = partial_path(dst)
    for _ in range(600):
        if partial.exists() and partial.stat().st_size > 2000:
            break
        threading.Event().wait(0.05)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "partial output kept" in err and "Traceback" not in err
    assert not dst.exists() and 0 < len(_decode_rgb(partial)) < 240


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "esc_stream.cli", *args], capture_output=True, text=True)


def _audio_only(path):
    with av.open(str(path), "w") as out:
        s = out.add_stream("aac", rate=48000)
        s.layout = "mono"
        for i in range(5):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 48000, i * 1024
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode(None):
            out.mux(p)
    return path


def _no_frames(path):
    """A video stream declared but without a single frame (audio packets only)."""
    with av.open(str(path), "w", format="matroska") as out:
        s = out.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 36, "yuv420p"
        a = out.add_stream("aac", rate=48000)
        a.layout = "mono"
        for i in range(5):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 48000, i * 1024
            for p in a.encode(f):
                out.mux(p)
        for p in a.encode(None):
            out.mux(p)
    return path


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing", "no such file"),
        ("not_video", "not a readable media file"),
        ("audio_only", "has no video stream"),
        ("no_frames", "no decodable picture"),
        ("truncated_mp4", "not a readable media file"),
        ("same_file", "overwrite the input"),
        ("exists", "already exists"),
        ("bad_ext", "unknown output container"),
        ("odd_size", "odd side"),
        ("bad_codec", "no such encoder"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path, wdir, frames, case, expect):
    src = tmp_path / "in.mp4"
    dst = tmp_path / "out.mkv"
    weights = wdir / "nearest_x2.pth"
    extra = []
    if case == "missing":
        src = tmp_path / "nope.mp4"
    elif case == "not_video":
        src.write_text("not a video at all\n" * 20)
    elif case == "audio_only":
        _audio_only(src)
    elif case == "no_frames":
        src = _no_frames(tmp_path / "empty.mkv")
    elif case == "truncated_mp4":
        full = make_clip(tmp_path / "full.mp4", frames)
        src.write_bytes(full.read_bytes()[:300])
    else:
        if case == "odd_size":  # 63x35 in 4:4:4, asked for 4:2:0 at x3
            make_clip(src, [np.ascontiguousarray(f[:35, :63]) for f in frames[:2]], pix_fmt="yuv444p")
        else:
            make_clip(src, frames[:2])
        if case == "same_file":
            dst = src
        elif case == "exists":
            dst.write_bytes(b"keep me")
        elif case == "bad_ext":
            dst = tmp_path / "out.xyz"
        elif case == "odd_size":
            weights = wdir / "nearest_x3.pth"
            extra = ["--pix-fmt", "yuv420p"]
        elif case == "bad_codec":
            extra = ["-c:v", "nosuchcodec"]
    before = src.read_bytes() if src.exists() else None
    proc = _run_cli("transcode", str(src), str(dst), "--weights", str(weights), "--quiet", *extra)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("esc-video:")]
    assert len(errors) == 1 and expect in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    if before is not None:
        assert src.read_bytes() == before
    if case == "exists":
        assert dst.read_bytes() == b"keep me"
    assert not partial_path(dst).exists()


def test_corrupt_middle_is_reported_and_the_rest_decoded(tmp_path, up, frames):
    src = make_clip(tmp_path / "in.mkv", frames * 3)
    data = bytearray(src.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 400] = bytes(400)  # wipe a span inside the video data
    bad = tmp_path / "corrupt.mkv"
    bad.write_bytes(bytes(data))
    result = transcode(bad, tmp_path / "out.mkv", up)
    assert result.frames == len(frames) * 3  # what could be decoded was kept
    assert result.bad_spans and "decoding errors" in result.bad_spans[0]


def test_probe_describes_streams(tmp_path, frames):
    srt = write_srt(tmp_path / "s.srt", [(0.0, 0.1, "x")])
    src = make_clip(tmp_path / "in.mkv", frames, audio=True, srt=srt)
    proc = _run_cli("probe", str(src))
    assert proc.returncode == 0
    assert "64x36" in proc.stdout and "audio" in proc.stdout and "subtitles" in proc.stdout
    assert "bt709" in proc.stdout or "assuming bt601" in proc.stdout
    with pytest.raises(VideoError):
        probe(tmp_path / "missing.mkv")


def test_start_and_duration_trim_every_stream(tmp_path, up, frames):
    srt = write_srt(tmp_path / "s.srt", [(0.0, 0.1, "early"), (0.25, 0.35, "kept")])
    src = make_clip(tmp_path / "in.mkv", frames * 2, audio=True, srt=srt)  # 12 frames, 0.48 s
    dst = tmp_path / "cut.mkv"
    result = transcode(src, dst, up, TranscodeOptions(start=0.2, duration=0.16))
    assert result.frames == 4
    assert video_pts_ms(dst) == [0, 40, 80, 120]  # shifted to start at zero
    subs = packets(dst, "subtitle")
    assert len(subs) == 1 and subs[0][0] == 50 and b"kept" in subs[0][2]
    audio = packets(dst, "audio")
    assert audio and audio[0][0] >= 0 and audio[-1][0] < 160


def test_time_arguments_parse_like_ffmpeg(tmp_path):
    from esc_stream.cli.common import seconds as _seconds

    assert _seconds("12.5") == 12.5 and _seconds("01:30") == 90 and _seconds("1:02:03.5") == 3723.5
    proc = _run_cli("transcode", "a.mp4", "b.mp4", "--start", "soon")
    assert proc.returncode == 2 and "not a time" in proc.stderr


def test_kill_and_resume_equals_a_straight_run(tmp_path, wdir, frames):
    ext = ".mkv"
    srt = write_srt(tmp_path / "s.srt", [(0.0, 0.5, "before the cut"), (1.5, 2.0, "after the cut")])
    src = make_clip(tmp_path / f"in{ext}", frames * 10, audio=True, srt=srt)  # 60 frames, 2.4 s
    common = ["--weights", str(wdir / "nearest_x2.pth"), "--crf", "0", "-e", "g=6", "--quiet"]
    straight = tmp_path / f"straight{ext}"
    assert _run_cli("transcode", str(src), str(straight), *common).returncode == 0

    dst = tmp_path / f"resumed{ext}"
    partial = partial_path(dst)
    proc = subprocess.Popen([sys.executable, "-m", "esc_stream.cli", "transcode", str(src), str(dst), *common],
                            stderr=subprocess.PIPE)  # fmt: skip
    from esc_stream.video.transcode import resume_point

    for _ in range(1200):  # wait until the partial file holds a few complete GOPs, then kill hard
        if partial.exists() and (resume_point(partial) or 0) >= 0.5:
            break
        threading.Event().wait(0.05)
    proc.kill()
    proc.wait()
    assert not dst.exists() and partial.exists()
    first = _run_cli("transcode", str(src), str(dst), *common)
    assert first.returncode != 0 and "--resume" in first.stderr  # a partial file is never clobbered silently
    done = _run_cli("transcode", str(src), str(dst), *common, "--resume")
    assert done.returncode == 0, done.stderr
    assert "resumed at" in done.stderr
    assert not partial.exists()
    assert video_pts_ms(dst) == video_pts_ms(straight)
    a, b = _decode_rgb(straight), _decode_rgb(dst)
    assert len(a) == len(b) == 60 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert packets(dst, "audio") == packets(straight, "audio")
    assert packets(dst, "subtitle") == packets(straight, "subtitle")


def test_resume_refuses_avi_clearly(tmp_path, up, frames):
    src = make_clip(tmp_path / "in.mp4", frames)
    dst = tmp_path / "out.avi"
    partial_path(dst).write_bytes(b"partial")
    with pytest.raises(VideoError, match="--resume works with .mkv/.webm/.mp4/.mov"):
        transcode(src, dst, up, TranscodeOptions(resume=True))
    assert partial_path(dst).read_bytes() == b"partial"


def test_rotation_and_sample_aspect_are_carried(tmp_path, up, frames):
    src = make_clip(tmp_path / "rot.mp4", frames[:3], rotation=90, colour={"sample_aspect_ratio": Fraction(32, 27)})
    assert probe(src).rotation == 90 and probe(src).sar == Fraction(32, 27)
    dst = tmp_path / "rot_out.mp4"
    transcode(src, dst, up)
    info = probe(dst)
    assert info.rotation == 90 and (info.width, info.height) == (128, 72)
    assert info.sar == Fraction(32, 27)  # an integer scale keeps the pixel aspect


def test_chapters_and_container_metadata_are_kept(tmp_path, up, frames):
    src = make_clip(tmp_path / "chap.mkv", frames, chapters=[(0.0, 0.1, "Intro"), (0.1, 0.24, "Main")])
    with av.open(str(src)) as c:
        before = [(ch["start"] * ch["time_base"], ch["metadata"]["title"]) for ch in c.chapters()]
    dst = tmp_path / "chap_out.mkv"
    transcode(src, dst, up)
    with av.open(str(dst)) as c:
        after = [(ch["start"] * ch["time_base"], ch["metadata"]["title"]) for ch in c.chapters()]
    assert before == after == [(0, "Intro"), (Fraction(1, 10), "Main")]


def test_unsupported_pixel_format_is_named():
    from esc_stream.video.probe import check_pixel_format

    check_pixel_format("x.mkv", "yuv420p10le")
    with pytest.raises(VideoError, match="pixel format vdpau is not supported"):
        check_pixel_format("x.mkv", "vdpau")


@pytest.mark.parametrize(
    "size, sar, expect",
    [((1920, 1080), None, (1920, 1080, Fraction(1))), ((None, 1080), None, (1920, 1080, Fraction(1))),
     ((1920, None), Fraction(32, 27), (1920, 1080, Fraction(1))), ((1440, 1080), None, (1440, 1080, Fraction(4, 3)))],
)  # fmt: skip
def test_target_size_keeps_the_display_aspect(size, sar, expect):
    from esc_stream.video.colour import target_size

    src = (720, 480) if sar else (1280, 720)
    assert target_size(*src, sar, size) == expect


def test_size_gives_exact_output_and_square_pixels(tmp_path, up, frames):
    # 64x36 at SAR 32:27 displays as 64*32/27 x 36 (~ 2.107:1); asked for width 150 -> height 72, square pixels
    anamorphic = make_clip(tmp_path / "ana.mkv", frames[:3], colour={"sample_aspect_ratio": Fraction(32, 27)})
    dst = tmp_path / "sized.mkv"
    transcode(anamorphic, dst, up, TranscodeOptions(size=(150, None)))
    info = probe(dst)
    assert (info.width, info.height) == (150, 72)
    # square up to the rounding of the height to an even number (71.2 -> 72)
    assert info.sar is not None and abs(float(info.sar) - 1) < 0.02
    odd = tmp_path / "odd.mkv"
    with pytest.raises(VideoError, match="odd side"):
        transcode(anamorphic, odd, up, TranscodeOptions(size=(151, 73)))
    transcode(anamorphic, odd, up, TranscodeOptions(size=(151, 73), pix_fmt="yuv444p"))
    assert (probe(odd).width, probe(odd).height) == (151, 73)
