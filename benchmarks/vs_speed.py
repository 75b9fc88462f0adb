"""Overhead of the VapourSynth filter: vspipe fps vs the foundation Upscaler's fps on the same frames.

    python benchmarks/vs_speed.py [--frames 100] [--size 320x180] [--weights FILE] [--format RGB24]

Frames come from shared/data/realvideo_demo000 (cycled), or noise without it. Both sides use this
interpreter's torch thread count; vspipe's CPU time / wall time says how many cores it kept busy. The
Upscaler is timed both from the main thread and from a helper thread, which is how the filter calls it.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT.parent / "shared" / "data" / "realvideo_demo000"

SCRIPT = """
import numpy as np
import torch
import vapoursynth as vs
torch.set_num_threads({threads})
core = vs.core
frames = np.load({frames!r}, mmap_mode="r")
n, h, w, _ = frames.shape
blank = core.std.BlankClip(format=vs.RGB24, width=w, height=h, length=n)

def fill(n, f):
    out = f.copy()
    for p in range(3):
        np.asarray(out[p])[...] = frames[n, :, :, p]
    return out

src = core.std.ModifyFrame(blank, blank, fill)
if {fmt!r} != "RGB24":
    src = core.resize.Bicubic(src, format=getattr(vs, {fmt!r}), matrix_s="709", range_s="limited")
kwargs = {kwargs!r}
core.esc.Upscale(src[0], **kwargs).get_frame(0)  # warm torch up on another node, as the Python side does
core.esc.Upscale(src, **kwargs).set_output()
"""


def load_frames(count: int, width: int, height: int) -> np.ndarray:
    files = sorted(DEMO.glob("*.png"))
    if not files:
        return np.random.default_rng(0).integers(0, 256, (count, height, width, 3), dtype=np.uint8)
    from PIL import Image

    imgs = [np.asarray(Image.open(f).convert("RGB").resize((width, height), Image.BICUBIC)) for f in files]
    return np.stack([imgs[i % len(imgs)] for i in range(count)])


def python_fps(frames: np.ndarray, weights: str | None, in_thread: bool = False) -> float:
    """Frames/s of `Upscaler(frame)` over `frames`, called from this thread or from a helper thread."""
    import esc_stream

    up = esc_stream.load(weights)
    result: list[float] = []

    def run() -> None:
        up(frames[0])  # warm-up
        t0 = time.perf_counter()
        for f in frames:
            up(f)
        result.append(len(frames) / (time.perf_counter() - t0))

    if in_thread:  # as the filter runs it: torch called from a thread other than the main one
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
    else:
        run()
    return result[0]


def vspipe_fps(frames: np.ndarray, weights: str | None, fmt: str, threads: int) -> tuple[float, float]:
    """(fps vspipe reports, CPU seconds per wall second over the whole vspipe run)."""
    import vapoursynth as vs

    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "frames.npy", frames)
        kwargs = {} if weights is None else {"weights": weights}
        script = Path(tmp) / "bench.vpy"
        script.write_text(SCRIPT.format(frames=str(Path(tmp) / "frames.npy"), fmt=fmt, kwargs=kwargs, threads=threads))
        env = {**os.environ, "XDG_CONFIG_HOME": str(Path(tmp) / "cfg")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        subprocess.run([sys.executable, "-m", "vapoursynth", "config"], env=env, check=True, capture_output=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        done = subprocess.run(
            [str(Path(vs.__file__).with_name("vspipe")), "-p", str(script), os.devnull],
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"vspipe failed:\n{done.stderr.strip()}")
    found = re.search(r"Output \d+ frames in [\d.]+ seconds \(([\d.]+) fps\)", done.stderr)
    if not found:
        raise RuntimeError(f"no fps in vspipe's output:\n{done.stderr.strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return float(found.group(1)), cpu / wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--size", default="320x180", help="input WxH")
    ap.add_argument("--weights", default=None, help="checkpoint (default: the default model for x2)")
    ap.add_argument("--format", default="RGB24", help="clip format fed to esc.Upscale (RGB24, RGBS, YUV420P8, ...)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: torch's)")
    ap.add_argument("--repeat", type=int, default=1, help="alternate the two measurements this many times")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    w, h = (int(v) for v in args.size.lower().split("x"))
    frames = load_frames(args.frames, w, h)
    print(f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs, {args.frames} frames of {w}x{h}")
    for _ in range(args.repeat):
        py = python_fps(frames, args.weights)
        py_thread = python_fps(frames, args.weights, in_thread=True)
        vsp, cores = vspipe_fps(frames, args.weights, args.format, threads)
        print(f"  plain Python, Upscaler(uint8 RGB) in the main thread   {py:7.3f} fps")
        print(f"  plain Python, Upscaler(uint8 RGB) in a helper thread   {py_thread:7.3f} fps")
        label = f"vspipe, esc.Upscale on {args.format}"
        print(f"  {label:<54} {vsp:7.3f} fps  ({cores:.2f} CPU s/wall s)")
        print(f"  time per frame vs the helper-thread figure: {100 * (py_thread / vsp - 1):+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
