"""Scale-out on a local Ray runtime: segmented runs equal a straight run, killed tasks are retried, re-runs
resume, a batch survives a corrupt file, and nothing imports Ray without --ray."""

import json
import logging
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from media import demo_frames, make_clip, packets, video_pts_ms, write_srt

import esc_stream
from esc_stream.cli import main
from esc_stream.scaleout.segments import ModelSpec, encode_segment, keyframes, local_runner, run_segmented, work_dir
from esc_stream.video.probe import VideoError
from esc_stream.video.transcode import TranscodeOptions, partial_path, transcode

ray = pytest.importorskip("ray")

LOSSLESS = TranscodeOptions(crf=0)
# irregular frame durations (variable frame rate), ms; a keyframe every 8 frames -> 3 segments of >= 0.3 s
DURATIONS = [40, 40, 80, 40, 40, 120, 40, 40] * 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Workers run one torch thread each; the straight runs here too, so both sides are timed alike."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ray_runtime():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    yield
    ray.shutdown()


def _decode(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory, shared_data):
    """A VFR clip with audio and subtitles, and its straight (single-process, lossless) transcode."""
    d = tmp_path_factory.mktemp("clip")
    srt = write_srt(d / "s.srt", [(0.0, 0.3, "first"), (0.9, 1.3, "second")])
    pts = np.concatenate([[0], np.cumsum(DURATIONS)[:-1]]).tolist()
    src = make_clip(d / "in.mkv", demo_frames(24), pts=pts, time_base=Fraction(1, 1000), audio=True, srt=srt,
                    x264={"crf": "10", "preset": "ultrafast", "g": "8", "keyint_min": "8"})  # fmt: skip
    straight = d / "straight.mkv"
    transcode(src, straight, esc_stream.load(), LOSSLESS)
    return src, straight


def _same_video(a, b):
    assert video_pts_ms(a) == video_pts_ms(b)
    fa, fb = _decode(a), _decode(b)
    assert len(fa) == len(fb) == 24
    for i, (x, y) in enumerate(zip(fa, fb, strict=True)):
        assert np.array_equal(x, y), f"frame {i} differs"


def test_segmented_ray_run_equals_a_straight_run(tmp_path, clip, ray_runtime):
    from esc_stream.scaleout.ray_runner import RayRunner

    src, straight = clip
    keys, tb = keyframes(src)
    assert [float(k * tb) for k in keys] == [0.0, 0.44, 0.88]
    dst = tmp_path / "seg.mkv"
    hosts = set()
    result = run_segmented(src, dst, ModelSpec(), LOSSLESS, runner=RayRunner(), segment_seconds=0.3,
                           on_done=lambda seg, m: hosts.add(m["pid"]))  # fmt: skip
    assert result.segments == 3 and result.frames == 24 and result.reused == 0
    assert os.getpid() not in hosts  # the segments really ran in Ray workers
    _same_video(straight, dst)
    for kind in ("audio", "subtitle"):
        assert packets(dst, kind) == packets(src, kind) == packets(straight, kind), kind
    assert not work_dir(dst).exists() and not partial_path(dst).exists()


def _dies_once(job, seg):
    """Segment 1's first attempt kills its worker process outright, as an OOM kill or a lost node would."""
    flag = Path(job.work).parent / f"died_{seg.index}"
    if seg.index == 1 and not flag.exists():
        flag.touch()
        os._exit(1)
    return encode_segment(job, seg)


def test_a_killed_task_is_retried(tmp_path, clip, ray_runtime):
    from esc_stream.scaleout.ray_runner import RayRunner

    src, straight = clip
    dst = tmp_path / "retried.mkv"
    run_segmented(src, dst, ModelSpec(), LOSSLESS, runner=RayRunner(task=_dies_once, retries=2), segment_seconds=0.3)
    assert (tmp_path / "died_1").exists()
    _same_video(straight, dst)


def _fails_on_2(job, seg):
    if seg.index == 2:
        raise VideoError("segment 2 cannot be done today")
    return encode_segment(job, seg)


def _counted(job, seg):
    (Path(job.work).parent / f"ran_{seg.index}").touch()
    return encode_segment(job, seg)


def test_rerun_resumes_from_finished_segments(tmp_path, clip, ray_runtime):
    from esc_stream.scaleout.ray_runner import RayRunner

    src, straight = clip
    dst = tmp_path / "resumed.mkv"
    with pytest.raises(VideoError, match="1 of 3 segments failed.*cannot be done today.*run the same command again"):
        run_segmented(src, dst, ModelSpec(), LOSSLESS, runner=RayRunner(task=_fails_on_2), segment_seconds=0.3)
    assert not dst.exists()
    kept = sorted(p.name for p in work_dir(dst).glob("seg_*.json"))
    assert kept == ["seg_00000.json", "seg_00001.json"]
    result = run_segmented(src, dst, ModelSpec(), LOSSLESS, runner=RayRunner(task=_counted), segment_seconds=0.3)
    assert result.reused == 2 and sorted(p.name for p in tmp_path.glob("ran_*")) == ["ran_2"]
    _same_video(straight, dst)
    assert packets(dst, "audio") == packets(src, "audio")
    assert not work_dir(dst).exists()


def test_other_settings_do_not_reuse_segments(tmp_path, clip):
    src, _ = clip
    dst = tmp_path / "x.mkv"
    folder = work_dir(dst)
    folder.mkdir()
    (folder / "plan.json").write_text(json.dumps({"fingerprint": {"settings": "another run"}}))
    with pytest.raises(VideoError, match="holds segments of another run"):
        run_segmented(src, dst, ModelSpec(), LOSSLESS, segment_seconds=0.3)


