"""Wall time of one transcode: single process vs segments on a local Ray runtime, and the cost of segmenting.

    python benchmarks/scaleout.py [CLIP] [--repeat 4] [--width 160] [--gop 25] [--segment 1] [--workers 2]

Without CLIP, the bundled 320x180 clip (resized to `--width`, 0 keeps it) is looped `--repeat` times
(keyframe every `--gop` frames, lossless x264 source, a 440 Hz tone as audio) so that there is enough
work to split. The figures:

  single process   `transcode` with 1 torch thread, and with `--workers` threads (the cores Ray gets)
  segmented local  the same segments done one after another in this process with 1 thread: the
                   difference to the 1-thread single run is the whole price of splitting (seek, decode up
                   to the next keyframe, one encoder per segment) and of the join
  Ray              the segments as tasks on a local Ray runtime with `--workers` CPUs, one torch thread each
                   (start-up of the runtime printed apart)
  split / join     the planning (keyframe scan, encoder and model checks) and the lossless join alone
  same frames      the Ray output against the 1-thread single run, decoded (both lossless). Against the
                   multi-thread run a few pixels may differ by one level: CPU convolutions sum in another
                   order with another thread count, segmented or not.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

import esc_stream
from esc_stream.scaleout.segments import ModelSpec, local_runner, run_segmented
from esc_stream.video.probe import probe
from esc_stream.video.transcode import TranscodeOptions, transcode

ROOT = Path(__file__).resolve().parents[1]


def make_long_clip(src: Path, dst: Path, repeat: int, gop: int, width: int) -> Path:
    """Loop `src`'s frames `repeat` times (forwards, then backwards, so there is no jump) into `dst`."""
    with av.open(str(src)) as c:
        v = c.streams.video[0]
        height = round(v.height * width / v.width / 2) * 2 if width else v.height
        frames = [f.to_ndarray(format="rgb24", width=width or v.width, height=height) for f in c.decode(v)]
    frames = [f for i in range(repeat) for f in (frames if i % 2 == 0 else frames[::-1])]
    rate = 25
    with av.open(str(dst), "w") as out:
        vs = out.add_stream("libx264", rate=rate)
        vs.width, vs.height, vs.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        vs.codec_context.options = {"crf": "0", "preset": "ultrafast", "g": str(gop), "keyint_min": str(gop)}
        a = out.add_stream("aac", rate=48000)
        a.layout = "stereo"
        for i, rgb in enumerate(frames):
            f = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            f.pts, f.time_base = i, Fraction(1, rate)
            out.mux(vs.encode(f))
        out.mux(vs.encode(None))
        n = 48000 * len(frames) // rate
        wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / 48000)).astype(np.float32)
        for start in range(0, n, 1024):
            chunk = np.ascontiguousarray(np.stack([wave, wave])[:, start : start + 1024])
            af = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            af.sample_rate, af.pts = 48000, start
            out.mux(a.encode(af))
        out.mux(a.encode(None))
    return dst


def same_frames(a: Path, b: Path) -> bool:
    with av.open(str(a)) as ca, av.open(str(b)) as cb:
        fa, fb = ca.decode(video=0), cb.decode(video=0)
        return all(np.array_equal(x.to_ndarray(), y.to_ndarray()) for x, y in zip(fa, fb, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clip", nargs="?", help="a video file (default: the bundled clip, looped)")
    ap.add_argument("--repeat", type=int, default=4, help="loops of the bundled 31-frame clip (default 4)")
    ap.add_argument("--width", type=int, default=160, help="width of the looped clip (default 160; 0: 320)")
    ap.add_argument("--gop", type=int, default=25, help="keyframe interval of the looped clip (default 25)")
    ap.add_argument("--segment", type=float, default=1.0, help="shortest segment in seconds (default 1)")
    ap.add_argument("--workers", type=int, default=2, help="Ray CPUs, and torch threads of the single run")
    ap.add_argument("--weights", help="checkpoint (default: the embedded default model)")
    ap.add_argument("--skip-local", action="store_true", help="skip the in-process segmented run")
    args = ap.parse_args()

    import ray

    from esc_stream.scaleout.ray_runner import RayRunner, connect

    opts = TranscodeOptions(crf=0, preset="ultrafast")  # lossless: the outputs must match frame for frame
    spec = ModelSpec(args.weights)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        clip = Path(args.clip) if args.clip else make_long_clip(ROOT / "examples" / "realvideo_demo000.mp4",
                                                                d / "long.mkv", args.repeat, args.gop,
                                                                args.width)  # fmt: skip
        info = probe(clip)
        up = esc_stream.load(args.weights)
        print(f"{clip.name}: {info.width}x{info.height}, {info.frames} frames, {info.duration or 0:.1f} s -> "
              f"x{up.scale} with {up.variant} [{up.source}]")  # fmt: skip
        print(f"  torch {torch.__version__}, ray {ray.__version__}, {args.workers} workers, lossless x264 output")
        torch.set_num_threads(1)
        single = transcode(clip, d / "single.mkv", up, opts)
        print(f"  single process   : {single.seconds:7.1f} s  ({single.fps:.2f} fps, 1 torch thread)")
        torch.set_num_threads(args.workers)
        multi = transcode(clip, d / "multi.mkv", up, opts)
        print(f"  single process   : {multi.seconds:7.1f} s  ({multi.fps:.2f} fps, {args.workers} torch threads)")
        torch.set_num_threads(1)
        if not args.skip_local:
            local = run_segmented(clip, d / "local.mkv", spec, opts, runner=local_runner, segment_seconds=args.segment)
            print(f"  segmented local  : {local.seconds:7.1f} s  ({local.segments} segments, 1 process, 1 thread; "
                  f"plan {local.plan_seconds:.2f} s, join {local.join_seconds:.2f} s)")  # fmt: skip
        t0 = time.perf_counter()
        with connect(None, args.workers):
            started = time.perf_counter() - t0
            result = run_segmented(clip, d / "ray.mkv", spec, opts, runner=RayRunner(),
                                   segment_seconds=args.segment)  # fmt: skip
        print(f"  Ray              : {result.seconds:7.1f} s  ({result.segments} segments on {args.workers} workers; "
              f"runtime start-up {started:.1f} s more)")  # fmt: skip
        share = 100 * (result.plan_seconds + result.join_seconds) / result.seconds
        print(f"  split / join     : plan {result.plan_seconds:.2f} s, segments {result.encode_seconds:.1f} s, "
              f"join {result.join_seconds:.2f} s ({share:.1f} % of the Ray run)")  # fmt: skip
        print(f"  speed-up         : {single.seconds / result.seconds:.2f}x over 1 thread, "
              f"{multi.seconds / result.seconds:.2f}x over {args.workers} threads")  # fmt: skip
        print(f"  same frames      : {same_frames(d / 'single.mkv', d / 'ray.mkv')}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
