"""The built wheel: one top-level package, esc_stream, with the front ends and the trainer inside it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"esc_stream": "esc_stream", "vs_plugin": "esc_stream/vapoursynth", "demo": "esc_stream/demo",
           "training": "esc_stream/training"}  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """A wheel built offline from a copy of the sources (nothing is written into the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "runs", "*.egg-info")
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, src / folder, ignore=skip)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
           "-w", str(tmp / "dist"), str(src)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (built,) = (tmp / "dist").glob("esc_stream-*.whl")
    return zipfile.ZipFile(built)


@pytest.mark.slow
def test_the_wheel_has_only_esc_stream_at_top_level(wheel):
    tops = {name.split("/")[0] for name in wheel.namelist()}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert len(dist_info) == 1 and tops - dist_info == {"esc_stream"}, sorted(tops)


@pytest.mark.slow
def test_every_package_and_data_file_is_in_the_wheel(wheel):
    names = set(wheel.namelist())
    for folder, installed in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.relative_to(ROOT / folder)
            if "runs" in rel.parts:
                continue
            assert f"{installed}/{rel.as_posix()}" in names, f"{folder}/{rel} is not in the wheel"
    assert "esc_stream/vapoursynth/esc_vs.c" in names  # `python -m esc_stream.vapoursynth.build` compiles it
    assert any(n.startswith("esc_stream/weights/") and n.endswith(".safetensors") for n in names)
    assert "esc_stream/native/window_attention.c" in names and "esc_stream/cuda/kernels/convattn.cu" in names


@pytest.mark.slow
def test_the_commands_point_into_esc_stream(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    assert "esc-video = esc_stream.cli:main" in text and "esc-train = esc_stream.training.train:main" in text
