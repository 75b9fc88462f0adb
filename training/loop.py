"""The training loop's shared pieces: run files, the Trainer (model, EMA, optimizer, schedule, sampler, exact
resume, DDP), validation, the best checkpoint, and the `esc-train` arguments.

`train.py` (image training, the default), `arbitrary.py` (ESC + LTE, random scales) and `finetune.py` (temporal
fine-tuning) are thin entry points around these. Checkpoints are BasicSR-layout `.pth` files (`params`,
`params_ema`, `train_state`); a resumed run continues bit for bit.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import math
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from esc_stream.backends import prepare_for_training
from esc_stream.checkpoints import read_state_dict, save_checkpoint
from esc_stream.metrics import psnr_y, ssim_y
from esc_stream.models import create_model
from esc_stream.models.blocks import Block
from esc_stream.tiling import upscale_tensor

from . import distributed
from .data import SAMPLINGS, PatchSampler, bicubic_down, load_images, rank_seed, rescaled

# what reading a run file can raise: each is one line for the user
CONFIG_ERRORS = (OSError, ValueError, TypeError, tomllib.TOMLDecodeError)


def read_settings(path: str | Path, known: set[str], path_keys: tuple[str, ...]) -> dict[str, Any]:
    """A TOML run file flattened (tables merged), checked for unknown keys, with relative paths (single or
    lists) resolved against the file's folder."""
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    flat: dict[str, Any] = {}
    for value in raw.values():
        if isinstance(value, dict):
            flat.update(value)
    flat.update({k: v for k, v in raw.items() if not isinstance(v, dict)})
    unknown = set(flat) - known
    if unknown:
        raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
    base = Path(path).parent

    def resolve(p: str) -> str:
        return p if not p or Path(p).is_absolute() else str((base / p).resolve())

    for key in path_keys:
        if isinstance(flat.get(key), list):
            flat[key] = [resolve(p) for p in flat[key]]
        elif flat.get(key):
            flat[key] = resolve(flat[key])
    return flat


@dataclass
class TrainConfig:
    """One run, read from a TOML file (see training/configs/)."""

    variant: str = "esc_small"
    scale: int = 2
    train_dir: str = "../shared/data/train291"
    val_dir: str = "../shared/data/kodak24"
    lr_patch: int = 48
    batch: int = 8
    # extra copies of every training image downscaled by these factors (e.g. [0.9, 0.8, 0.7, 0.6]); none by default
    rescale: list[float] = field(default_factory=list)
    # how a patch's image is chosen: "image" (each equally likely) or "area" (each crop position equally likely)
    sampling: str = "image"
    # LR pixels of image context around each patch while its LR is made (see PatchSampler); 0 keeps older runs'
    # patches, 2 makes every patch's LR exactly that of the whole image
    lr_context: int = 0
    # each training image downscaled by this factor once, as it is read (e.g. 0.5 for large JPEG photographs)
    prescale: float = 1.0
    # patches flatter than this (mean |neighbour difference|, 0..255) are redrawn a few times (see PatchSampler)
    min_texture: float = 0.0
    val_limit: int = 6
    val_crop: int = 256
    iters: int = 100_000
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.9)
    weight_decay: float = 0.0
    warmup: int = 500
    milestones: list[int] = field(default_factory=lambda: [50_000, 80_000, 90_000, 95_000])
    gamma: float = 0.5
    ema: float = 0.999
    val_every: int = 500
    save_every: int = 250
    log_every: int = 100
    threads: int = 1
    device: str = "cpu"
    # "bf16": forward and backward under torch.autocast (matmuls and convs in bfloat16, weights, optimizer, EMA
    # and the residual stream in float32). About 1.2x faster per iteration on a CPU with AVX-512 BF16, but 7.5x
    # slower on one without (bf16 emulated), so there "bf16" trains in fp32 and says so; "bf16-always" forces it.
    amp: str = ""
    # "l1" (the paper's loss) or "l2": mean squared error, the loss PSNR measures. Efficient-SR practice (e.g. the
    # NTIRE challenges) is to train with L1 and finish with a short, low-lr L2 phase, which adds a little PSNR.
    loss: str = "l1"
    seed: int = 0
    out: str = "runs/default_x2"
    init_from: str = ""

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        flat = read_settings(path, set(cls.__dataclass_fields__), ("train_dir", "val_dir", "out", "init_from"))
        if "betas" in flat:
            flat["betas"] = tuple(flat["betas"])
        if flat.get("amp", "") not in AMP_MODES:
            raise ValueError(f'{path}: amp must be "bf16", "bf16-always" or "" (off), not {flat["amp"]!r}')
        if flat.get("sampling", "image") not in SAMPLINGS:
            raise ValueError(f'{path}: sampling must be "image" or "area", not {flat["sampling"]!r}')
        if not all(isinstance(f, int | float) and 0 < f < 1 for f in flat.get("rescale", [])):
            raise ValueError(f"{path}: rescale factors must lie between 0 and 1, not {flat['rescale']!r}")
        if not 0 < flat.get("prescale", 1.0) <= 1:
            raise ValueError(f"{path}: prescale must lie in (0, 1], not {flat['prescale']!r}")
        if flat.get("loss", "l1") not in LOSSES:
            raise ValueError(f'{path}: loss must be "l1" or "l2", not {flat["loss"]!r}')
        return cls(**flat)


