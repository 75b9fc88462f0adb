"""Hostile and mistaken command-line input: each case is one line on stderr and exit status 2, never a traceback,
"internal error" or a silent wrong result. One row of the table per case; the clips are built here, tiny."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import av
import numpy as np
import pytest
from media import nearest_weights
from PIL import Image

from esc_stream.budget import TILES, check_memory, estimate
from esc_stream.errors import MemoryBudgetError, UserError


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return nearest_weights(tmp_path_factory.mktemp("weights") / "nearest_x2.pth")


def _clip(path: Path) -> Path:
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        vs.codec_context.options = {"preset": "ultrafast"}
        for i in range(2):
            f = av.VideoFrame.from_ndarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), format="rgb24")
            f = f.reformat(format="yuv420p")
            f.pts = i
            for p in vs.encode(f):
                out.mux(p)
        for p in vs.encode(None):
            out.mux(p)
    return path


def _animated(path: Path) -> Path:
    frames = [Image.fromarray(np.full((24, 32, 3), v, np.uint8)) for v in (0, 120, 240)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _silent_sender(port: int, payload: bytes = b""):
    """A client that connects to the stream's listening port (retrying until it listens), sends `payload` and
    then nothing, holding the connection open until the test is over."""
    done = threading.Event()

    def send() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not done.is_set():
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=1)
            except OSError:
                time.sleep(0.05)
                continue
            with conn:
                conn.sendall(payload)
                done.wait(60)
            return

    t = threading.Thread(target=send, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join(5)


@contextmanager
def _open_pipe(payload: bytes = b""):
    """The read end of a pipe for a child's stdin; the write end stays open (nothing more is sent) until the
    test is over, so a child that ignores --timeout waits for the test's own limit."""
    r, w = os.pipe()
    try:
        os.write(w, payload)  # a small clip fits the pipe's buffer
        yield r
    finally:
        os.close(w)
        os.close(r)


@contextmanager
def _read_only(folder: Path):
    """A folder nobody can write, root included (immutable where chattr works, else mode 555)."""
    immutable = shutil.which("chattr") is not None and subprocess.run(["chattr", "+i", str(folder)]).returncode == 0
    if not immutable:
        folder.chmod(0o555)
    try:
        probe = folder / "probe"
        try:
            probe.touch()
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip("cannot make a read-only folder here")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)])
        folder.chmod(0o755)


# (case, command, what the one line must say)
CASES = [
    ("crf_out_of_range", "transcode", "--crf 999: libx264 takes 0 (best) to 51"),
    ("crf_out_of_range_vp9", "transcode", "--crf 64: libvpx-vp9 takes 0 (best) to 63"),
    ("pix_fmt_banana", "transcode", "--pix-fmt banana: no such pixel format"),
    ("pix_fmt_the_encoder_refuses", "transcode", "--pix-fmt rgb24: libx264 does not take it"),
    ("folder_as_video_input", "transcode", "is a folder, not a video file"),
    ("folder_as_image_input", "image", "is a folder, not an image file"),
    ("folder_as_probe_input", "probe", "is a folder, not a video file"),
    ("read_only_video_output_folder", "transcode", "is not writable"),
    ("read_only_image_output_folder", "image", "is not writable"),
    ("animated_gif", "image", "an animated image (3 frames)"),
    ("animated_webp", "image", "an animated image (3 frames)"),
    ("animated_png", "image", "an animated image (3 frames)"),
    # `stream --timeout 1`: an input that never sends a byte ends the run within about a second, naming it
    ("silent_stdin", "stream", "no data from stdin within 1 s (--timeout)"),
    ("silent_tcp_listen_nobody_connects", "stream", "within 1 s (--timeout)"),
    ("silent_tcp_sender", "stream", "within 1 s (--timeout)"),
    # memory estimated before the model runs (esc_stream/budget.py); the 3 GiB cap makes the answer machine-free
    ("image_too_large_for_memory", "image", "3000x3000 at x2 needs about"),
    ("image_tile_too_large_for_memory", "image", "3000x3000 at x2 with --tile 2048 needs about"),
    ("output_size_too_large_for_memory", "image", "32x24 -> 99999x99999 needs about"),
    ("video_output_size_too_large_for_memory", "transcode", "64x48 -> 99998x99998 needs about"),
]


