"""What the `esc-video` commands share: argument types, the model and encoder option groups, the output size
asked for, loading the upscaler, the progress line and signal handling.

Importing this module is cheap (no torch, no PyAV): the parser is built on every run, `--help` included.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import EscError, UserError

# ---- argument types: each turns a bad value into argparse's one-line usage error -------------------------


def whole_number(minimum: int, wording: str) -> Callable[[str], int]:
    """argparse type: an int >= minimum, with a one-line message otherwise."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be {wording}, got {v}")
        return v

    return parse


positive = whole_number(1, "at least 1")
non_negative = whole_number(0, "0 or more")


def scale_factor(text: str) -> int | float:
    """argparse type: a scale factor; whole numbers come back as int (the ESC models' scales)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= v <= 32:
        raise argparse.ArgumentTypeError(f"must be between 1 and 32, got {text}")
    return int(v) if v.is_integer() else v


def frame_size(text: str) -> tuple[int, int]:
    """argparse type: WIDTHxHEIGHT, at least 2x2."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use WIDTHxHEIGHT, e.g. 1920x1080)") from None
    if w < 2 or h < 2:
        raise argparse.ArgumentTypeError(f"size must be at least 2x2, got {text!r}")
    return w, h


def seconds(text: str) -> float:
    """argparse type: an ffmpeg-style time: 12.5, 01:30, 1:02:03.5."""
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {text!r} (use seconds or [HH:]MM:SS[.ms])") from None
    if len(parts) > 3 or any(p < 0 for p in parts):
        raise argparse.ArgumentTypeError(f"not a time: {text!r}")
    value = 0.0
    for p in parts:
        value = value * 60 + p
    return value


def positive_seconds(text: str) -> float:
    """argparse type: a time (as `seconds`) longer than 0."""
    value = seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text!r}")
    return value


def key_value(text: str) -> tuple[str, str]:
    """argparse type: KEY=VALUE."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    k, v = text.split("=", 1)
    return k, v


# ---- option groups -------------------------------------------------------------------------------------------


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Which model runs, where and how: shared by image, transcode, stream and batch (read by `load_upscaler`)."""
    p.add_argument("--weights", type=Path, help="ESC checkpoint (.pth from the official release, or .safetensors)")
    p.add_argument("--model", help="embedded model: fast or balanced (default balanced; stream: fast); "
                   "`esc-video models` lists them. --weights wins")  # fmt: skip
    p.add_argument("--scale", type=scale_factor,
                   help="2, 3 or 4 (default 2); any, e.g. 1.5, with an arbitrary-scale model")  # fmt: skip
    p.add_argument("--tile", type=positive, help="tile side in input pixels (default: whole frame)")
    p.add_argument("--overlap", type=non_negative, default=64, help="context pixels around each tile (default 64)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, or auto (CUDA when present; default cpu)")
    p.add_argument("--size", type=frame_size, help="exact output size WxH: model scale, then a Lanczos resample")
    p.add_argument("--width", type=positive, help="output width (height follows the display aspect)")
    p.add_argument("--height", type=positive, help="output height (width follows the display aspect)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="network precision (float16 needs CUDA; default float32)")  # fmt: skip
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                   help="inference back-end on the CPU (default torch; see README 'CPU speed and ONNX')")  # fmt: skip


def add_encoder_args(p: argparse.ArgumentParser, codec: str = "default libx264; vp9 for .webm",
                     preset: str = "x264 default: medium", extra: str = "") -> None:  # fmt: skip
    """The ffmpeg-named encoder options shared by transcode, stream and batch (read by `encoder_choices`)."""
    p.add_argument("-c:v", "--codec", dest="codec", help=f"video encoder ({codec})")
    p.add_argument("--crf", type=non_negative, help="quality for x264/x265/vp9/av1 (default 18 for x264)")
    p.add_argument("--preset", help=f"encoder preset ({preset})")
    p.add_argument("--pix-fmt", dest="pix_fmt", help="output pixel format (default: follows the source)")
    p.add_argument("-e", dest="encoder_option", type=key_value, action="append", metavar="KEY=VALUE",
                   help=f"extra encoder option, repeatable{extra}")  # fmt: skip


