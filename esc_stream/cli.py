"""`esc-video`: the command line. Errors a user can cause become one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__

EXIT_USAGE = 2


class UserError(Exception):
    """A problem with the user's input, reported as one line."""


def _whole_number(minimum: int, wording: str):
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


_positive = _whole_number(1, "at least 1")
_non_negative = _whole_number(0, "0 or more")


def _scale(text: str) -> int | float:
    """argparse type: a scale factor; whole numbers come back as int (the ESC models' scales)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= v <= 32:
        raise argparse.ArgumentTypeError(f"must be between 1 and 32, got {text}")
    return int(v) if v.is_integer() else v


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", type=Path, help="ESC checkpoint (.pth from the official release, or .safetensors)")
    p.add_argument("--scale", type=_scale, help="2, 3 or 4 (default 2); any, e.g. 1.5, with an arbitrary-scale model")
    p.add_argument("--tile", type=_positive, help="tile side in input pixels (default: whole frame)")
    p.add_argument("--overlap", type=_non_negative, default=64, help="context pixels around each tile (default 64)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, or auto (CUDA when present; default cpu)")
    p.add_argument("--size", type=_size, help="exact output size WxH: model scale, then a Lanczos resample")
    p.add_argument("--width", type=_positive, help="output width (height follows the display aspect)")
    p.add_argument("--height", type=_positive, help="output height (width follows the display aspect)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="network precision (float16 needs CUDA; default float32)")  # fmt: skip
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                   help="inference engine on the CPU (default torch; see README 'CPU speed and ONNX')")  # fmt: skip


def model_scale_for(factor: float) -> int:
    """The smallest scale of the embedded default models that reaches `factor` (else the largest one shipped)."""
    from .upscaler import DefaultModel

    shipped = [k for k in (2, 3, 4) if DefaultModel(k).exists()] or [2]
    return min((k for k in shipped if k >= factor), default=max(shipped))


def _load_upscaler(args: argparse.Namespace):
    import torch

    from .backends import BackendError
    from .checkpoints import CheckpointError
    from .upscaler import load

    if args.device == "auto":  # the CUDA path (esc_stream/cuda) when torch sees a GPU
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine")
    # A scale other than 2/3/4: an arbitrary-scale checkpoint decodes it directly (image); a fixed-scale model runs
    # at the smallest scale that reaches it and the result is resampled to the exact size (see _requested_size).
    fixed = args.scale in (2, 3, 4)
    if args.scale and not fixed and getattr(args, "command", "image") == "stream":
        raise UserError(f"--scale {args.scale}: a live stream's size is known only once it starts; "
                        "use --size/--width/--height")  # fmt: skip
    try:
        dtype = getattr(torch, args.dtype)
        if dtype == torch.float16 and not args.device.startswith("cuda"):
            raise UserError("--dtype float16 needs a CUDA device; use bfloat16 or float32 on the CPU")
        scale = args.scale if fixed else model_scale_for(args.scale or 2)
        up = load(args.weights, scale=scale, device=args.device, dtype=dtype, tile=args.tile, overlap=args.overlap,
                  backend=getattr(args, "backend", "torch"))  # fmt: skip
    except (CheckpointError, BackendError) as exc:
        raise UserError(str(exc)) from None
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"--device {args.device}: {exc}") from None
    if args.weights is not None and fixed and args.scale != up.scale and not up.arbitrary:
        raise UserError(f"--scale {args.scale} does not match {args.weights}, which is a x{up.scale} model")
    return up


def _upscale_plane(up, plane: np.ndarray) -> np.ndarray:
    grey = np.repeat(plane[..., None], 3, axis=2)
    out = up(grey.astype(np.float32) / np.iinfo(plane.dtype).max)
    return np.rint(out.mean(axis=2) * np.iinfo(plane.dtype).max).astype(plane.dtype)


def _resample(arr: np.ndarray, w: int, h: int) -> np.ndarray:
    """Resize HxW(x3) integer pixels to w x h with antialiased bicubic (MATLAB semantics)."""
    import torch

    from .resize import imresize

    peak = float(np.iinfo(arr.dtype).max)
    x = torch.from_numpy(arr.astype(np.float64) / peak)
    x = x.permute(2, 0, 1) if x.ndim == 3 else x[None]
    y = imresize(x, size=(h, w)).clamp(0, 1)
    y = y.permute(1, 2, 0) if arr.ndim == 3 else y[0]
    return np.rint(y.numpy() * peak).astype(arr.dtype)


def cmd_image(args: argparse.Namespace) -> int:
    from .images import ImageError, Picture, check_output, read_image, write_image

    src, dst = Path(args.input), Path(args.output)
    if src.resolve() == dst.resolve():
        raise UserError(f"{dst}: output would overwrite the input")
    try:
        pic = read_image(src)
        check_output(dst, 16 if pic.rgb.dtype == np.uint16 else 8)
    except ImageError as exc:
        raise UserError(str(exc)) from None
    up = _load_upscaler(args)
    if not up.pretrained:
        print(f"warning: {up.source}: the output shows no real upscaling quality", file=sys.stderr)
    t0 = time.perf_counter()
    size = _requested_size(args, (pic.rgb.shape[1], pic.rgb.shape[0]))
    if up.arbitrary and (size or args.scale):  # the model decodes the exact output grid: no resample
        rgb, alpha = _arbitrary_image(up, pic, size, args.scale)
        size = None
    else:
        rgb = up(pic.rgb)
        alpha = _upscale_plane(up, pic.alpha) if pic.alpha is not None else None
    if size:
        from .video.colour import target_size

        w, h, _ = target_size(pic.rgb.shape[1], pic.rgb.shape[0], None, size)
        rgb = _resample(rgb, w, h)
        alpha = _resample(alpha, w, h) if alpha is not None else None
    dt = time.perf_counter() - t0
    try:
        write_image(dst, Picture(rgb, alpha))
    except ImageError as exc:
        raise UserError(str(exc)) from None
    h, w = pic.rgb.shape[:2]
    bits = 16 if pic.rgb.dtype == np.uint16 else 8
    print(
        f"{src} {w}x{h} -> {dst} {rgb.shape[1]}x{rgb.shape[0]} ({bits}-bit{', alpha' if alpha is not None else ''}) "
        f"with {up.variant} {'(any scale)' if up.arbitrary else f'x{up.scale}'} [{up.source}] in {dt:.2f} s"
    )
    return 0


def _arbitrary_image(up, pic, size, scale) -> tuple[np.ndarray, np.ndarray | None]:
    """RGB (and alpha) at the requested size, or at `scale`, straight from an arbitrary-scale model."""
    h, w = pic.rgb.shape[:2]
    if size:
        from .video.colour import target_size

        out_w, out_h, _ = target_size(w, h, None, size)
    else:
        out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    rgb = up.upscale_to(pic.rgb, (out_w, out_h))
    alpha = None
    if pic.alpha is not None:
        peak = np.iinfo(pic.alpha.dtype).max
        grey = np.repeat(pic.alpha[..., None], 3, axis=2).astype(np.float32) / peak
        alpha = np.rint(up.upscale_to(grey, (out_w, out_h)).mean(axis=2) * peak).astype(pic.alpha.dtype)
    return rgb, alpha


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoints import CheckpointError, load_model

    try:
        model, desc = load_model(args.weights)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    n = sum(p.numel() for p in model.parameters())
    kind = "any scale" if desc.arch == "ESCLTE" else f"x{desc.scale}"
    print(f"{args.weights}: {desc.variant} ({desc.arch}) {kind}, {n:,} parameters")
    for k, v in desc.config.items():
        print(f"  {k} = {v}")
    return 0


def _seconds(text: str) -> float:
    """ffmpeg-style time: 12.5, 01:30, 1:02:03.5."""
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


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use WIDTHxHEIGHT, e.g. 1920x1080)") from None
    if w < 2 or h < 2:
        raise argparse.ArgumentTypeError(f"size must be at least 2x2, got {text!r}")
    return w, h


def _requested_size(
    args: argparse.Namespace, dims: tuple[int, int] | None = None, even: bool = False
) -> tuple[int | None, int | None] | None:
    """The output size asked for: --size, --width/--height, or a --scale no model has (given the input `dims`)."""
    factor = getattr(args, "scale", None)
    fractional = factor is not None and factor not in (2, 3, 4)
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


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    k, v = text.split("=", 1)
    return k, v


class _ProgressLine:
    """One self-overwriting status line on stderr: frames, fps, ETA."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, info, elapsed: float) -> None:
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


