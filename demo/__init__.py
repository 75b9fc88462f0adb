"""Web demo: `esc-video demo` / `python -m esc_stream.demo` serves a Gradio page that upscales images and short videos.

This module stays light (no Gradio, no torch) because `esc-video` builds its parser from it on every run.
Installed as `esc_stream.demo` (the repository keeps it in demo/); it uses esc-stream's public functions only.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use WIDTHxHEIGHT, e.g. 1280x720)") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError(f"size must be at least 16x16, got {text!r}")
    return w, h


def _at_least(minimum: float, kind: type = int, maximum: float = float("inf")):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not minimum <= v <= maximum:
            bound = f"between {minimum:g} and {maximum:g}" if maximum < float("inf") else f"at least {minimum:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return v

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's options, shared by `esc-video demo` and `python -m esc_stream.demo`."""
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine)")
    p.add_argument("--port", type=_at_least(1, int, 65535), default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--max-upload-mb", type=_at_least(1), default=100, help="largest upload in MB (default 100)")
    p.add_argument("--max-image-mp", type=_at_least(0.01, float), default=4.0,
                   help="largest input image in megapixels (default 4)")  # fmt: skip
    p.add_argument("--max-seconds", type=_at_least(0.1, float), default=20.0,
                   help="longest input video in seconds (default 20)")  # fmt: skip
    p.add_argument("--max-video-size", type=_size, default=(1280, 720),
                   help="largest input video WxH, either orientation (default 1280x720)")  # fmt: skip
    p.add_argument("--concurrency", type=_at_least(1), default=1, help="jobs running at once, all users (default 1)")
    p.add_argument("--queue-size", type=_at_least(1), default=16, help="jobs waiting at most (default 16)")


def run(args: argparse.Namespace) -> int:
    """Start the server and block until Ctrl-C. Returns an exit status."""
    from .service import Limits, Workspace

    limits = Limits(
        max_upload_mb=args.max_upload_mb,
        max_image_pixels=int(args.max_image_mp * 1_000_000),
        max_video_seconds=args.max_seconds,
        max_video_size=args.max_video_size,
        concurrency=args.concurrency,
        queue_size=args.queue_size,
    )
    workspace = Workspace()
    # Gradio's upload cache lives inside the demo's own folder, so stopping the demo removes every upload
    os.environ.setdefault("GRADIO_TEMP_DIR", str(workspace.root / "gradio"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a demo on a shared host does not phone home
    try:
        from .app import build_app, launch
    except ImportError as exc:
        workspace.close()
        print(f"esc-video: the web demo needs the demo extra (pip install 'esc-stream[demo]'): {exc}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {args.host}: anyone who can reach this port can use the demo", file=sys.stderr)
    try:
        app = build_app(limits, workspace)
        launch(app, limits, host=args.host, port=args.port)
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # the port is taken, the address is not this machine's
        print(f"esc-video: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    finally:
        workspace.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m esc_stream.demo", description="esc-stream web demo (Gradio, CPU)")
    add_arguments(ap)
    return run(ap.parse_args(argv))