def test_mp4_with_b_frames_keeps_pts_and_increasing_dts(tmp_path, shared_data):
    """Lossy x264 (B-frames): every segment's encoder starts its dts early; the join must keep them increasing."""
    src = make_clip(
        tmp_path / "in.mp4", demo_frames(16), audio=True, x264={"crf": "10", "preset": "ultrafast", "g": "4"}
    )
    dst = tmp_path / "seg.mp4"
    result = run_segmented(src, dst, ModelSpec(), TranscodeOptions(preset="fast"), runner=local_runner,
                           segment_seconds=0.15)  # fmt: skip
    assert result.segments == 4
    with av.open(str(dst)) as c:
        vs = c.streams.video[0]
        ts = [(p.pts, p.dts) for p in c.demux(vs) if p.size]
    assert any(pts != dts for pts, dts in ts)  # reordered: the case that needs care
    dts = [d for _, d in ts]
    assert all(b > a for a, b in zip(dts, dts[1:], strict=False)) and all(d <= p for p, d in ts)
    assert video_pts_ms(dst) == video_pts_ms(src)
    assert packets(dst, "audio") == packets(src, "audio")


def test_video_only_source_and_tiny_segments(tmp_path, shared_data):
    frames = demo_frames(6)
    src = make_clip(tmp_path / "in.nut", frames, fmt="nut", x264={"crf": "10", "preset": "ultrafast", "g": "2"})
    dst = tmp_path / "out.nut"
    result = run_segmented(src, dst, ModelSpec(), LOSSLESS, runner=local_runner, segment_seconds=0.01)
    assert result.segments == 3 and result.frames == 6
    straight = tmp_path / "straight.nut"
    transcode(src, straight, esc_stream.load(), LOSSLESS)
    assert video_pts_ms(dst) == video_pts_ms(straight) == video_pts_ms(src)
    assert all(np.array_equal(a, b) for a, b in zip(_decode(dst), _decode(straight), strict=True))


def test_cli_ray_starts_its_own_runtime_and_equals_straight(tmp_path, clip):
    src, straight = clip
    dst = tmp_path / "cli.mkv"
    cmd = [sys.executable, "-m", "esc_stream.cli", "transcode", str(src), str(dst), "--ray", "--workers", "2",
           "--segment", "0.3", "--crf", "0"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "24 frames" in proc.stdout and "3 segments" in proc.stdout
    assert proc.stderr.count("segment ") >= 3 and "Traceback" not in proc.stderr
    _same_video(straight, dst)
    assert not work_dir(dst).exists()


@pytest.mark.parametrize(
    "name, extra, expect",
    [("bad.mkv", ["--start", "0.5"], "do not combine with --ray"), ("bad.ts", [], "segmented runs write"),
     ("bad.mkv", ["-c:v", "nosuchcodec"], "no such encoder"),
     ("bad.mkv", ["--ray", "127.0.0.1:1"], "no Ray cluster answers there")],
)  # fmt: skip
def test_cli_ray_bad_input_gets_one_line_before_ray_starts(tmp_path, clip, capsys, name, extra, expect):
    src, _ = clip
    out = tmp_path / name
    ray_was_up = ray.is_initialized()
    assert main(["transcode", str(src), str(out), "--ray", "--quiet", *extra]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("esc-video:")]
    assert len(lines) == 1 and expect in lines[0]
    assert not out.exists() and not work_dir(out).exists()
    assert ray.is_initialized() == ray_was_up  # refused before any runtime was started


def _library(root: Path) -> Path:
    lib = root / "library"
    (lib / "sub").mkdir(parents=True)
    frames = demo_frames(4)
    make_clip(lib / "a.mkv", frames, audio=True)
    make_clip(lib / "sub" / "b.mp4", frames[::-1])
    (lib / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + os.urandom(3000))
    (lib / "notes.txt").write_text("not a video")
    return lib


def test_batch_on_ray_finishes_the_others_and_reports_the_bad_file(tmp_path, ray_runtime, capsys, shared_data):
    lib, out = _library(tmp_path), tmp_path / "out"
    assert main(["batch", str(lib), str(out), "--ray", "--crf", "0"]) == 1
    captured = capsys.readouterr()
    assert (out / "a.mkv").exists() and (out / "sub" / "b.mp4").exists()
    assert not (out / "broken.mp4").exists() and not (out / "notes.txt").exists()
    assert packets(out / "a.mkv", "audio") == packets(lib / "a.mkv", "audio")
    assert "batch: 2 upscaled, 0 skipped, 1 failed of 3 files" in captured.out
    failed = [line for line in captured.out.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "broken.mp4" in failed[0] and "not a readable media file" in failed[0]
    assert captured.err.count("batch: ") == 3  # an overall line after each file
    # a re-run skips what is done and tries the bad file again
    assert main(["batch", str(lib), str(out), "--ray", "--crf", "0", "--quiet"]) == 1
    assert "0 upscaled, 2 skipped, 1 failed" in capsys.readouterr().out


def test_without_ray_nothing_imports_ray(tmp_path, shared_data):
    lib, out = _library(tmp_path), tmp_path / "out"
    (lib / "broken.mp4").unlink()
    code = (
        "import sys; from esc_stream.cli import main\n"
        f"assert main(['transcode', {str(lib / 'a.mkv')!r}, {str(tmp_path / 'one.mkv')!r}, '--quiet']) == 0\n"
        f"assert main(['batch', {str(lib)!r}, {str(out)!r}, '--quiet']) == 0\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "one.mkv").exists() and (out / "a.mkv").exists() and (out / "sub" / "b.mp4").exists()
    assert "batch: 2 upscaled, 0 skipped, 0 failed of 2 files" in proc.stdout
