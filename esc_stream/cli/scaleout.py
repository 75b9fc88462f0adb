"""`esc-video transcode --ray` and `esc-video batch`: the command-line side of scale-out.

Importing this module is cheap (no torch, no PyAV, no Ray): it is imported whenever the parser is built.
Ray itself is imported on the --ray paths only (esc_stream.scaleout.ray_runner).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import UserError
from .common import (
    ProgressLine,
    add_copy_args,
    add_encoder_args,
    add_model_args,
    load_upscaler,
    positive,
    positive_seconds,
    requested_size,
    sigterm_as_interrupt,
    transcode_options,
)


def add_ray_options(p: argparse.ArgumentParser, *, segments: bool) -> None:
    """--ray [ADDRESS] and its companions; shared by transcode (segments=True) and batch."""
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run on Ray: ADDRESS of a cluster (ray://host:10001 or host:6379), or none for a local "
                        "runtime on this machine")  # fmt: skip
    p.add_argument("--workers", type=positive,
                   help="tasks at once (default: every CPU of the local runtime or the cluster)")  # fmt: skip
    p.add_argument("--retries", type=int, default=3, help="re-runs of a task whose worker died (default 3)")
    if segments:
        p.add_argument("--segment", type=positive_seconds, default=30.0, metavar="SECONDS",
                       help="with --ray: shortest segment, cut at the next keyframe (default 30)")  # fmt: skip


def add_batch_parser(sub: Any) -> None:
    """Register `esc-video batch IN_DIR OUT_DIR`."""
    p = sub.add_parser("batch", help="upscale every video under a folder (one failure never stops the rest)")
    p.add_argument("input", help="folder to walk (recursively; never written)")
    p.add_argument("output", help="folder for the outputs (same relative paths; created if missing)")
    add_model_args(p)
    add_encoder_args(p)
    p.add_argument("--ext", help="output container for every file, e.g. .mkv (default: the input's)")
    add_copy_args(p)
    p.add_argument("--overwrite", action="store_true", help="redo files whose output exists (default: skip them)")
    p.add_argument("--quiet", action="store_true", help="only the summary")
    add_ray_options(p, segments=False)
    p.set_defaults(func=cmd_batch)


def _model_spec(args: argparse.Namespace) -> Any:
    """Check the weights here (on the CPU: the head of a cluster may have no GPU), then describe them for tasks."""
    from ..scaleout.segments import ModelSpec

    up = load_upscaler(argparse.Namespace(**{**vars(args), "device": "cpu", "dtype": "float32"}))
    weights = str(Path(args.weights).resolve()) if args.weights else None
    device = args.device
    backend = getattr(args, "backend", "torch")
    return ModelSpec(weights, up.scale, device, args.dtype, args.tile, args.overlap, backend, up.tier), up


def _ray_device(args: argparse.Namespace) -> str:
    if args.dtype == "float16" and not (args.device.startswith("cuda") or args.device == "auto"):
        raise UserError("--dtype float16 needs a CUDA device; use bfloat16 or float32 on the CPU")
    return args.device


class _SegmentProgress:
    """A line per finished segment (where it ran, how long) and the usual frame/fps/ETA line."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bar = ProgressLine(args.quiet)
        self.frames = self.segments = self.total = 0
        self.t0 = 0.0
        self.info: Any = None

    def plan(self, info: Any, segments: list[Any], reused: list[dict[str, Any]]) -> None:
        from ..scaleout.segments import work_dir

        self.info, self.total, self.segments = info, len(segments), len(reused)
        self.frames = sum(int(m["frames"]) for m in reused)
        self.t0 = time.perf_counter()
        if not self.args.quiet:
            print(info.describe(), file=sys.stderr)
            again = f", {len(reused)} already done in {work_dir(Path(self.args.output))}" if reused else ""
            print(f"-> {self.args.output}: {len(segments)} segments of >= {self.args.segment:g} s{again}",
                  file=sys.stderr)  # fmt: skip

    def done(self, seg: Any, marker: dict[str, Any]) -> None:
        self.segments += 1
        self.frames += int(marker["frames"])
        if not self.args.quiet:
            print(f"segment {seg.index + 1}/{self.total}: {marker['frames']} frames in {marker['seconds']:.1f} s "
                  f"on {marker['host']} ({self.segments}/{self.total} done)", file=sys.stderr)  # fmt: skip
        self.bar(self.frames, self.info, time.perf_counter() - self.t0)