def add_copy_args(p: argparse.ArgumentParser) -> None:
    """Which streams besides the video are copied (read by `transcode_options`)."""
    p.add_argument("--no-audio", action="store_true", help="drop audio streams")
    p.add_argument("--no-subtitles", action="store_true", help="drop subtitle streams")


def encoder_choices(args: argparse.Namespace) -> dict[str, Any]:
    """The encoder options of `add_encoder_args`, as keyword arguments of TranscodeOptions/StreamOptions."""
    return {
        "codec": args.codec,
        "crf": args.crf,
        "preset": args.preset,
        "pix_fmt": args.pix_fmt,
        "encoder_options": dict(args.encoder_option or []),
    }


def transcode_options(args: argparse.Namespace, size: tuple[int | None, int | None] | None = None) -> Any:
    """TranscodeOptions from the encoder and copy flags and --overwrite (and --start/--duration/--resume where
    the command has them); `size` is the exact output size, None for the model's scale."""
    from ..video.transcode import TranscodeOptions

    return TranscodeOptions(
        **encoder_choices(args),
        audio=not args.no_audio,
        subtitles=not args.no_subtitles,
        overwrite=args.overwrite,
        start=getattr(args, "start", 0.0),
        duration=getattr(args, "duration", None),
        resume=getattr(args, "resume", False),
        size=size,
    )


def requested_size(
    args: argparse.Namespace, dims: tuple[int, int] | None = None, even: bool = False
) -> tuple[int | None, int | None] | None:
    """The output size asked for: --size, --width/--height, or a --scale no model has (given the input `dims`)."""
    factor = getattr(args, "scale", None)
    fractional = needs_resample(args)
    if args.size and (args.width or args.height):
        raise UserError("give --size or --width/--height, not both")
    if fractional and (args.size or args.width or args.height):
        raise UserError(f"give --scale {factor} or an output size, not both")
    if args.size:
        return args.size
    if args.width or args.height:
        return args.width, args.height
    if fractional:
        if dims is None:
            raise UserError(f"--scale {factor}: the input's size is not known in advance; use --size/--width/--height")
        step = 2 if even else 1  # 4:2:0 video needs even sides
        f = float(args.scale)
        return max(step, round(dims[0] * f / step) * step), max(step, round(dims[1] * f / step) * step)
    return None


# ---- the model -----------------------------------------------------------------------------------------------


def model_tier(args: argparse.Namespace) -> str:
    """The embedded tier the flags ask for: --model, else fast for `stream` (live needs speed), else balanced;
    UserError listing the tiers for an unknown name."""
    from ..upscaler import DEFAULT_TIER, check_tier

    if args.model is None:
        return "fast" if getattr(args, "command", "") == "stream" else DEFAULT_TIER
    return check_tier(args.model)


def needs_resample(args: argparse.Namespace) -> bool:
    """True when the --scale asked for is run at another model scale and resampled: a scale no model has (1.5),
    or an embedded tier that does not ship this whole scale."""
    from ..upscaler import EmbeddedModel

    factor = getattr(args, "scale", None)
    if factor is None:
        return False
    if factor not in (2, 3, 4):
        return True
    return getattr(args, "weights", None) is None and not EmbeddedModel(int(factor), model_tier(args)).exists()


def model_scale_for(factor: float, tier: str) -> int:
    """The smallest scale of the tier's embedded models that reaches `factor` (else the largest one shipped)."""
    from ..upscaler import embedded_models

    shipped = [m.scale for m in embedded_models(tier)] or [2]
    return min((k for k in shipped if k >= factor), default=max(shipped))