AMP_MODES = ("", "bf16", "bf16-always")


def native_bf16(device: torch.device) -> bool:
    """True where bf16 autocast is fast: CUDA, or a CPU with AVX-512 BF16 or AMX (elsewhere it is emulated)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"l1": F.l1_loss, "l2": F.mse_loss}


def lr_factor(cfg: TrainConfig, it: int) -> float:
    """Linear warm-up, then multiply by gamma at each milestone."""
    if it < cfg.warmup:
        return (it + 1) / cfg.warmup
    return cfg.gamma ** sum(it >= m for m in cfg.milestones)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, parameter by parameter."""
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)


def transfer_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load every tensor of `state` whose name and shape fit `model`; return the model keys left as they were.

    This is how a x4 network starts from a trained x2 one: the body carries over, the upsampler (whose
    output channels depend on the scale) keeps its fresh initialisation. A state that shares nothing is an error.
    """
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fits:
        raise ValueError("init_from: no tensor of the checkpoint fits this network (other variant?)")
    model.load_state_dict(fits, strict=False)
    grow_as_identity(model, set(fits))
    return sorted(k for k in own if k not in fits)


@torch.no_grad()
def grow_as_identity(model: nn.Module, loaded: set[str]) -> list[str]:
    """Zero the output conv of every residual block that received none of its tensors; return their names.

    A network grown deeper from a trained one (esc_small -> esc_medium) then computes exactly what the trained
    one did, and the new blocks learn a correction from there instead of first disturbing the trained ones.
    """
    fresh = []
    for name, module in model.named_modules():
        if isinstance(module, Block) and not any(k.startswith(f"{name}.") for k in loaded):
            nn.init.zeros_(module.conv_out.weight)
            nn.init.zeros_(module.conv_out.bias)  # type: ignore[arg-type]
            fresh.append(name)
    return fresh


class Trainer:
    """Holds model, EMA, optimizer and sampler; `step()` runs one iteration; state round-trips exactly.

    Inside a torchrun process group the model is wrapped in DistributedDataParallel and each rank samples its
    own patches; `save()` then gathers every rank's sampler state and must be called on all ranks.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        images: list[torch.Tensor] | None = None,
        rank: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.cfg = cfg
        ddp = distributed.running()
        self.rank = torch.distributed.get_rank() if ddp else (rank or 0)
        self.device = torch.device(device)
        # the same seed on every rank: identical initial weights (DDP also broadcasts rank 0's at wrap time)
        torch.manual_seed(cfg.seed)
        self.model = create_model(cfg.variant, cfg.scale)
        self.init_skipped: list[str] = []
        if cfg.init_from:
            self.init_skipped = transfer_weights(self.model, read_state_dict(cfg.init_from))
        prepare_for_training(self.model)  # the native CPU attention kernels (esc_stream.backends)
        self.model.to(self.device)
        self.ema = copy.deepcopy(self.model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        # `net` runs the forward pass; `model` is always the bare module, so saved keys carry no "module." prefix
        self.net: nn.Module = self.model
        if ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda it: lr_factor(cfg, it))
        train_images = images if images is not None else load_images(cfg.train_dir, prescale=cfg.prescale)
        self.sampler = PatchSampler(
            rescaled(train_images, cfg.rescale),
            cfg.scale,
            cfg.lr_patch,
            cfg.batch,
            cfg.sampling,
            cfg.lr_context,
            cfg.min_texture,
        )
        self.sampler.seed(rank_seed(cfg.seed, self.rank))
        self.iter = 0
        self.checkpoint_lr = cfg.lr  # the base lr of the run a resumed checkpoint came from
        self.resumed_sampler = True
        # bf16 autocast only where the hardware has it, unless forced (see TrainConfig.amp)
        self.bf16 = cfg.amp == "bf16-always" or (cfg.amp == "bf16" and native_bf16(self.device))

    def step(self) -> float:
        self.net.train()
        lr, hr = self.sampler.sample()
        lr, hr = lr.to(self.device), hr.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.net(lr)
        loss = LOSSES[self.cfg.loss](out.float(), hr)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # under DDP this also averages the gradients over the ranks
        self.opt.step()
        self.sched.step()
        # every rank holds the same weights after the step, so every rank's EMA stays identical without syncing
        update_ema(self.ema, self.model, self.cfg.ema)
        self.iter += 1
        return loss.item()

    def state(self) -> dict[str, Any]:
        """Training state for the checkpoint; a collective under DDP (gathers every rank's sampler RNG)."""
        ranks = distributed.gather(self.sampler.generator.get_state())
        return {
            "iter": self.iter,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "sampler_rng": ranks[0],
            "sampler_rng_ranks": ranks,
            "torch_rng": torch.get_rng_state(),
        }

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the checkpoint from rank 0; every rank must call it (the state gather is a collective)."""
        state = self.state()
        if self.rank == 0:
            save_checkpoint(path, self.model, self.ema, extra={"train_state": state, **(extra or {})})
        return Path(path)

    def resume(self, path: str | Path) -> None:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
        self.model.load_state_dict(ckpt["params"])
        self.ema.load_state_dict(ckpt["params_ema"])
        st = ckpt["train_state"]
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.checkpoint_lr = float(self.sched.base_lrs[0])
        self.apply_schedule()
        ranks = st.get("sampler_rng_ranks") or []
        if self.rank < len(ranks):
            self.sampler.generator.set_state(ranks[self.rank])
        elif self.rank == 0:
            self.sampler.generator.set_state(st["sampler_rng"])  # a file from before per-rank states
        else:
            # the file was written by fewer ranks: this rank keeps its fresh (seed, rank) stream
            self.resumed_sampler = False
        torch.set_rng_state(st["torch_rng"])
        self.iter = int(st["iter"])

    def apply_schedule(self) -> None:
        """Make the run file the schedule's source of truth after a resume.

        LambdaLR's state carries the base lr of the run that wrote the checkpoint and the optimizer the lr of its
        last step, while the factor (warm-up, milestones, gamma) comes from this run's config: a branch that changes
        `lr` or the milestones would otherwise run one step at the old lr, then the old base with the new factors.
        With an unchanged config the values are recomputed bit-identically, so resuming stays exact.
        """
        self.sched.base_lrs = [self.cfg.lr for _ in self.sched.base_lrs]
        for group in self.opt.param_groups:
            group["initial_lr"] = self.cfg.lr
            group["lr"] = self.cfg.lr * lr_factor(self.cfg, self.sched.last_epoch)


def weights_digest(*state_dicts: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names and raw bytes of state dicts (e.g. a checkpoint's params and params_ema)."""
    h = hashlib.sha256()
    for sd in state_dicts:
        for key, value in sd.items():
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def validation_set(cfg: TrainConfig) -> list[torch.Tensor]:
    """Centre crops (multiple of scale) of the first `val_limit` validation images, as float HR tensors."""
    out = []
    for im in load_images(cfg.val_dir, cfg.val_limit):
        h, w = im.shape[1:]
        c = cfg.val_crop - cfg.val_crop % cfg.scale if cfg.val_crop else 0
        ch, cw = (min(h, c), min(w, c)) if c else (h, w)
        ch, cw = ch - ch % cfg.scale, cw - cw % cfg.scale
        y, x = (h - ch) // 2, (w - cw) // 2
        out.append(im[None, :, y : y + ch, x : x + cw].float() / 255.0)
    return out


