"""scripts/gpu_check.sh, the one command for a lent GPU machine: without CUDA it says so in one line and exits 0."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_without_cuda_is_one_line_and_exit_0(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"  # a machine whose driver finds no GPU (the same answer as no nvidia-smi at all)
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(tmp_path)}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0]
    assert res.stderr == ""
    assert not (tmp_path / "gpu_check.log").exists()  # nothing was set up or run