def load_upscaler(args: argparse.Namespace) -> Any:
    """The Upscaler the model options of `add_model_args` describe; UserError (one line) when it cannot be had.
    Says on stderr which model runs when that is not what was asked for (a resampled scale, --weights over
    --model); `stream` names it once frames flow and in its summary."""
    import torch

    from ..devices import resolve_device
    from ..upscaler import load

    args.device = str(resolve_device(args.device))  # "auto": the CUDA path (esc_stream/cuda) when torch sees a GPU
    tier = model_tier(args)
    # A scale other than 2/3/4: an arbitrary-scale checkpoint decodes it directly (image); a fixed-scale model runs
    # at the smallest scale that reaches it and the result is resampled to the exact size (see requested_size).
    # An embedded tier without this scale does the same, saying so.
    fixed = not needs_resample(args)
    stream = getattr(args, "command", "image") == "stream"
    if args.scale and not fixed and stream:
        raise UserError(f"--scale {args.scale}: no {tier} model has it and a live stream's size is known only once "
                        "it starts; use --size/--width/--height")  # fmt: skip
    dtype = getattr(torch, args.dtype)
    if dtype == torch.float16 and not args.device.startswith("cuda"):
        raise UserError("--dtype float16 needs a CUDA device; use bfloat16 or float32 on the CPU")
    scale = args.scale if fixed and args.scale else model_scale_for(args.scale or 2, tier)
    try:
        up = load(args.weights, scale=scale, model=tier, device=args.device, dtype=dtype, tile=args.tile,
                  overlap=args.overlap, backend=getattr(args, "backend", "torch"))  # fmt: skip
    except EscError:
        raise
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"--device {args.device}: {exc}") from None
    if args.weights is not None and fixed and args.scale and args.scale != up.scale and not up.arbitrary:
        raise UserError(f"--scale {args.scale} does not match {args.weights}, which is a x{up.scale} model")
    if args.weights is not None and args.model is not None:
        print(f"esc-video: --weights {args.weights} runs; --model {args.model} is ignored", file=sys.stderr)
    if args.weights is None and args.scale in (2, 3, 4) and not fixed:
        print(f"esc-video: no embedded {tier} model for x{args.scale}; running x{up.scale} and resampling",
              file=sys.stderr)  # fmt: skip
    if not up.pretrained:
        print(f"warning: {up.source}: the output shows no real upscaling quality", file=sys.stderr)
    return up


# ---- progress and signals ------------------------------------------------------------------------------------


class ProgressLine:
    """One self-overwriting status line on stderr: frames, fps, ETA."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, info: Any, elapsed: float) -> None:
        if self.quiet or (elapsed - self.last < (0.25 if self.tty else 5.0) and done != info.frames):
            return
        self.last = elapsed
        fps = done / elapsed if elapsed > 0 else 0.0
        total = info.frames
        if total > 0:
            left = max(total - done, 0) / fps if fps > 0 else 0.0
            approx = "~" if info.frames_estimated else ""
            text = f"frame {done}/{approx}{total} ({100 * done / max(total, 1):.0f}%)  {fps:.2f} fps  ETA {left:.0f} s"
        else:
            text = f"frame {done}  {fps:.2f} fps"
        print(("\r" if self.tty else "") + text, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def finish(self) -> None:
        if not self.quiet and self.tty:
            print(file=sys.stderr)


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event that SIGINT and SIGTERM set (the run then stops cleanly); the old handlers come back after."""
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextmanager
def sigterm_as_interrupt() -> Iterator[Callable[[], None]]:
    """Yields `arm`, which makes SIGTERM raise KeyboardInterrupt like Ctrl-C (call it once Ray is up: ray.init
    installs a handler of its own); the handler found on entry comes back on exit."""
    old = signal.getsignal(signal.SIGTERM)

    def arm() -> None:
        signal.signal(signal.SIGTERM, _interrupt)

    try:
        yield arm
    finally:
        signal.signal(signal.SIGTERM, old)