@torch.no_grad()
def validate(
    model: nn.Module, hrs: list[torch.Tensor], scale: int, samples: list[torch.Tensor] | None = None, n_samples: int = 3
) -> dict[str, float]:
    """PSNR/SSIM (Y, border=scale) of the model and of bicubic upscaling on the validation crops.

    With `samples`, LR-bicubic | SR | HR strips of the first `n_samples` crops are appended to it.
    """
    model.eval()
    window = int(getattr(model, "window_size", 16))
    device = next(model.parameters()).device
    psnr = ssim = bic = 0.0
    for i, hr in enumerate(hrs):
        lr = (bicubic_down(hr, scale).clamp(0, 1) * 255).round() / 255
        sr = upscale_tensor(model, lr.to(device), scale, window).cpu()
        up = F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False)
        psnr += psnr_y(sr, hr, scale)
        ssim += ssim_y(sr, hr, scale)
        bic += psnr_y(up, hr, scale)
        if samples is not None and i < n_samples:
            samples.append(torch.cat([up, sr, hr], dim=-1)[0].clamp(0, 1))
    n = len(hrs)
    return {"psnr": psnr / n, "ssim": ssim / n, "bicubic_psnr": bic / n}


def resume_if_saved(trainer: Trainer, last: Path, log: Callable[[str], None]) -> bool:
    """Continue from `last` (the run's last.pth) when it exists; True if it did."""
    if not last.exists():
        return False
    trainer.resume(last)
    log(f"resumed from {last} at iteration {trainer.iter}")
    return True


