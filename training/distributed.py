"""torchrun support: the rank from the environment, the process group, and the few collectives training needs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a torchrun launch; the defaults describe a plain single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_torchrun() -> DistEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them; a single process when they are absent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    rank = int(os.environ["RANK"])
    return DistEnv(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def pick_device(name: str, env: DistEnv) -> torch.device:
    """`cpu`, or `cuda` / `cuda:N`; under torchrun every rank takes the GPU numbered by its LOCAL_RANK."""
    device = torch.device(name)
    if device.type != "cuda":
        return device
    index = env.local_rank if env.active else (device.index or 0)
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)  # NCCL collectives and all_gather_object use the current device
    return device


def start(env: DistEnv, device: torch.device) -> bool:
    """Join the process group (gloo on CPU, nccl on CUDA); True if this call started it and so must end it."""
    if not env.active or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    # env:// rendezvous: MASTER_ADDR / MASTER_PORT come from torchrun
    dist.init_process_group(backend, rank=env.rank, world_size=env.world)
    return True


def running() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if running():
        dist.barrier()


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (a one-item list outside a process group)."""
    if not running():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean(value: float, device: torch.device) -> float:
    """The mean of `value` over all ranks (itself outside a process group)."""
    if not running():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()
