"""Temporal fine-tuning: continue a trained model on video clips with per-frame L1 + temporal-difference loss.

    python -m training.finetune --config training/configs/temporal_x2.toml

Validation reports PSNR (Y) and flicker on fixed clips (synthetic motion over the validation stills and real
footage) before the first step and at every validation, so the effect of the temporal loss is measured.
Resumes from <out>/finetune_last.pth; writes <out>/finetuned_ema.safetensors and <out>/finetune_log.csv.
"""

from __future__ import annotations

import argparse
import copy
import csv
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from esc_stream.backends import prepare_for_training
from esc_stream.checkpoints import describe_state_dict, read_state_dict, save_checkpoint
from esc_stream.metrics import psnr_y

from .clips import ClipSampler, FrameSequence
from .data import load_images
from .loop import CONFIG_ERRORS, read_settings, update_ema
from .temporal import clip_forward, clip_loss, flicker


@dataclass
class FinetuneConfig:
    init: str = ""
    stills_dir: str = "../shared/data/train291"
    # each still downscaled by this factor as it is read (0.5 for the photos63 wallpapers, as in training)
    prescale: float = 1.0
    sequences: list[str] = field(default_factory=lambda: ["../shared/data/realvideo_demo000"])
    val_stills_dir: str = "../shared/data/kodak24"
    frames: int = 5
    lr_patch: int = 48
    batch: int = 4
    real_fraction: float = 0.5
    iters: int = 2000
    lr: float = 1e-4
    temporal_weight: float = 1.0
    ema: float = 0.999
    val_every: int = 250
    val_clips: int = 6
    threads: int = 1
    seed: int = 0
    out: str = "runs/temporal_x2"

    @classmethod
    def from_toml(cls, path: str | Path) -> FinetuneConfig:
        keys = ("init", "stills_dir", "val_stills_dir", "out", "sequences")
        return cls(**read_settings(path, set(cls.__dataclass_fields__), keys))


def validation_clips(cfg: FinetuneConfig, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed (LR, HR) clips: synthetic motion over validation stills plus real footage, same every call."""
    stills = load_images(cfg.val_stills_dir, cfg.val_clips)
    sequences = [FrameSequence(p) for p in cfg.sequences]
    sampler = ClipSampler(stills, sequences, scale, cfg.frames, cfg.lr_patch * 2, cfg.val_clips, cfg.real_fraction)
    sampler.generator.manual_seed(12345)
    return sampler.sample()


@torch.no_grad()
def evaluate_clips(model: torch.nn.Module, lr: torch.Tensor, hr: torch.Tensor, scale: int) -> dict[str, float]:
    """Mean Y-PSNR over all frames and flicker (8-bit levels) of the model on fixed clips."""
    model.eval()
    sr = clip_forward(model, lr).clamp(0, 1)
    return {"psnr": psnr_y(sr.flatten(0, 1), hr.flatten(0, 1), scale), "flicker": flicker(sr, hr)}


def finetune(cfg: FinetuneConfig, log=print) -> Path:
    """Run (or resume) temporal fine-tuning; returns the output folder."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    sd = read_state_dict(cfg.init)
    desc = describe_state_dict(sd)
    model = prepare_for_training(desc.build())  # the native CPU attention kernels (esc_stream.backends)
    model.load_state_dict(sd)
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.9))
    stills = load_images(cfg.stills_dir, prescale=cfg.prescale)
    sampler = ClipSampler(stills, [FrameSequence(p) for p in cfg.sequences], desc.scale,
                          cfg.frames, cfg.lr_patch, cfg.batch, cfg.real_fraction)  # fmt: skip
    sampler.generator.manual_seed(cfg.seed)
    it = 0
    last = out / "finetune_last.pth"
    if last.exists():
        ck = torch.load(str(last), map_location="cpu", weights_only=True)
        model.load_state_dict(ck["params"])
        ema.load_state_dict(ck["params_ema"])
        opt.load_state_dict(ck["train_state"]["optimizer"])
        sampler.generator.set_state(ck["train_state"]["sampler_rng"])
        it = int(ck["train_state"]["iter"])
        log(f"resumed at iteration {it}")
    val_lr, val_hr = validation_clips(cfg, desc.scale)
    log_path = out / "finetune_log.csv"
    fresh = not log_path.exists()
    with open(log_path, "a", newline="") as f:
        writer = csv.writer(f)
        if fresh:
            m = evaluate_clips(ema, val_lr, val_hr, desc.scale)
            writer.writerow(["iter", "loss", "frame_l1", "temporal_l1", "psnr", "flicker"])
            writer.writerow([0, "", "", "", f"{m['psnr']:.3f}", f"{m['flicker']:.4f}"])
            log(f"before fine-tuning: PSNR {m['psnr']:.2f} dB, flicker {m['flicker']:.3f}")
        t0 = time.time()
        while it < cfg.iters:
            model.train()
            lr_clip, hr_clip = sampler.sample()
            loss, parts = clip_loss(model, lr_clip, hr_clip, cfg.temporal_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            update_ema(ema, model, cfg.ema)
            it += 1
            if it % cfg.val_every == 0 or it == cfg.iters:
                m = evaluate_clips(ema, val_lr, val_hr, desc.scale)
                writer.writerow([it, f"{loss.item():.5f}", f"{parts['frame_l1']:.5f}", f"{parts['temporal_l1']:.5f}",
                                 f"{m['psnr']:.3f}", f"{m['flicker']:.4f}"])  # fmt: skip
                f.flush()
                rate = cfg.val_every / max(time.time() - t0, 1e-9)
                log(f"iter {it}/{cfg.iters} loss {loss.item():.4f} | PSNR {m['psnr']:.2f} dB, "
                    f"flicker {m['flicker']:.3f} | {rate:.2f} it/s")  # fmt: skip
                state = {"iter": it, "optimizer": opt.state_dict(), "sampler_rng": sampler.generator.get_state()}
                save_checkpoint(last, model, ema, extra={"train_state": state})
                save_checkpoint(out / "finetuned_ema.safetensors", model, ema, extra={"iter": it})
                t0 = time.time()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.finetune", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--iters", type=int)
    args = ap.parse_args(argv)
    try:
        cfg = FinetuneConfig.from_toml(args.config)
    except CONFIG_ERRORS as exc:
        print(f"finetune: {exc}")
        return 2
    if args.iters:
        cfg.iters = args.iters
    try:
        finetune(cfg, log=lambda s: print(s, flush=True))
    except ValueError as exc:  # data that cannot make the configured clips
        print(f"finetune: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
