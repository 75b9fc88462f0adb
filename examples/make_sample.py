"""Rebuild examples/realvideo_demo000.mp4 from ../shared/data/realvideo_demo000 (Apache-2.0, RealBasicVSR).

31 real camera frames, downscaled to 320x180, H.264 at 25 fps, with a quiet 440 Hz AAC tone so that
`make example` shows the audio surviving the transcode.  Run: python examples/make_sample.py
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from media import demo_frames, make_clip  # noqa: E402

if __name__ == "__main__":
    frames = demo_frames(31, size=(320, 180))
    colour = {"colorspace": 5, "color_primaries": 5, "color_trc": 6, "color_range": 1}  # BT.601 SD, limited
    x264 = {"crf": "20", "preset": "slow"}
    out = make_clip(HERE / "realvideo_demo000.mp4", frames, audio=True, colour=colour, x264=x264)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