def cmd_probe(args: argparse.Namespace) -> int:
    from .video.probe import VideoError, probe

    try:
        print(probe(args.input).describe())
    except VideoError as exc:
        raise UserError(str(exc)) from None
    return 0


def cmd_transcode(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .video.probe import VideoError, is_live, probe
    from .video.transcode import TranscodeOptions, _check_paths, output_format, output_geometry, transcode

    live = is_live(args.input)  # "-" or a URL: opened once by transcode itself, so not probed here
    src, dst = (args.input if live else Path(args.input)), Path(args.output)
    opts = TranscodeOptions(
        codec=args.codec,
        crf=args.crf,
        preset=args.preset,
        pix_fmt=args.pix_fmt,
        encoder_options=dict(args.encoder_option or []),
        audio=not args.no_audio,
        subtitles=not args.no_subtitles,
        overwrite=args.overwrite,
        start=args.start,
        duration=args.duration,
        resume=args.resume,
        size=None,  # set below, once the input has been probed (a fractional --scale needs its size)
    )
    try:  # everything about the input and output is checked before the model loads
        _check_paths(src, dst, opts.overwrite)
        output_format(dst)
        info = None if live else probe(src)
    except VideoError as exc:
        raise UserError(str(exc)) from None
    opts.size = _requested_size(args, None if info is None else (info.width, info.height), even=True)
    if args.ray is not None:  # segments as Ray tasks; Ray is imported on this path only
        from .scaleout.command import transcode_on_ray

        return transcode_on_ray(args, opts)
    up = _load_upscaler(args)
    if not up.pretrained:
        print(f"warning: {up.source}: the output shows no real upscaling quality", file=sys.stderr)
    if not args.quiet and info is not None:
        print(info.describe(), file=sys.stderr)
        out_w, out_h, _ = output_geometry(info, up.scale, opts)
        resample = "" if (out_w, out_h) == (info.width * up.scale, info.height * up.scale) else ", then Lanczos"
        print(f"-> {dst}: {out_w}x{out_h} with {up.variant} x{up.scale}{resample} [{up.source}]",
              file=sys.stderr)  # fmt: skip
    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = _ProgressLine(args.quiet)
    try:
        result = transcode(src, dst, up, opts, progress=bar, stop=stop)
    except VideoError as exc:
        raise UserError(str(exc)) from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        bar.finish()
    for span in result.bad_spans:
        print(f"warning: {src}: {span}", file=sys.stderr)
    if result.resumed_from is not None:
        print(f"resumed at {result.resumed_from:.3f} s from {dst}.partial", file=sys.stderr)
    if result.stopped:
        kept = f"partial output kept in {result.output}" if result.output.exists() else "nothing was written"
        print(f"esc-video: stopped after {result.frames} frames; {kept}", file=sys.stderr)
        return 130
    print(f"{dst}: {result.frames} frames in {result.seconds:.1f} s ({result.fps:.2f} fps), "
          f"{result.output_bytes / 1e6:.2f} MB")  # fmt: skip
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    """Live input to live output; the work is in video/stream.py, this only wires flags, signals and messages."""
    import signal
    import threading

    from .video.probe import VideoError
    from .video.stream import StreamOptions, check_output, stream

    opts = StreamOptions(
        format=args.format,
        input_format=args.input_format,
        input_options=dict(args.input_option or []),
        codec=args.codec,
        crf=args.crf,
        preset=args.preset,
        pix_fmt=args.pix_fmt,
        encoder_options=dict(args.encoder_option or []),
        size=_requested_size(args),
        audio=not args.no_audio,
        realtime=args.realtime,
        max_latency=args.max_latency,
        reconnect=args.reconnect,
        timeout=args.timeout,
        native_rate=args.re,
        overwrite=args.overwrite,
        stats_every=0 if args.quiet else args.stats_every,
    )
    try:
        check_output(args.input, args.output, opts)
    except VideoError as exc:
        raise UserError(str(exc)) from None
    up = _load_upscaler(args)
    if not up.pretrained:
        print(f"warning: {up.source}: the output shows no real upscaling quality", file=sys.stderr)
    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stats = stream(args.input, args.output, up, opts, stop=stop,
                       report=lambda st: print(f"esc-video: {st.line()}", file=sys.stderr, flush=True))  # fmt: skip
    except VideoError as exc:
        raise UserError(str(exc)) from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    # stdout may be the video itself: every message goes to stderr
    how = "stopped by signal" if stats.stopped else "input ended"
    print(f"esc-video: {how}; {stats.output or 'nothing written'}: {stats.frames_out} of {stats.frames_in} frames "
          f"in {stats.seconds:.1f} s ({stats.fps:.2f} fps), dropped {stats.dropped}, bad packets {stats.bad_packets}, "
          f"latency median {stats.median:.2f} s, p95 {stats.p95:.2f} s", file=sys.stderr)  # fmt: skip
    return 0


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text!r}")
    return value