@pytest.mark.parametrize("case, command, expect", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_and_exit_2(tmp_path, weights, case, command, expect):
    src, dst, extra = tmp_path / "in.mp4", tmp_path / "out.mkv", []
    ro = None
    if command == "image":
        src, dst = tmp_path / "in.png", tmp_path / "out.png"
        Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(src)
    elif command == "stream":
        dst = tmp_path / "out.ts"
        extra = ["--timeout", "1"]
    else:
        _clip(src)
    if case.startswith("crf"):
        extra = ["--crf", "999"] if case == "crf_out_of_range" else ["--crf", "64"]
        dst = dst if case == "crf_out_of_range" else tmp_path / "out.webm"
    elif case == "pix_fmt_banana":
        extra = ["--pix-fmt", "banana"]
    elif case == "pix_fmt_the_encoder_refuses":
        extra = ["--pix-fmt", "rgb24"]
    elif case.startswith("folder_as"):
        src = tmp_path / "a_folder"
        src.mkdir()
    elif case.startswith("read_only"):
        ro = tmp_path / "locked"
        ro.mkdir()
        dst = ro / dst.name
    elif case == "animated_gif":
        src = _animated(tmp_path / "anim.gif")
    elif case == "animated_webp":
        src = _animated(tmp_path / "anim.webp")
    elif case == "animated_png":
        src = _animated(tmp_path / "anim_apng.png")
    elif case == "silent_stdin":
        src = "-"
    elif case.startswith("silent_tcp"):
        src = f"tcp://127.0.0.1:{_free_port()}?listen"
    env = None
    if case.endswith("too_large_for_memory"):
        env = {**os.environ, "ESC_STREAM_MEMORY_LIMIT": "3G"}
        if case.startswith("image_"):
            src = tmp_path / "big.png"
            Image.fromarray(np.zeros((3000, 3000, 3), np.uint8)).save(src, compress_level=1)
        if case.startswith("image_tile"):
            extra = ["--tile", "2048"]
        if case.startswith("output_size"):
            extra = ["--size", "99999x99999"]
        if case.startswith("video_output_size"):
            extra = ["--size", "99998x99998"]
    args = [command, str(src)] if command == "probe" else [command, str(src), str(dst), "--weights", str(weights)]
    if command == "transcode":
        args.append("--quiet")
    cmd = [sys.executable, "-m", "esc_stream.cli", *args, *extra]
    if ro is not None:
        with _read_only(ro):
            proc = subprocess.run(cmd, capture_output=True, text=True)
    elif case == "silent_stdin":
        with _open_pipe() as stdin:
            proc = subprocess.run(cmd, stdin=stdin, capture_output=True, text=True, timeout=30)
    elif case == "silent_tcp_sender":
        with _silent_sender(int(str(src).split(":")[-1].split("?")[0])):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("esc-video:")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and expect in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    if ro is not None:
        assert str(ro) in errors[0] and ".tmp" not in errors[0] and ".partial" not in errors[0]
    if case.endswith("too_large_for_memory"):
        assert "(estimate), more than the 3.0 GiB of RAM available" in errors[0]
        if "output_size" in case:  # the output alone is far over: no tile size helps, and the line says so
            assert "no --tile helps" in errors[0]
        else:  # a smaller --tile is suggested; the next step up would not fit
            n = int(errors[0].split("try --tile ")[1].split()[0])  # esc_small: 48 channels, 16-pixel windows
            bigger = TILES[TILES.index(n) - 1]
            fits, too_big = (estimate(3000, 3000, 2, 48, tile=t).total for t in (n, bigger))
            assert fits <= 3 * 2**30 < too_big
    if command == "stream":
        assert f"no data from {'stdin' if src == '-' else src} within" in errors[0]
        assert not Path(f"{dst}.partial").exists()
    assert not dst.exists()


def test_stream_input_silent_after_frames_keeps_the_output(tmp_path, weights):
    """Frames, then silence with the pipe still open: the run ends on its own (--timeout 1), the output is whole
    and renamed into place, and the summary says the input timed out (exit 0, as at an end of input)."""
    ts = tmp_path / "in.ts"
    with av.open(str(_clip(tmp_path / "in.mp4"))) as c, av.open(str(ts), "w", format="mpegts") as out:
        s = out.add_stream_from_template(c.streams.video[0])
        for packet in c.demux(c.streams.video[0]):
            if packet.dts is not None:
                packet.stream = s
                out.mux(packet)
    dst = tmp_path / "out.mkv"
    cmd = [sys.executable, "-m", "esc_stream.cli", "stream", "-", str(dst), "--weights", str(weights),
           "--timeout", "1", "--quiet"]  # fmt: skip
    with _open_pipe(ts.read_bytes()) as stdin:
        proc = subprocess.run(cmd, stdin=stdin, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "input timed out: no data from stdin for 1 s (--timeout)" in proc.stderr
    assert "2 of 2 frames" in proc.stderr and "Traceback" not in proc.stderr
    with av.open(str(dst)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 2 and frames[0].shape == (96, 128, 3)
    assert not Path(f"{dst}.partial").exists()


@pytest.mark.parametrize("bits", [8, 16])
def test_grayscale_png_comes_back_grayscale(tmp_path, weights, bits):
    rng = np.random.default_rng(1)
    if bits == 8:
        grey = rng.integers(0, 256, (24, 32), dtype=np.uint8)
        Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    else:
        grey = rng.integers(0, 65536, (24, 32)).astype(np.uint16)
        with av.open(str(tmp_path / "g.png"), "w", format="image2") as out:
            s = out.add_stream("png")
            s.width, s.height, s.pix_fmt = 32, 24, "gray16be"
            for p in s.encode(av.VideoFrame.from_ndarray(grey, format="gray16le").reformat(format="gray16be")):
                out.mux(p)
            for p in s.encode(None):
                out.mux(p)
    dst = tmp_path / "g_out.png"
    cmd = [
        sys.executable,
        "-m",
        "esc_stream.cli",
        "image",
        str(tmp_path / "g.png"),
        str(dst),
        "--weights",
        str(weights),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with av.open(str(dst)) as c:
        frame = next(c.decode(video=0))
        assert frame.format.name == ("gray" if bits == 8 else "gray16be")
        out = frame.to_ndarray()
    # the seeded model is an exact nearest-neighbour upscale: the grey levels come back as they went in
    assert out.shape == (48, 64) and np.array_equal(out[::2, ::2], grey)


def test_memory_estimate_suggests_the_largest_tile_that_fits():
    """The suggested --tile is the largest of TILES whose estimate fits; the next larger one does not; the error is
    a UserError (exit 2) whose line names the size and the estimate."""
    from types import SimpleNamespace

    up = SimpleNamespace(
        scale=2, model=SimpleNamespace(out_dim=48), window_size=16, overlap=64, tile=None, device="cpu"
    )
    w = h = 12000
    free = 26 * 2**30
    with pytest.raises(MemoryBudgetError) as caught:
        check_memory(up, w, h, available=(free, free), what="big.png")
    line = str(caught.value)
    assert isinstance(caught.value, UserError) and "\n" not in line
    assert line.startswith("big.png: 12000x12000 at x2 needs about") and "26.0 GiB of RAM available" in line
    n = int(line.split("try --tile ")[1].split()[0])
    assert n < TILES[0]
    assert estimate(w, h, 2, 48, tile=n).total <= free < estimate(w, h, 2, 48, tile=TILES[TILES.index(n) - 1]).total
    assert estimate(w, h, 2, 48).total > free  # the whole frame does not fit
    assert check_memory(up, 640, 360, available=(free, free)).total < free  # a small frame passes
