"""Image training loop: L1, AdamW, warm-up + step decay, EMA, BasicSR-layout checkpoints, exact resume."""

from __future__ import annotations

import copy
import csv
import math
import os
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esc_stream.checkpoints import save_checkpoint, state_dict_from_model
from esc_stream.metrics import psnr_y, ssim_y
from esc_stream.models import create_model
from esc_stream.tiling import upscale_tensor

from .data import PatchSampler, bicubic_down, load_images


@dataclass
class TrainConfig:
    """One run, read from a TOML file (see training/configs/)."""

    variant: str = "esc_small"
    scale: int = 2
    train_dir: str = "../shared/data/train291"
    val_dir: str = "../shared/data/kodak24"
    lr_patch: int = 48
    batch: int = 8
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
    threads: int = 1
    seed: int = 0
    out: str = "runs/default_x2"
    init_from: str = ""

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
        flat: dict[str, Any] = {}
        for value in raw.values():
            if isinstance(value, dict):
                flat.update(value)
        flat.update({k: v for k, v in raw.items() if not isinstance(v, dict)})
        known = set(cls.__dataclass_fields__)
        unknown = set(flat) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        if "betas" in flat:
            flat["betas"] = tuple(flat["betas"])
        base = Path(path).parent
        for key in ("train_dir", "val_dir", "out", "init_from"):
            if flat.get(key) and not Path(flat[key]).is_absolute():
                flat[key] = str((base / flat[key]).resolve())
        return cls(**flat)


def lr_factor(cfg: TrainConfig, it: int) -> float:
    """Linear warm-up, then multiply by gamma at each milestone."""
    if it < cfg.warmup:
        return (it + 1) / cfg.warmup
    return cfg.gamma ** sum(it >= m for m in cfg.milestones)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)


class Trainer:
    """Holds model, EMA, optimizer and sampler; `step()` runs one iteration; state round-trips exactly."""

    def __init__(self, cfg: TrainConfig, images: list[torch.Tensor] | None = None) -> None:
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.model = create_model(cfg.variant, cfg.scale)
        if cfg.init_from:
            from esc_stream.checkpoints import read_state_dict

            self.model.load_state_dict(read_state_dict(cfg.init_from))
        self.ema = copy.deepcopy(self.model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda it: lr_factor(cfg, it))
        self.sampler = PatchSampler(
            images if images is not None else load_images(cfg.train_dir), cfg.scale, cfg.lr_patch, cfg.batch
        )
        self.sampler.seed(cfg.seed)
        self.iter = 0

    def step(self) -> float:
        self.model.train()
        lr, hr = self.sampler.sample()
        loss = F.l1_loss(self.model(lr), hr)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        update_ema(self.ema, self.model, self.cfg.ema)
        self.iter += 1
        return loss.item()

    def state(self) -> dict[str, Any]:
        return {
            "iter": self.iter,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "sampler_rng": self.sampler.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        return save_checkpoint(path, self.model, self.ema, extra={"train_state": self.state(), **(extra or {})})

    def resume(self, path: str | Path) -> None:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
        self.model.load_state_dict(ckpt["params"])
        self.ema.load_state_dict(ckpt["params_ema"])
        st = ckpt["train_state"]
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.sampler.generator.set_state(st["sampler_rng"])
        torch.set_rng_state(st["torch_rng"])
        self.iter = int(st["iter"])


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
def validate(model: nn.Module, hrs: list[torch.Tensor], scale: int) -> dict[str, float]:
    """PSNR/SSIM (Y, border=scale) of the model and of bicubic upscaling on the validation crops."""
    model.eval()
    window = int(getattr(model, "window_size", 16))
    psnr = ssim = bic = 0.0
    for hr in hrs:
        lr = (bicubic_down(hr, scale).clamp(0, 1) * 255).round() / 255
        sr = upscale_tensor(model, lr, scale, window)
        up = F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False)
        psnr += psnr_y(sr, hr, scale)
        ssim += ssim_y(sr, hr, scale)
        bic += psnr_y(up, hr, scale)
    n = len(hrs)
    return {"psnr": psnr / n, "ssim": ssim / n, "bicubic_psnr": bic / n}


def train(cfg: TrainConfig, log=print) -> Path:
    """Run (or resume) the configured training; returns the output folder."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg)
    last = out / "last.pth"
    if last.exists():
        trainer.resume(last)
        log(f"resumed from {last} at iteration {trainer.iter}")
    hrs = validation_set(cfg)
    log_path = out / "log.csv"
    new_log = not log_path.exists()
    best_path = out / "best.txt"
    best = float(best_path.read_text().split()[0]) if best_path.exists() else -math.inf
    with open(log_path, "a", newline="") as f:
        writer = csv.writer(f)
        if new_log:
            writer.writerow(["iter", "loss", "lr", "psnr", "ssim", "bicubic_psnr", "seconds"])
        t0, losses = time.time(), []
        while trainer.iter < cfg.iters:
            losses.append(trainer.step())
            it = trainer.iter
            if it % cfg.save_every == 0 or it == cfg.iters:
                trainer.save(last)
            if it % cfg.val_every == 0 or it == cfg.iters:
                m = validate(trainer.ema, hrs, cfg.scale)
                dt = time.time() - t0
                rate = len(losses) / dt
                eta = (cfg.iters - it) / rate / 3600
                loss = sum(losses) / len(losses)
                lr_now = trainer.opt.param_groups[0]["lr"]
                writer.writerow(
                    [
                        it,
                        f"{loss:.5f}",
                        f"{lr_now:.3g}",
                        f"{m['psnr']:.3f}",
                        f"{m['ssim']:.4f}",
                        f"{m['bicubic_psnr']:.3f}",
                        f"{dt:.1f}",
                    ]
                )
                f.flush()
                log(
                    f"iter {it}/{cfg.iters} loss {loss:.4f} lr {lr_now:.2e} | EMA PSNR {m['psnr']:.2f} dB "
                    f"SSIM {m['ssim']:.4f} (bicubic {m['bicubic_psnr']:.2f}) | {rate:.2f} it/s, ETA {eta:.1f} h"
                )
                if m["psnr"] > best:
                    best = m["psnr"]
                    save_checkpoint(
                        out / "best_ema.safetensors",
                        trainer.model,
                        trainer.ema,
                        extra={"iter": it, "psnr_y": f"{best:.3f}", "variant": cfg.variant, "scale": cfg.scale},
                    )
                    best_path.write_text(f"{best:.4f} {it}\n")
                t0, losses = time.time(), []
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="esc-train", description="Train ESC on image folders.")
    ap.add_argument("--config", required=True, help="TOML run configuration")
    ap.add_argument("--iters", type=int, help="override the number of iterations")
    ap.add_argument("--threads", type=int, help="override CPU threads")
    args = ap.parse_args(argv)
    try:
        cfg = TrainConfig.from_toml(args.config)
    except (OSError, ValueError, TypeError, tomllib.TOMLDecodeError) as exc:
        print(f"esc-train: {exc}")
        return 2
    if args.iters:
        cfg.iters = args.iters
    if args.threads:
        cfg.threads = args.threads
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    try:
        train(cfg, log=lambda s: print(s, flush=True))
    except FileNotFoundError as exc:
        print(f"esc-train: {exc}")
        return 2
    return 0


__all__ = ["TrainConfig", "Trainer", "main", "state_dict_from_model", "train", "validate"]