def _add_stream_parser(sub) -> None:
    p = sub.add_parser("stream", help="upscale a live stream: stdin/stdout or URLs, bounded latency, audio kept")
    p.add_argument("input", help="- (stdin), a URL (tcp://, udp://, srt://, rtmp://, http://) or a file")
    p.add_argument("output", help="- (stdout), a URL (tcp://, udp://, srt://, rtmp://) or a file")
    _add_model_args(p)
    p.add_argument("-f", dest="format", help="output container (default: mpegts for - and URLs, flv for rtmp://)")
    p.add_argument("--input-format", help="input container, for inputs FFmpeg cannot recognise (e.g. h264)")
    p.add_argument("--input-option", dest="input_option", type=_key_value, action="append", metavar="KEY=VALUE",
                   help="input/protocol option, repeatable (e.g. listen=1)")  # fmt: skip
    _add_encoder_args(p, codec="default libx264, tuned for zero latency", preset="x264 default here: veryfast",
                      extra="; overrides the low-delay defaults")  # fmt: skip
    p.add_argument("--realtime", choices=("block", "drop"), default="block",
                   help="upscaling slower than the source: block it (default) or drop the oldest frames")  # fmt: skip
    p.add_argument("--max-latency", type=_positive_seconds, default=2.0,
                   help="with --realtime drop: latency to keep each frame under (default 2 s)")  # fmt: skip
    p.add_argument("--reconnect", action="store_true", help="reopen a URL input when it ends or fails, until stopped")
    p.add_argument("--timeout", type=_positive_seconds, help="give up on an input silent (or output stalled) this long")
    p.add_argument("--re", action="store_true", help="read the input no faster than its timestamps (like ffmpeg -re)")
    p.add_argument("--no-audio", action="store_true", help="drop audio streams")
    p.add_argument("--overwrite", action="store_true", help="replace a file OUTPUT if it exists")
    p.add_argument("--stats-every", type=_positive_seconds, default=5.0, help="seconds between stats lines (default 5)")
    p.add_argument("--quiet", action="store_true", help="no stats lines")
    p.set_defaults(func=cmd_stream)


