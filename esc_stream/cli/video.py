"""`esc-video transcode`, `stream` and `probe`: video files and live streams.

This only wires flags, signals and messages; the work is in esc_stream.video (transcode.py, stream.py).
`transcode --ray` hands over to the scale-out commands (cli/scaleout.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .common import (
    ProgressLine,
    add_copy_args,
    add_encoder_args,
    add_model_args,
    encoder_choices,
    key_value,
    load_upscaler,
    positive_seconds,
    requested_size,
    seconds,
    stop_on_signals,
    transcode_options,
)


def add_transcode_parser(sub: Any) -> None:
    from .scaleout import add_ray_options

    p = sub.add_parser("transcode", help="upscale a video file, keeping audio, subtitles, timing and colour")
    p.add_argument("input", help="input video (never written)")
    p.add_argument("output", help="output video; written as OUTPUT.partial, renamed when complete")
    add_model_args(p)
    add_encoder_args(p)
    add_copy_args(p)
    p.add_argument("--start", type=seconds, default=0.0, help="start at T (seconds or [HH:]MM:SS[.ms])")
    p.add_argument("--duration", type=seconds, help="stop after T (seconds or [HH:]MM:SS[.ms])")
    p.add_argument("--resume", action="store_true", help="continue OUTPUT.partial from its last complete GOP")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT (and OUTPUT.partial) if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_ray_options(p, segments=True)
    p.set_defaults(func=cmd_transcode)


def add_stream_parser(sub: Any) -> None:
    p = sub.add_parser("stream", help="upscale a live stream: stdin/stdout or URLs, bounded latency, audio kept")
    p.add_argument("input", help="- (stdin), a URL (tcp://, udp://, srt://, rtmp://, http://) or a file")
    p.add_argument("output", help="- (stdout), a URL (tcp://, udp://, srt://, rtmp://) or a file")
    add_model_args(p)
    p.add_argument("-f", dest="format", help="output container (default: mpegts for - and URLs, flv for rtmp://)")
    p.add_argument("--input-format", help="input container, for inputs FFmpeg cannot recognise (e.g. h264)")
    p.add_argument("--input-option", dest="input_option", type=key_value, action="append", metavar="KEY=VALUE",
                   help="input/protocol option, repeatable (e.g. listen=1)")  # fmt: skip
    add_encoder_args(p, codec="default libx264, tuned for zero latency", preset="x264 default here: veryfast",
                     extra="; overrides the low-delay defaults")  # fmt: skip
    p.add_argument("--realtime", choices=("block", "drop"), default="block",
                   help="upscaling slower than the source: block it (default) or drop the oldest frames")  # fmt: skip
    p.add_argument("--max-latency", type=positive_seconds, default=2.0,
                   help="with --realtime drop: latency to keep each frame under (default 2 s)")  # fmt: skip
    p.add_argument("--reconnect", action="store_true", help="reopen a URL input when it ends or fails, until stopped")
    p.add_argument("--timeout", type=positive_seconds, help="give up on an input silent (or output stalled) this long")
    p.add_argument("--re", action="store_true", help="read the input no faster than its timestamps (like ffmpeg -re)")
    p.add_argument("--no-audio", action="store_true", help="drop audio streams")
    p.add_argument("--overwrite", action="store_true", help="replace a file OUTPUT if it exists")
    p.add_argument("--stats-every", type=positive_seconds, default=5.0, help="seconds between stats lines (default 5)")
    p.add_argument("--quiet", action="store_true", help="no stats lines")
    p.set_defaults(func=cmd_stream)


def add_probe_parser(sub: Any) -> None:
    p = sub.add_parser("probe", help="show what transcode would do with a file")
    p.add_argument("input")
    p.set_defaults(func=cmd_probe)


def cmd_probe(args: argparse.Namespace) -> int:
    from ..video.probe import probe

    print(probe(args.input).describe())
    return 0


def cmd_transcode(args: argparse.Namespace) -> int:
    from ..video.encode import check_output_path, choose_codec, metadata_warnings, output_format
    from ..video.probe import is_live, probe
    from ..video.transcode import output_geometry, transcode

    live = is_live(args.input)  # "-" or a URL: opened once by transcode itself, so not probed here
    src, dst = (args.input if live else Path(args.input)), Path(args.output)
    # everything about the input and output is checked before the model loads
    check_output_path(src, dst, args.overwrite)
    fmt = output_format(dst)
    info = None if live else probe(src)
    # a fractional --scale needs the input's size, known once it has been probed
    opts = transcode_options(args, requested_size(args, None if info is None else (info.width, info.height), True))
    if info is not None:
        for line in metadata_warnings(info, choose_codec(info, opts, fmt)):
            print(f"warning: {line}", file=sys.stderr)
    if args.ray is not None:  # segments as Ray tasks; Ray is imported on this path only
        from .scaleout import transcode_on_ray

        return transcode_on_ray(args, opts)
    up = load_upscaler(args)
    if info is not None:  # a live input's size is known once it starts: stream/transcode check it there
        from ..budget import check_memory

        out_w, out_h, _ = output_geometry(info, up.scale, opts)
        # refused before the model runs when a frame cannot fit; the pipeline's queue holds `depth` more outputs
        check_memory(up, info.width, info.height, out_size=(out_w, out_h), in_flight=opts.depth + 1, what=str(src))
    if not args.quiet and info is not None:
        print(info.describe(), file=sys.stderr)
        resample = "" if (out_w, out_h) == (info.width * up.scale, info.height * up.scale) else ", then Lanczos"
        print(f"-> {dst}: {out_w}x{out_h} with {up.variant} x{up.scale}{resample} [{up.source}]",
              file=sys.stderr)  # fmt: skip
    bar = ProgressLine(args.quiet)
    try:
        with stop_on_signals() as stop:
            result = transcode(src, dst, up, opts, progress=bar, stop=stop)
    finally:
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
    from ..video.stream import StreamOptions, check_output, stream

    opts = StreamOptions(
        format=args.format,
        input_format=args.input_format,
        input_options=dict(args.input_option or []),
        **encoder_choices(args),
        size=requested_size(args),
        audio=not args.no_audio,
        realtime=args.realtime,
        max_latency=args.max_latency,
        reconnect=args.reconnect,
        timeout=args.timeout,
        native_rate=args.re,
        overwrite=args.overwrite,
        stats_every=0 if args.quiet else args.stats_every,
    )
    check_output(args.input, args.output, opts)
    up = load_upscaler(args)
    named: list[bool] = []  # the model is named with the first stats line (bad input stays one line) and in the summary

    def report(st: Any) -> None:
        if not named:
            named.append(True)
            print(f"esc-video: model: {up.source}", file=sys.stderr)
        print(f"esc-video: {st.line()}", file=sys.stderr, flush=True)

    with stop_on_signals() as stop:
        stats = stream(args.input, args.output, up, opts, stop=stop, report=report)
    # stdout may be the video itself: every message goes to stderr
    how = "stopped by signal" if stats.stopped else "input ended"
    if stats.timed_out:  # the output is whole up to there, as at an end of input
        where = "stdin" if args.input == "-" else args.input
        how = f"input timed out: no data from {where} for {args.timeout:g} s (--timeout)"
    print(f"esc-video: {how}; model {up.source}; {stats.output or 'nothing written'}: "
          f"{stats.frames_out} of {stats.frames_in} frames "
          f"in {stats.seconds:.1f} s ({stats.fps:.2f} fps), dropped {stats.dropped}, bad packets {stats.bad_packets}, "
          f"latency median {stats.median:.2f} s, p95 {stats.p95:.2f} s", file=sys.stderr)  # fmt: skip
    return 0
