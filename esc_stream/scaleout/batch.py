"""Upscale every video under a folder: one line per file and overall, a summary of failures at the end.

Why a per-file wall: a library always holds some file that is broken, half-copied or not really a video;
it gets one line in the summary and the batch goes on. Outputs that exist already are skipped (unless
`overwrite`), so re-running a batch only does what is missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..video.encode import CONTAINERS

# what counts as a video when walking a folder (by extension: probing every file would be slow and noisy)
VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".m2ts", ".mts", ".mpg", ".mpeg",
                  ".flv", ".wmv", ".nut", ".y4m", ".3gp", ".ogv", ".vob"}  # fmt: skip


@dataclass
class FileResult:
    src: Path
    dst: Path
    ok: bool
    frames: int = 0
    seconds: float = 0.0
    message: str = ""
    skipped: bool = False


def find_videos(in_dir: Path, out_dir: Path) -> list[Path]:
    """Video files under `in_dir` (recursively, sorted), leaving out hidden ones, partial outputs and
    anything under `out_dir` (which may sit inside `in_dir`)."""
    out_dir = out_dir.resolve()
    found = []
    for path in sorted(in_dir.rglob("*")):
        rel = path.relative_to(in_dir)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            continue
        if path.resolve().is_relative_to(out_dir):
            continue
        found.append(path)
    return found


def output_for(src: Path, in_dir: Path, out_dir: Path, ext: str | None) -> Path:
    """Same relative path under `out_dir`; `ext` replaces the extension, and containers esc-video cannot
    write (.mpg, .flv, ...) become .mkv."""
    dst = out_dir / src.relative_to(in_dir)
    suffix = ext if ext else src.suffix.lower()
    if not suffix.startswith("."):
        suffix = "." + suffix
    if suffix not in CONTAINERS:
        suffix = ".mkv"
    return dst.with_suffix(suffix)


class BatchReport:
    """Prints a line per finished file and the overall state, then the summary."""

    def __init__(self, total: int, stream: TextIO, quiet: bool = False) -> None:
        self.total, self.stream, self.quiet = total, stream, quiet
        self.results: list[FileResult] = []
        self.t0 = time.perf_counter()

    def __call__(self, r: FileResult) -> None:
        self.results.append(r)
        if self.quiet:
            return
        n = len(self.results)
        if r.skipped:
            what = f"skipped ({r.message})"
        elif r.ok:
            fps = r.frames / r.seconds if r.seconds > 0 else 0.0
            what = f"-> {r.dst}: {r.frames} frames in {r.seconds:.1f} s ({fps:.2f} fps)"
        else:
            what = f"FAILED: {r.message}"
        print(f"[{n}/{self.total}] {r.src} {what}", file=self.stream, flush=True)
        print(f"batch: {self.overall()}", file=self.stream, flush=True)

    def overall(self) -> str:
        done = len(self.results)
        failed = sum(not r.ok for r in self.results)
        elapsed = time.perf_counter() - self.t0
        worked = [r for r in self.results if not r.skipped]
        eta = ""
        if worked and done < self.total:
            eta = f", ETA {elapsed / len(worked) * (self.total - done):.0f} s"
        return f"{done}/{self.total} files ({done - failed} ok, {failed} failed), {elapsed:.1f} s{eta}"

    def summary(self, stream: TextIO) -> int:
        """Print the summary; returns the exit status (1 when any file failed)."""
        ok = sum(r.ok and not r.skipped for r in self.results)
        skipped = sum(r.skipped for r in self.results)
        failed = [r for r in self.results if not r.ok]
        elapsed = time.perf_counter() - self.t0
        print(f"batch: {ok} upscaled, {skipped} skipped, {len(failed)} failed of {self.total} files "
              f"in {elapsed:.1f} s", file=stream)  # fmt: skip
        for r in failed:
            print(f"failed: {r.src}: {r.message}", file=stream)
        return 1 if failed else 0


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def transcode_file(src: Path, dst: Path, upscaler: Any, opts: Any, progress: Any = None) -> FileResult:
    """One file; every failure becomes a FileResult with one line, so the batch can go on."""
    import av

    from ..errors import EscError
    from ..video.transcode import transcode

    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        result = transcode(src, dst, upscaler, opts, progress=progress)
    except (EscError, OSError, av.error.FFmpegError, MemoryError) as exc:
        return FileResult(src, dst, False, message=one_line(exc))
    except Exception as exc:  # noqa: BLE001 - one bad file never stops the rest
        return FileResult(src, dst, False, message=f"internal error: {type(exc).__name__}: {one_line(exc)}")
    warn = "; ".join(result.bad_spans)
    return FileResult(src, dst, True, result.frames, result.seconds, message=warn)


def file_task(src: str, dst: str, model: Any, opts: Any) -> dict[str, Any]:
    """A whole file as one task (runs on a Ray worker): its own upscaler, a normal pipeline run."""
    r = transcode_file(Path(src), Path(dst), model.load(), opts)
    return {"ok": r.ok, "frames": r.frames, "seconds": r.seconds, "message": r.message}


def plan(
    in_dir: Path, out_dir: Path, ext: str | None, overwrite: bool
) -> tuple[list[tuple[Path, Path]], list[FileResult]]:
    """(files to do, files skipped because their output exists)."""
    todo, skipped = [], []
    for src in find_videos(in_dir, out_dir):
        dst = output_for(src, in_dir, out_dir, ext)
        if dst.exists() and not overwrite:
            skipped.append(FileResult(src, dst, True, skipped=True, message="output exists; --overwrite redoes it"))
        else:
            todo.append((src, dst))
    return todo, skipped


def run_local(
    todo: list[tuple[Path, Path]], upscaler: Any, opts: Any, report: Callable[[FileResult], None], progress: Any = None
) -> None:
    """One file after another in this process, with one model."""
    for src, dst in todo:
        report(transcode_file(src, dst, upscaler, opts, progress))
