"""esc-train under torchrun: two CPU ranks (gloo, loopback only), one checkpoint, identical weights on both ranks."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from esc_stream.training.train import DIGEST_ENV, weights_digest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        smooth = np.kron(rng.random((6, 7, 3)), np.ones((8, 8, 1)))[: 40 + 4 * i, :52]
        Image.fromarray((smooth * 255).astype(np.uint8)).save(folder / f"im{i}.png")
    return folder


def _config(tmp_path: Path, run: str) -> Path:
    data = tmp_path / "images"
    if not data.exists():
        _images(data)
    toml = tmp_path / f"{run}.toml"
    toml.write_text(
        f"""[model]
variant = "esc_small"
scale = 2
[data]
train_dir = "{data.as_posix()}"
val_dir = "{data.as_posix()}"
lr_patch = 16
batch = 2
val_limit = 2
val_crop = 32
[train]
iters = 100
warmup = 2
milestones = [2]
ema = 0.9
val_every = 3
save_every = 3
threads = 1
seed = 3
out = "{(tmp_path / run).as_posix()}"
"""
    )
    return toml


def _torchrun(toml: Path, iters: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **{DIGEST_ENV: "1"})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "training",
        "--config",
        str(toml),
        "--iters",
        str(iters),
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_two_cpu_ranks_train_in_step(tmp_path):
    toml = _config(tmp_path, "run")
    proc = _torchrun(toml, 3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "run"

    # rank 0 alone writes: one save message, one validation row, one checkpoint
    assert proc.stdout.count("saved last.pth at iteration 3") == 1, proc.stdout
    assert "DDP: 2 ranks" in proc.stdout
    rows = (out / "log.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("3,")
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["params"])
    st = ckpt["train_state"]
    assert st["iter"] == 3
    ranks = st["sampler_rng_ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0], ranks[1])  # each rank drew its own patches
    assert torch.equal(st["sampler_rng"], ranks[0])

    # both ranks ended with the weights rank 0 saved
    digests = [(out / f"digest_rank{r}.txt").read_text().strip() for r in (0, 1)]
    assert digests[0] == digests[1] == weights_digest(ckpt["params"], ckpt["params_ema"])


@pytest.mark.slow
def test_two_cpu_ranks_resume_exactly(tmp_path):
    halves = _config(tmp_path, "halves")
    for iters in (3, 5):  # the second launch resumes from last.pth, each rank from its own sampler state
        proc = _torchrun(halves, iters)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "start afresh" not in proc.stdout
    proc = _torchrun(_config(tmp_path, "straight"), 5)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in (0, 1):
        assert (tmp_path / "halves" / f"digest_rank{r}.txt").read_text() == (
            tmp_path / "straight" / f"digest_rank{r}.txt"
        ).read_text()
