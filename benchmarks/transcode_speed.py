"""End-to-end transcode frames/s against model-only frames/s on the same clip.

    python benchmarks/transcode_speed.py [CLIP] [--weights FILE] [--frames N] [--tile N]

Model-only: the frames are decoded to RGB beforehand and only the upscaler is timed. End-to-end: the
whole `transcode` (decode ∥ upscale ∥ encode + mux). The pipeline's goal is end-to-end ≥ 90 % of model-only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import av
import torch

import esc_stream
from esc_stream.video.colour import frame_to_rgb
from esc_stream.video.probe import probe
from esc_stream.video.transcode import TranscodeOptions, transcode

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clip", nargs="?", default=str(ROOT / "examples" / "realvideo_demo000.mp4"))
    ap.add_argument("--weights")
    ap.add_argument("--frames", type=int, default=0, help="use only the first N frames (0: all)")
    ap.add_argument("--tile", type=int)
    args = ap.parse_args()

    up = esc_stream.load(args.weights, tile=args.tile)
    info = probe(args.clip)
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(args.clip)
        if args.frames:  # cut the clip so both measurements see the same frames
            clip = Path(tmp) / f"cut{clip.suffix}"
            with av.open(args.clip) as inp, av.open(str(clip), "w") as out:
                s = out.add_stream_from_template(inp.streams.video[0])
                n = 0
                for p in inp.demux(inp.streams.video[0]):
                    if p.dts is None:
                        continue
                    if n >= args.frames and p.is_keyframe:
                        break
                    p.stream = s
                    out.mux(p)
                    n += 1
        with av.open(str(clip)) as c:
            frames = [frame_to_rgb(f, info.colour) for f in c.decode(video=0)]
        up(frames[0])  # warm-up
        t0 = time.perf_counter()
        for f in frames:
            up(f)
        model_s = time.perf_counter() - t0
        result = transcode(clip, Path(tmp) / f"out{clip.suffix}", up, TranscodeOptions(overwrite=True))
    n = len(frames)
    model_fps, e2e_fps = n / model_s, result.frames / result.seconds
    name = Path(args.clip).name
    print(f"{name} {info.width}x{info.height} -> x{up.scale}, {n} frames, {up.variant} [{up.source}]")
    print(f"  torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"  model only : {model_fps:.3f} fps ({model_s:.1f} s)")
    print(f"  end to end : {e2e_fps:.3f} fps ({result.seconds:.1f} s)")
    print(f"  ratio      : {100 * e2e_fps / model_fps:.1f} % of model-only")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