class BestCheckpoint:
    """<out>/best_ema.safetensors: the EMA with the best validation score so far, the score and iteration in
    <out>/best.txt (read back on resume)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / "best.txt"
        self.score = float(self.path.read_text().split()[0]) if self.path.exists() else -math.inf

    def offer(self, score: float, it: int, trainer: Trainer, extra: dict[str, Any]) -> bool:
        """Keep the EMA (with `extra` as file metadata) when `score` beats the best so far; True if it did."""
        if not score > self.score:
            return False
        self.score = score
        save_checkpoint(self.out / "best_ema.safetensors", trainer.model, trainer.ema, extra=extra)
        self.path.write_text(f"{score:.4f} {it}\n")
        return True


@contextmanager
def csv_log(path: Path, header: list[str]) -> Iterator[Any]:
    """A csv writer appending to `path`, which gets `header` first when it is new (or empty)."""
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(header)
        yield f, writer


def run_parser(description: str, device_help: str = "override the device: cpu, cuda") -> argparse.ArgumentParser:
    """The `esc-train` arguments: a run file and the overrides every trainer takes."""
    ap = argparse.ArgumentParser(prog="esc-train", description=description)
    ap.add_argument("--config", required=True, help="TOML run configuration")
    ap.add_argument("--iters", type=int, help="override the number of iterations")
    ap.add_argument("--threads", type=int, help="override CPU threads")
    ap.add_argument("--device", help=device_help)
    return ap


def apply_overrides(cfg: Any, args: argparse.Namespace) -> Any:
    """The command line's --iters/--threads/--device over the run file's values; returns `cfg`."""
    for key in ("iters", "threads", "device"):
        if getattr(args, key):
            setattr(cfg, key, getattr(args, key))
    return cfg