def transcode_on_ray(args: argparse.Namespace, opts: Any) -> int:
    """`transcode --ray`: segments as Ray tasks, joined here; a re-run resumes from the finished segments."""
    from ..scaleout.segments import check_request, run_segmented, work_dir

    if opts.start or opts.duration or opts.resume:
        raise UserError("--start/--duration/--resume do not combine with --ray (a re-run resumes by itself)")
    if str(args.input) == "-" or "://" in str(args.input):
        raise UserError(f"--ray splits files at keyframes; {args.input} is a live input, use it without --ray")
    device = _ray_device(args)
    spec, _ = _model_spec(args)
    check_request(Path(args.input), Path(args.output), spec, opts, args.segment)  # before Ray starts or is joined
    progress = _SegmentProgress(args)
    from ..scaleout.ray_runner import RayRunner, connect, gpu_hint  # the only import of Ray, on this path alone

    try:
        with sigterm_as_interrupt() as arm, connect(args.ray or None, args.workers):
            arm()  # SIGTERM as Ctrl-C: unfinished tasks are cancelled, finished work is kept
            runner = RayRunner(device=device, retries=args.retries, in_flight=args.workers)
            if (hint := gpu_hint(device)) and not args.quiet:
                print(hint, file=sys.stderr)
            result = run_segmented(args.input, args.output, spec, opts, runner=runner, segment_seconds=args.segment,
                                   on_plan=progress.plan, on_done=progress.done)  # fmt: skip
    except KeyboardInterrupt:
        print(f"esc-video: stopped; finished segments are kept in {work_dir(Path(args.output))}, "
              "run the same command again to resume", file=sys.stderr)  # fmt: skip
        return 130
    finally:
        progress.bar.finish()
    for span in result.bad_spans:
        print(f"warning: {args.input}: {span}", file=sys.stderr)
    reused = f", {result.reused} segments reused" if result.reused else ""
    print(f"{args.output}: {result.frames} frames in {result.seconds:.1f} s ({result.fps:.2f} fps), "
          f"{result.segments} segments{reused}, {result.output_bytes / 1e6:.2f} MB")  # fmt: skip
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from ..scaleout.batch import BatchReport, plan, run_local

    in_dir, out_dir = Path(args.input), Path(args.output)
    if not in_dir.is_dir():
        raise UserError(f"{in_dir}: not a folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder")
    if args.ext:
        from ..video.encode import CONTAINERS

        ext = args.ext if args.ext.startswith(".") else "." + args.ext
        if ext.lower() not in CONTAINERS:
            raise UserError(f"--ext {args.ext}: unknown container; use one of: {' '.join(sorted(CONTAINERS))}")
    opts = transcode_options(args, requested_size(args))
    todo, skipped = plan(in_dir, out_dir, args.ext, args.overwrite)
    report = BatchReport(len(todo) + len(skipped), sys.stderr, args.quiet)
    for r in skipped:
        report(r)
    # outputs that exist were skipped above, so what is left may replace a stale OUT.partial of a killed batch
    opts = replace(opts, overwrite=True)
    if todo and args.ray is None:
        up = load_upscaler(args)
        bar = ProgressLine(args.quiet)
        try:
            run_local(todo, up, opts, report, progress=bar)
        finally:
            bar.finish()
    elif todo:
        _batch_on_ray(args, todo, opts, report)
    return report.summary(sys.stdout)


def _batch_on_ray(args: argparse.Namespace, todo: list[tuple[Path, Path]], opts: Any, report: Any) -> None:
    """Each file one Ray task; results are reported in the order they finish."""
    from ..scaleout.batch import FileResult, file_task

    _ray_device(args)
    spec, _ = _model_spec(args)
    from ..scaleout.ray_runner import connect, gpu_hint, run_files, task_device

    def on_result(key: tuple[Path, Path], r: dict[str, Any]) -> None:
        report(FileResult(key[0], key[1], r["ok"], r["frames"], r["seconds"], r["message"]))

    # a VideoError here is about the cluster, not a file: nothing was done
    with sigterm_as_interrupt() as arm, connect(args.ray or None, args.workers):
        arm()  # after ray.init, which installs a handler of its own
        device, gpus = task_device(args.device)
        if (hint := gpu_hint(args.device)) and not args.quiet:
            print(hint, file=sys.stderr)
        items = [((src, dst), (str(src), str(dst), replace(spec, device=device), opts)) for src, dst in todo]
        for _, dst in todo:
            dst.parent.mkdir(parents=True, exist_ok=True)
        failures = run_files(file_task, items, on_result, retries=args.retries, gpus_per_task=gpus,
                             in_flight=args.workers)  # fmt: skip
    for (src, dst), why in failures:
        report(FileResult(src, dst, False, message=why))
