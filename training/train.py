"""`esc-train`: image training (L1 or L2, AdamW, warm-up + step decay, EMA, exact resume, DDP under torchrun).

    esc-train --config training/configs/default_x2.toml     (or python -m training.train --config ...)

The loop's pieces are in loop.py; a run file of the arbitrary-scale model goes to arbitrary.py.
"""

from __future__ import annotations

import os
import time
import tomllib
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from esc_stream.checkpoints import state_dict_from_model

from . import distributed
from .loop import (
    CONFIG_ERRORS,
    BestCheckpoint,
    TrainConfig,
    Trainer,
    apply_overrides,
    csv_log,
    lr_factor,
    native_bf16,
    resume_if_saved,
    run_parser,
    transfer_weights,
    update_ema,
    validate,
    validation_set,
    weights_digest,
)
from .monitor import Monitor

# Set (to anything) by tests: at the end of a run each rank writes <out>/digest_rank<R>.txt, the SHA-256 of its
# params and EMA, so a test can check that every DDP rank ended with the same weights.
DIGEST_ENV = "ESC_TRAIN_DIGESTS"


def _quiet(message: str) -> None:
    """The log of ranks other than 0: rank 0 speaks for the run."""


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> Path:
    """Run (or resume) the configured training; returns the output folder. Under torchrun, runs as one DDP rank."""
    env = distributed.env_from_torchrun()
    device = distributed.pick_device(cfg.device, env)
    started = distributed.start(env, device)
    try:
        return _train(cfg, env, device, log if env.is_main else _quiet)
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, env: distributed.DistEnv, device: torch.device, log: Callable[[str], None]) -> Path:
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, device=device)
    if cfg.amp == "bf16" and not trainer.bf16:
        log('amp = "bf16": this CPU has no native bf16 (AVX-512 BF16 or AMX), so the run trains in fp32, which is '
            'several times faster here; amp = "bf16-always" forces bf16')  # fmt: skip
    if env.active:
        log(f"DDP: {env.world} ranks, {cfg.batch} patches per rank per step ({env.world * cfg.batch} in all)")
    last = out / "last.pth"
    if trainer.init_skipped and not last.exists():
        parts = sorted({".".join(k.split(".")[:2]) if k.startswith("blocks.") else k for k in trainer.init_skipped})
        log(f"init_from {cfg.init_from}: fresh initialisation kept for {', '.join(parts)}")
    if resume_if_saved(trainer, last, log):
        if trainer.checkpoint_lr != cfg.lr:
            log(f"lr {cfg.lr:g} from the run file (the checkpoint's run had {trainer.checkpoint_lr:g})")
        if not all(distributed.gather(trainer.resumed_sampler)):
            log("note: the checkpoint has no sampler state for some ranks (fewer ranks wrote it); they start afresh")
    main = env.is_main
    hrs = validation_set(cfg) if main else []
    monitor = Monitor(out, log, start_iter=trainer.iter) if main else None
    header = ["iter", "loss", "lr", "psnr", "ssim", "bicubic_psnr", "seconds"]
    best = BestCheckpoint(out)
    with csv_log(out / "log.csv", header) if main else nullcontext((None, None)) as (f, writer):
        t0 = t_log = time.time()
        losses: list[float] = []  # since the last validation
        log_losses: list[float] = []  # since the last progress line
        while trainer.iter < cfg.iters:
            loss_now = trainer.step()
            losses.append(loss_now)
            log_losses.append(loss_now)
            it = trainer.iter
            final = it == cfg.iters
            if it % cfg.save_every == 0 or final:
                trainer.save(last)
                log(f"saved {last.name} at iteration {it}")
            lr_now = trainer.opt.param_groups[0]["lr"]
            is_val = it % cfg.val_every == 0 or final
            if it % cfg.log_every == 0 or final:
                # every rank reaches this line at the same iteration, so the mean is a matched collective
                loss = distributed.mean(sum(log_losses) / len(log_losses), device)
                rate = len(log_losses) / max(time.time() - t_log, 1e-9)
                if not is_val:  # the validation line below carries the same numbers
                    eta = (cfg.iters - it) / rate / 3600
                    log(f"iter {it}/{cfg.iters} loss {loss:.4f} lr {lr_now:.2e} | {rate:.2f} it/s, ETA {eta:.1f} h")
                if monitor is not None:
                    monitor.scalars(it, {"train/loss": loss, "train/lr": lr_now, "train/it_per_s": rate})
                t_log, log_losses = time.time(), []
            if is_val:
                loss = distributed.mean(sum(losses) / len(losses), device)
                if main and writer is not None and monitor is not None and f is not None:
                    t_val = time.time()
                    samples: list[torch.Tensor] = []
                    m = validate(trainer.ema, hrs, cfg.scale, samples)
                    dt = time.time() - t0  # as before: the seconds column includes this validation
                    rate = len(losses) / max(dt, 1e-9)
                    eta = (cfg.iters - it) / rate / 3600
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
                    monitor.scalars(it, {f"val/{k}": v for k, v in m.items()})
                    monitor.images(it, samples)
                    monitor.flush()
                    monitor.curves()
                    extra = {"iter": it, "psnr_y": f"{m['psnr']:.3f}", "variant": cfg.variant, "scale": cfg.scale}
                    best.offer(m["psnr"], it, trainer, extra)
                    # the progress-line rate should count training steps only, not this validation
                    t_log += time.time() - t_val
                distributed.barrier()  # the other ranks wait here while rank 0 validates and writes
                t0, losses = time.time(), []
    if monitor is not None:
        monitor.close()
    if os.environ.get(DIGEST_ENV):
        digest = weights_digest(trainer.model.state_dict(), trainer.ema.state_dict())
        (out / f"digest_rank{env.rank}.txt").write_text(digest + "\n")
    distributed.barrier()  # rank 0's files are complete before any rank reports success
    return out


def _is_arbitrary_scale(path: str) -> bool:
    """True for a run file of the arbitrary-scale model (variant esc_lte...); unreadable files say False and
    are reported by the normal reader."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return False
    model = raw.get("model")
    variant = model.get("variant", "") if isinstance(model, dict) else raw.get("variant", "")
    return str(variant).startswith("esc_lte")


def main(argv: list[str] | None = None) -> int:
    parser = run_parser(
        "Train ESC on image folders.", "override the device: cpu, cuda (under torchrun: one GPU per rank)"
    )
    args = parser.parse_args(argv)
    if _is_arbitrary_scale(args.config):  # ESC+LTE: random scales per batch, in training/arbitrary.py
        from .arbitrary import main as arbitrary_main

        return arbitrary_main(argv)
    try:
        cfg = apply_overrides(TrainConfig.from_toml(args.config), args)
    except CONFIG_ERRORS as exc:
        print(f"esc-train: {exc}")
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    try:
        train(cfg, log=lambda s: print(s, flush=True))
    except FileNotFoundError as exc:
        print(f"esc-train: {exc}")
        return 2
    return 0


# the names other modules and older scripts take from here (the loop's pieces live in loop.py)
__all__ = [
    "DIGEST_ENV",
    "TrainConfig",
    "Trainer",
    "lr_factor",
    "main",
    "native_bf16",
    "state_dict_from_model",
    "train",
    "transfer_weights",
    "update_ema",
    "validate",
    "validation_set",
    "weights_digest",
]


if __name__ == "__main__":
    raise SystemExit(main())
