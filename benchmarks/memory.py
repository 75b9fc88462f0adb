"""Peak memory (RSS) of `esc-video image`, `transcode` and `stream` at 960x540 -> 1920x1080, whole frame and tiled.

    python benchmarks/memory.py [--model balanced|fast] [--frames 3] [--tile 256] [--threads 2] [--runs transcode]

Each command runs in its own process (a fresh interpreter, as a user runs it); its peak resident set size is read
from the kernel's accounting of that child (`getrusage(RUSAGE_CHILDREN).ru_maxrss` in a wrapper process), so
nothing of this script's own memory counts. The inputs are made here: a 960x540 still and a `--frames` long
960x540 clip, both from the real camera frames of realvideo_demo000 (or examples/ when ../shared is absent).
Printed per run: peak RSS in MB, wall seconds, and the exit status; first, the same for `import torch` alone (the
baseline every run pays).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FRAMES = ROOT.parent / "shared" / "data" / "realvideo_demo000"
SIZE = (960, 540)
# Runs the command given as arguments, then prints the peak RSS (kB on Linux) of that finished child.
WRAPPER = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc, file=sys.stderr)"
)


def frames(n: int) -> list[np.ndarray]:
    files = sorted(FRAMES.glob("*.png")) or sorted((ROOT / "examples").glob("*.png"))
    if not files:
        raise SystemExit("memory: no source frames found")
    return [np.asarray(Image.open(files[i % len(files)]).convert("RGB").resize(SIZE)) for i in range(n)]


def write_clip(path: Path, pictures: list[np.ndarray]) -> Path:
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=25)
        st.width, st.height, st.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
        for rgb in pictures:
            for p in st.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    return path


def peak(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int, str]:
    """(peak RSS in MB, seconds, exit status, the command's last stderr line) of `cmd` run in its own process."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], env=env, capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    kb, rc = lines[-1].split()
    return int(kb) / 1024, time.perf_counter() - t0, int(rc), lines[-2] if len(lines) > 1 else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="balanced", help="embedded model tier (default balanced)")
    ap.add_argument("--frames", type=int, default=3, help="frames in the test clip (default 3)")
    ap.add_argument("--tile", type=int, default=256, help="the tiled runs' --tile (default 256)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="image,transcode,stream", help="which commands to run (default all three)")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cli = [str(Path(sys.executable).with_name("esc-video"))]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        pictures = frames(args.frames)
        still = d / "still.png"
        Image.fromarray(pictures[0]).save(still)
        clip = write_clip(d / "clip.mp4", pictures)
        common = ["--model", args.model, "--device", "cpu"]
        runs = {
            "image": [*cli, "image", str(still), str(d / "out.png"), *common],
            "transcode": [*cli, "transcode", str(clip), str(d / "out.mp4"), "--overwrite", "--quiet", *common],
            "stream": [*cli, "stream", str(clip), str(d / "out.mkv"), "--overwrite", "--quiet", *common],
        }
        print(f"peak RSS, 960x540 -> 1920x1080, model {args.model}, {args.frames} frames, {args.threads} threads")
        # what every run pays before any frame: the interpreter and `import torch` (a CUDA build maps its libraries)
        mb, sec, rc, _ = peak([sys.executable, "-c", "import torch"], env)
        print(f"  {'baseline':<10} {'import torch':<12} {mb:8.0f} MB  {sec:7.1f} s  exit {rc}", flush=True)
        for name, cmd in runs.items():
            if name not in args.runs.split(","):
                continue
            for tiled in (False, True):
                (d / "out.png").unlink(missing_ok=True)
                mb, sec, rc, last = peak(cmd + (["--tile", str(args.tile)] if tiled else []), env)
                how = f"--tile {args.tile}" if tiled else "whole frame"
                note = f"  ({last})" if rc else ""
                print(f"  {name:<10} {how:<12} {mb:8.0f} MB  {sec:7.1f} s  exit {rc}{note}", flush=True)


if __name__ == "__main__":
    main()
