"""`esc-video`: the command line. One module per command family; what they share is in `common`.

Errors a user can cause (every `EscError`) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import EscError
from . import image, model, scaleout, video

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="esc-video", description="Upscale video and images with ESC.")
    ap.add_argument("--version", action="version", version=f"esc-stream {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    image.add_parser(sub)
    video.add_transcode_parser(sub)
    scaleout.add_batch_parser(sub)
    video.add_stream_parser(sub)
    video.add_probe_parser(sub)
    model.add_models_parser(sub)
    model.add_export_parser(sub)
    model.add_info_parser(sub)

    # the web demo's options live with it (a light module: no Gradio until it starts)
    from ..demo import add_arguments as add_demo_arguments
    from ..demo import run as run_demo

    p = sub.add_parser("demo", help="web demo (Gradio) on 127.0.0.1: upscale images and short videos in a browser")
    add_demo_arguments(p)
    p.set_defaults(func=run_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "model", None) is not None:  # before any file is looked at: one line naming the tiers
            from ..upscaler import check_tier

            check_tier(args.model)
        return int(args.func(args))
    except EscError as exc:
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


__all__ = ["build_parser", "main"]
