"""Compile the native shim into VapourSynth's autoload folder and configure vspipe.

    python -m esc_stream.vapoursynth.build              # compile (when out of date) + `vapoursynth config`
    python -m esc_stream.vapoursynth.build --force      # recompile
    python -m esc_stream.vapoursynth.build --uninstall  # remove the plugin

The shim is built with the system C compiler ($CC, else cc), VapourSynth's headers from the wheel and this
interpreter's headers; it is not linked to libpython (the host process provides it).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("esc_vs.c")
NAME = "libescstream"


def plugin_path() -> Path:
    """Where the shim lives: VapourSynth's plugin folder, which R74+ autoloads."""
    import vapoursynth

    suffix = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")
    return Path(vapoursynth.get_plugin_dir()) / f"{NAME}{suffix}"


def compile_command(output: Path) -> list[str]:
    import vapoursynth

    if sys.platform == "win32":
        raise RuntimeError("building the esc VapourSynth shim on Windows is not supported yet")
    cc = shlex.split(os.environ.get("CC") or "cc")
    includes = ["-I", vapoursynth.get_include(), "-I", sysconfig.get_paths()["include"]]
    # macOS refuses undefined symbols unless told they come from the host process.
    link = ["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else []
    return [*cc, "-shared", "-fPIC", "-O2", "-DNDEBUG", "-Wall", *includes, str(SOURCE), "-o", str(output), *link]


def build(force: bool = False) -> Path:
    """Compile the shim into the plugin folder unless it is newer than its source; returns its path."""
    target = plugin_path()
    if not force and target.is_file() and target.stat().st_mtime >= SOURCE.stat().st_mtime:
        return target
    if shutil.which(shlex.split(os.environ.get("CC") or "cc")[0]) is None:
        raise RuntimeError("no C compiler found (install gcc or clang, or set CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile beside the target, then rename: a running VapourSynth keeps its mapping of the old file.
    fd, tmp = tempfile.mkstemp(prefix=f".{NAME}-", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(compile_command(Path(tmp)), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{done.stderr.strip()}")
        os.chmod(tmp, 0o755)  # mkstemp made it private; other users of this Python must load it too
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def configure() -> None:
    """`vapoursynth config`: records this interpreter and its libpython, which vspipe needs to start."""
    subprocess.run([sys.executable, "-m", "vapoursynth", "config"], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m esc_stream.vapoursynth.build", description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="recompile even when up to date")
    parser.add_argument("--uninstall", action="store_true", help="remove the plugin from VapourSynth's folder")
    parser.add_argument("--no-config", action="store_true", help="skip `vapoursynth config`")
    args = parser.parse_args(argv)
    if args.uninstall:
        plugin_path().unlink(missing_ok=True)
        print(f"removed {plugin_path()}")
        return 0
    try:
        path = build(force=args.force)
    except (RuntimeError, OSError) as exc:  # no compiler, compile error, read-only site-packages
        print(f"esc_stream.vapoursynth.build: {exc}", file=sys.stderr)
        return 1
    print(f"esc VapourSynth plugin: {path}")
    if not args.no_config:
        configure()
    return 0


if __name__ == "__main__":
    sys.exit(main())
