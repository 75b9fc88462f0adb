"""`esc-video stream`: pipes and loopback TCP, dropping under load, resolution changes, audio sync, signals.

Sources and sinks are PyAV in threads of this process (or a subprocess running the CLI), all on 127.0.0.1,
each bounded in time. The stream listens (`?listen=1`) and the test's sender/receiver connect with retries,
so no side can race the other's listen.
"""

import contextlib
import io
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
from media import demo_frames, make_clip

import esc_stream
from esc_stream import cli
from esc_stream.video.probe import is_live
from esc_stream.video.stream import StreamOptions, stream
from esc_stream.video.transcode import transcode

DEADLINE = 60.0  # no test waits longer than this on a socket
N = 6  # frames in the shared clip


@pytest.fixture(scope="module")
def up():
    return esc_stream.load()  # the embedded default x2 model


@pytest.fixture(scope="module")
def clip(tmp_path_factory, shared_data):
    """6 real frames, 64x36 at 25 fps, with AAC audio, as MPEG-TS."""
    return make_clip(tmp_path_factory.mktemp("clips") / "in.ts", demo_frames(N), fmt="mpegts", audio=True)


def _port() -> int:
    """A free port below the ephemeral range: a client retrying a connect to an ephemeral port that nobody
    listens on can be given that same port as its own and connect to itself (TCP self-connect)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(max(1024, low - 8000), low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def _connect(url: str):
    """Open a TCP URL for reading as a client, retrying until the other side listens."""
    t_end = time.monotonic() + DEADLINE
    while True:
        try:
            return av.open(url, format="mpegts", timeout=DEADLINE)
        except (OSError, av.error.FFmpegError):
            if time.monotonic() > t_end:
                raise
            time.sleep(0.05)


def _send(path, url: str, fps: float | None = None, give_up: threading.Event | None = None) -> None:
    """Copy the clip's packets to `url`; with `fps`, paced to the clip's timestamps at `fps`/native speed."""
    with av.open(str(path)) as inp:
        t_end = time.monotonic() + DEADLINE
        while True:  # FFmpeg connects on open or when the header is written: retry both until the stream listens
            out = None
            try:
                out = av.open(url, "w", format="mpegts", timeout=DEADLINE)
                streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
                out.start_encoding()
                break
            except (OSError, av.error.FFmpegError):
                if out is not None:
                    with contextlib.suppress(Exception):
                        out.close()
                if time.monotonic() > t_end:
                    raise
                if give_up is not None and give_up.is_set():
                    return
                time.sleep(0.05)
        t0 = first = None
        for p in inp.demux():
            if p.dts is None:
                continue
            if fps:
                t = float(p.dts * p.time_base)
                t0, first = t0 or time.monotonic(), first if first is not None else t
                time.sleep(max(0.0, t0 + (t - first) - time.monotonic()))
            p.stream = streams[p.stream.index]
            out.mux(p)
        out.close()


def _receive(url: str, got: dict) -> None:
    """Decode everything sent to `url`: video (pts seconds, w, h, mean luma) and audio packet pts."""
    got["video"], got["audio"] = [], []
    with _connect(url) as c:
        for p in c.demux():
            if p.stream.type == "audio" and p.pts is not None:
                got["audio"].append(float(p.pts * p.time_base))
            elif p.stream.type == "video":
                for f in p.decode():
                    got["video"].append((float(f.pts * f.time_base), f.width, f.height))


def _timestamps(path):
    with av.open(str(path)) as c:
        video = [float(f.pts * f.time_base) for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        kept = c.streams.audio[:1]
        audio = [float(p.pts * p.time_base) for p in c.demux(*kept) if p.pts is not None] if kept else []
    return video, audio


def _threads(*targets):
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    return threads


def _bounded_stream(src, dst, upscaler, opts, seconds=DEADLINE):
    """Run `stream` with a stop set after `seconds`, so a broken run cannot hang the suite."""
    stop = threading.Event()
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    try:
        stats = stream(src, dst, upscaler, opts, stop=stop)
    finally:
        timer.cancel()
    assert not stats.stopped, "the stream did not end by itself in time"
    return stats


def test_stdin_to_stdout_pipe_upscales_every_frame(clip):
    cmd = [sys.executable, "-m", "esc_stream.cli", "stream", "-", "-", "-f", "nut", "--quiet"]
    run = subprocess.run(cmd, input=clip.read_bytes(), capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()
    assert f"{N} of {N} frames" in run.stderr.decode()
    with av.open(io.BytesIO(run.stdout)) as c:
        frames = [(f.pts * f.time_base, f.width, f.height) for f in c.decode(video=0)]
    in_video, in_audio = _timestamps(clip)
    assert [(w, h) for _, w, h in frames] == [(128, 72)] * N
    assert [float(t) for t, _, _ in frames] == pytest.approx(in_video, abs=1e-3)
    with av.open(io.BytesIO(run.stdout)) as c:
        audio = [float(p.pts * p.time_base) for p in c.demux(*c.streams.audio) if p.pts is not None]
    assert audio == pytest.approx(in_audio, abs=1e-3)


def test_loopback_tcp_mpegts_stream_is_upscaled_and_received(up, clip):
    a, b = _port(), _port()
    got: dict = {}
    threads = _threads(lambda: _send(clip, f"tcp://127.0.0.1:{a}", fps=25),
                       lambda: _receive(f"tcp://127.0.0.1:{b}", got))  # fmt: skip
    opts = StreamOptions(timeout=DEADLINE)
    stats = _bounded_stream(f"tcp://127.0.0.1:{a}?listen=1", f"tcp://127.0.0.1:{b}?listen=1", up, opts)
    for t in threads:
        t.join(DEADLINE)
    in_video, in_audio = _timestamps(clip)
    assert stats.frames_in == stats.frames_out == N and stats.dropped == 0
    assert [(w, h) for _, w, h in got["video"]] == [(128, 72)] * N
    assert [t for t, _, _ in got["video"]] == pytest.approx(in_video, abs=1e-3)
    assert got["audio"] == pytest.approx(in_audio, abs=1e-3)
    assert 0 < stats.median <= stats.p95 < DEADLINE


class _Sleepy:
    """A x2 nearest-neighbour upscaler that takes `period` seconds a frame, asleep: slower than a 25 fps source
    by a known amount, whatever else the machine is doing (the real network's time varies with the load)."""

    scale = 2

    def __init__(self, period: float) -> None:
        self.period = period

    def __call__(self, rgb):
        time.sleep(self.period)
        return rgb.repeat(2, axis=0).repeat(2, axis=1)


def test_drop_keeps_latency_under_the_bound_and_audio_in_sync(tmp_path, shared_data):
    clip = make_clip(tmp_path / "long.ts", demo_frames(31), fmt="mpegts", audio=True)  # 1.24 s at 25 fps
    a = _port()
    (sender,) = _threads(lambda: _send(clip, f"tcp://127.0.0.1:{a}", fps=25))
    dst = tmp_path / "out.ts"
    bound = 1.5
    opts = StreamOptions(realtime="drop", max_latency=bound, timeout=DEADLINE)
    stats = _bounded_stream(f"tcp://127.0.0.1:{a}?listen=1", str(dst), _Sleepy(0.25), opts)
    sender.join(DEADLINE)
    assert stats.frames_in == 31 and stats.dropped > 0
    assert stats.frames_out + stats.dropped == stats.frames_in
    assert f"dropped {stats.dropped}" in stats.line()
    assert max(stats.latencies) < bound
    in_video, in_audio = _timestamps(clip)
    out_video, out_audio = _timestamps(dst)
    assert len(out_video) == stats.frames_out
    # every kept frame is shown at its source time and the audio is untouched: dropping leaves gaps, not shifts
    assert all(min(abs(t - s) for s in in_video) < 1e-3 for t in out_video)
    assert out_audio == pytest.approx(in_audio, abs=1e-3)


def test_block_mode_keeps_every_frame_of_a_fast_source(up, tmp_path, clip):
    stats = _bounded_stream(str(clip), str(tmp_path / "out.mkv"), up, StreamOptions())
    assert stats.frames_out == stats.frames_in == N and stats.dropped == 0
    assert _timestamps(tmp_path / "out.mkv")[0] == pytest.approx(_timestamps(clip)[0], abs=1e-3)


def test_resolution_change_is_fitted_into_the_first_size(up, tmp_path, shared_data):
    # two MPEG-TS segments back to back, as a live source switching from 64x36 to 48x48 (another aspect)
    wide = make_clip(tmp_path / "a.ts", demo_frames(4), fmt="mpegts")
    square = make_clip(tmp_path / "b.ts", demo_frames(4, (48, 48)), fmt="mpegts", pts=[4, 5, 6, 7])
    joined = tmp_path / "joined.ts"
    joined.write_bytes(wide.read_bytes() + square.read_bytes())
    dst = tmp_path / "out.mkv"
    stats = _bounded_stream(str(joined), str(dst), up, StreamOptions())
    assert stats.frames_out == 8 and stats.resolution_changes == 1
    with av.open(str(dst)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert [f.shape for f in frames] == [(72, 128, 3)] * 8
    # 96x96 after x2, fitted into 128x72 as 72x72 centred: 28 black columns each side, picture between
    late = np.stack(frames[5:]).astype(float)
    assert late[:, :, :24].mean() < 8 and late[:, :, -24:].mean() < 8
    assert late[:, :, 32:96].mean() > 40
    assert np.stack(frames[:3]).astype(float)[:, :, :24].mean() > 40  # the first size fills the frame


def test_malformed_packets_are_skipped_and_counted(up, tmp_path, shared_data):
    good = make_clip(tmp_path / "good.ts", demo_frames(10), fmt="mpegts", x264={"crf": "10", "preset": "ultrafast",
                     "g": "1"})  # fmt: skip
    data = bytearray(good.read_bytes())
    rng = np.random.default_rng(0)
    middle = len(data) // 2
    data[middle : middle + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad.ts"
    bad.write_bytes(bytes(data))
    dst = tmp_path / "out.ts"
    stats = _bounded_stream(str(bad), str(dst), up, StreamOptions())
    assert stats.bad_packets > 0 and 0 < stats.frames_out < 10
    assert len(_timestamps(dst)[0]) == stats.frames_out


def test_transcode_reads_a_url_input(up, tmp_path, clip):
    a = _port()
    (sender,) = _threads(lambda: _send(clip, f"tcp://127.0.0.1:{a}"))
    result = transcode(f"tcp://127.0.0.1:{a}?listen=1&listen_timeout=60000", tmp_path / "out.mkv", up)
    sender.join(DEADLINE)
    assert result.frames == N
    assert _timestamps(tmp_path / "out.mkv")[1] == pytest.approx(_timestamps(clip)[1], abs=1e-3)


def test_sigint_flushes_and_closes_a_file_output(tmp_path, shared_data):
    clip = make_clip(tmp_path / "long.ts", demo_frames(31), fmt="mpegts", audio=True)
    dst = tmp_path / "live.mkv"
    cmd = [sys.executable, "-m", "esc_stream.cli", "stream", "-", str(dst), "--stats-every", "0.2"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    lines: list[bytes] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()  # type: ignore[union-attr]
    try:
        proc.stdin.write(clip.read_bytes())  # the whole clip, and then the source stays open and silent
        proc.stdin.flush()
        t_end = time.monotonic() + DEADLINE
        while not any(b" frames, dropped" in line and b" 0 frames" not in line for line in lines):
            assert proc.poll() is None and time.monotonic() < t_end, b"".join(lines).decode()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(DEADLINE)
    finally:
        proc.kill()
        proc.stdin.close()
    time.sleep(0.2)
    err = b"".join(lines).decode()
    assert rc == 0 and "stopped by signal" in err, err
    assert dst.exists() and not (tmp_path / "live.mkv.partial").exists()
    video, _ = _timestamps(dst)
    assert 0 < len(video) < 31


def test_bad_input_and_options_get_one_line(tmp_path, capsys):
    port = _port()  # nothing listens there
    cases = [
        (["stream", f"tcp://127.0.0.1:{port}", str(tmp_path / "o.ts")], "cannot open"),
        (["stream", "-", str(tmp_path / "o.xyz")], "unknown output container"),
        (["stream", "-", "-", "--reconnect"], "--reconnect needs a URL input"),
        (["stream", "-", "-", "-f", "nosuchformat"], "no such output format"),
    ]
    for argv, words in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_reconnect_continues_the_timeline(up, tmp_path, clip):
    a = _port()

    stop = threading.Event()

    def sessions():
        # Under heavy load a second session was sometimes never seen by the stream (cause not found; see the
        # closing note of #10), so the source keeps reconnecting with whole sessions until the test has enough.
        while not stop.is_set():
            try:
                _send(clip, f"tcp://127.0.0.1:{a}", give_up=stop)
            except (OSError, av.error.FFmpegError):
                if not stop.is_set():
                    raise
            time.sleep(0.2)

    (sender,) = _threads(sessions)
    dst = tmp_path / "out.mkv"
    opts = StreamOptions(reconnect=True, timeout=DEADLINE, stats_every=0.1)
    timer = threading.Timer(DEADLINE, stop.set)
    timer.start()

    def enough(st):  # --reconnect runs until stopped: stop once both connections' frames are out
        if st.frames_out >= 2 * N:
            stop.set()

    try:
        stats = stream(f"tcp://127.0.0.1:{a}?listen=1", str(dst), up, opts, stop=stop, report=enough)
    finally:
        timer.cancel()
    stop.set()
    sender.join(DEADLINE)
    assert stats.reconnects >= 1 and stats.frames_out >= 2 * N
    video, audio = _timestamps(dst)
    assert len(video) >= 2 * N and all(b > a for a, b in zip(video, video[1:], strict=False))
    # the second connection's timestamps restart; they are moved to follow the first's (audio ends last)
    assert 1 / 25 - 1e-3 < video[N] - video[N - 1] < 0.25
    assert audio == sorted(audio)


@pytest.mark.parametrize(
    "src, live",
    [("-", True), ("tcp://127.0.0.1:9000?listen=1", True), ("srt://cam:7001", True), ("pipe:0", True),
     ("clip.ts", False), ("take:1.ts", False), ("C:\\video.mp4", False), ("file:///tmp/a.ts", False)],
)  # fmt: skip
def test_which_inputs_are_read_live(src, live):
    assert is_live(src) is live