def _add_encoder_args(p: argparse.ArgumentParser, codec: str = "default libx264; vp9 for .webm",
                      preset: str = "x264 default: medium", extra: str = "") -> None:  # fmt: skip
    """The ffmpeg-named encoder options shared by transcode, stream and batch."""
    p.add_argument("-c:v", "--codec", dest="codec", help=f"video encoder ({codec})")
    p.add_argument("--crf", type=_non_negative, help="quality for x264/x265/vp9/av1 (default 18 for x264)")
    p.add_argument("--preset", help=f"encoder preset ({preset})")
    p.add_argument("--pix-fmt", dest="pix_fmt", help="output pixel format (default: follows the source)")
    p.add_argument("-e", dest="encoder_option", type=_key_value, action="append", metavar="KEY=VALUE",
                   help=f"extra encoder option, repeatable{extra}")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="esc-video", description="Upscale video and images with ESC.")
    ap.add_argument("--version", action="version", version=f"esc-stream {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("image", help="upscale one image (PNG/JPEG/...; 16-bit PNG and alpha kept)")
    p.add_argument("input", help="input image")
    p.add_argument("output", help="output image (written under a temporary name, then renamed)")
    _add_model_args(p)
    p.set_defaults(func=cmd_image)

    p = sub.add_parser("transcode", help="upscale a video file, keeping audio, subtitles, timing and colour")
    p.add_argument("input", help="input video (never written)")
    p.add_argument("output", help="output video; written as OUTPUT.partial, renamed when complete")
    _add_model_args(p)
    _add_encoder_args(p)
    p.add_argument("--no-audio", action="store_true", help="drop audio streams")
    p.add_argument("--no-subtitles", action="store_true", help="drop subtitle streams")
    p.add_argument("--start", type=_seconds, default=0.0, help="start at T (seconds or [HH:]MM:SS[.ms])")
    p.add_argument("--duration", type=_seconds, help="stop after T (seconds or [HH:]MM:SS[.ms])")
    p.add_argument("--resume", action="store_true", help="continue OUTPUT.partial from its last complete GOP")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT (and OUTPUT.partial) if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    from .scaleout.command import add_batch_parser, add_ray_options

    add_ray_options(p, segments=True)
    p.set_defaults(func=cmd_transcode)
    add_batch_parser(sub)
    _add_stream_parser(sub)

    p = sub.add_parser("probe", help="show what transcode would do with a file")
    p.add_argument("input")
    p.set_defaults(func=cmd_probe)

    from .onnx_export import add_export_parser

    add_export_parser(sub)

    p = sub.add_parser("info", help="describe a checkpoint: variant, scale, hyper-parameters")
    p.add_argument("weights", type=Path)
    p.set_defaults(func=cmd_info)

    import demo  # the web demo's options live with it (a light module: no Gradio until it starts)

    p = sub.add_parser("demo", help="web demo (Gradio) on 127.0.0.1: upscale images and short videos in a browser")
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"esc-video: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("esc-video: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("esc-video: out of memory; try a smaller --tile", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, permissions, a file vanishing mid-run
        print(f"esc-video: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        import av

        if isinstance(exc, av.error.FFmpegError):
            print(f"esc-video: FFmpeg: {exc}", file=sys.stderr)
            return 1
        print(f"esc-video: internal error: {type(exc).__name__}: {exc} (please report it)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
