"""Training the arbitrary-scale ESC (ESC encoder + LTE decoder) with a random scale per batch, as LTE does.

Each batch draws one scale s in [scale_min, scale_max]; every sample is an HR crop of round(s * lr_patch)
pixels, its LR input the MATLAB-bicubic downscale to lr_patch, and its targets `sample_q` HR pixels drawn at
random, given to the network as (coordinate, cell, RGB) triples. Inputs and targets are normalised to
[-1, 1] and the loss is L1 there, as in the official esc_arb training.

The optimizer, schedule, EMA, BasicSR-layout checkpoints and exact resume are `loop.Trainer`'s:
`ArbitraryTrainer` only swaps the sampler and the loss. Run it with
`python -m training.arbitrary --config training/configs/lte_x2.toml` (or `esc-train` with that config).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from esc_stream.metrics import psnr_y
from esc_stream.models.lte import make_coord
from esc_stream.resize import imresize

from .data import SeededSampler, load_images, rank_seed
from .loop import (
    CONFIG_ERRORS,
    BestCheckpoint,
    TrainConfig,
    Trainer,
    apply_overrides,
    csv_log,
    resume_if_saved,
    run_parser,
    update_ema,
    validation_set,
)


@dataclass
class ArbitraryConfig(TrainConfig):
    """A TrainConfig for ESC-LTE: `scale` is only the nominal one; scales are drawn from [scale_min, scale_max]."""

    variant: str = "esc_lte"
    scale_min: float = 1.0
    scale_max: float = 4.0
    sample_q: int = 2304
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    val_scales: tuple[float, ...] = (1.5, 2.0, 3.0, 4.0)
    out: str = "runs/lte"

    @classmethod
    def from_toml(cls, path: str | Path) -> ArbitraryConfig:
        cfg = super().from_toml(path)
        assert isinstance(cfg, ArbitraryConfig)
        cfg.val_scales = tuple(float(s) for s in cfg.val_scales)
        return cfg


class QuerySampler(SeededSampler):
    """Random (LR, coord, cell, RGB) batches at one random scale per batch, all drawn from `generator`."""

    def __init__(
        self, images: list[torch.Tensor], lr_patch: int, batch: int, scale_min: float, scale_max: float, sample_q: int
    ) -> None:
        if not 1 <= scale_min <= scale_max:
            raise ValueError(f"need 1 <= scale_min <= scale_max, got {scale_min}, {scale_max}")
        self.lr_patch, self.batch = lr_patch, batch
        self.scale_min, self.scale_max, self.sample_q = scale_min, scale_max, sample_q
        biggest = round(lr_patch * scale_max)
        self.images = [im for im in images if min(im.shape[1:]) >= biggest]
        if not self.images:
            raise ValueError(f"no training image is at least {biggest}x{biggest} (lr_patch x scale_max)")
        super().__init__()

    def sample(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """inp (B, 3, p, p) in [0, 1]; coord, cell (B, Q, 2) as (y, x) in [-1, 1] units; rgb (B, Q, 3) in [0, 1]."""
        s = self.scale_min + (self.scale_max - self.scale_min) * float(torch.rand((), generator=self.generator))
        hp = round(self.lr_patch * s)
        crops = []
        for _ in range(self.batch):
            im = self.images[self._randint(len(self.images))]
            y, x = self._randint(im.shape[1] - hp + 1), self._randint(im.shape[2] - hp + 1)
            crops.append(self._augment(im[:, y : y + hp, x : x + hp]))
        hr = torch.stack(crops).float() / 255.0
        lr = imresize(hr.double(), size=(self.lr_patch, self.lr_patch)).float()
        lr = (lr.clamp(0, 1) * 255.0).round() / 255.0  # an 8-bit LR, as a decoded frame would be
        grid = torch.stack(torch.meshgrid(make_coord(hp), make_coord(hp), indexing="ij"), -1).view(-1, 2)
        q = min(self.sample_q, hp * hp)
        idx = torch.stack([torch.randperm(hp * hp, generator=self.generator)[:q] for _ in range(self.batch)])
        coord = grid[idx]  # (B, Q, 2)
        rgb = hr.flatten(2).transpose(1, 2).gather(1, idx.unsqueeze(-1).expand(-1, -1, 3))
        cell = torch.full_like(coord, 2.0 / hp)
        return lr, coord, cell, rgb


class ArbitraryTrainer(Trainer):
    """`Trainer` with the query sampler and the LTE loss; everything else (optimizer, EMA, resume) is shared."""

    cfg: ArbitraryConfig

    def __init__(
        self,
        cfg: ArbitraryConfig,
        images: list[torch.Tensor] | None = None,
        rank: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        images = images if images is not None else load_images(cfg.train_dir)
        super().__init__(cfg, images, rank, device)
        self.sampler = QuerySampler(  # type: ignore[assignment]
            images, cfg.lr_patch, cfg.batch, cfg.scale_min, cfg.scale_max, cfg.sample_q
        )
        self.sampler.seed(rank_seed(cfg.seed, self.rank))

    def step(self) -> float:
        self.net.train()
        lr, coord, cell, rgb = (t.to(self.device) for t in self.sampler.sample())  # type: ignore[misc]
        pred = self.net((lr - 0.5) / 0.5, coord, cell)
        loss = F.l1_loss(pred, (rgb - 0.5) / 0.5)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        update_ema(self.ema, self.model, self.cfg.ema)
        self.iter += 1
        return loss.item()


@torch.no_grad()
def validate_scales(model: nn.Module, hrs: list[torch.Tensor], scales: tuple[float, ...]) -> dict[str, float]:
    """PSNR (Y, border ceil(s)) of the model and of bicubic at each scale: HR cropped so the LR size is whole,
    LR = MATLAB bicubic downscale (8-bit), SR decoded straight at the HR size."""
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, float] = {}
    for s in scales:
        psnr = bic = 0.0
        for hr in hrs:
            hr = crop_to_scale(hr, s)
            lh, lw = round(hr.shape[-2] / s), round(hr.shape[-1] / s)
            lr = (imresize(hr.double(), size=(lh, lw)).float().clamp(0, 1) * 255).round() / 255
            size = (hr.shape[-2], hr.shape[-1])
            sr = model.render(lr.to(device), size).cpu()  # type: ignore[operator]
            up = imresize(lr.double(), size=size).float()
            border = math.ceil(s)
            psnr += psnr_y(sr, hr, border)
            bic += psnr_y(up, hr, border)
        out[f"psnr_x{s:g}"] = psnr / len(hrs)
        out[f"bicubic_x{s:g}"] = bic / len(hrs)
    return out


def crop_to_scale(hr: torch.Tensor, s: float) -> torch.Tensor:
    """The largest top-left crop whose sides divided by `s` are whole numbers (so LR and HR grids align)."""
    num, den = float(s).as_integer_ratio()
    step = num // math.gcd(num, den)  # a multiple of `step` pixels / s is a whole number
    if step > 64:  # an awkward ratio: keep the size, the LR size is then rounded
        return hr
    h, w = hr.shape[-2] - hr.shape[-2] % step, hr.shape[-1] - hr.shape[-1] % step
    return hr[..., :h, :w]


def train(cfg: ArbitraryConfig, log: Callable[[str], None] = print) -> Path:
    """Run (or resume from <out>/last.pth) the configured training; single process. Returns the output folder."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    trainer = ArbitraryTrainer(cfg, device=cfg.device)
    last = out / "last.pth"
    resume_if_saved(trainer, last, log)
    hrs = validation_set(cfg)
    keys = [f"{k}_x{s:g}" for s in cfg.val_scales for k in ("psnr", "bicubic")]
    best = BestCheckpoint(out)
    with csv_log(out / "log.csv", ["iter", "loss", "lr", *keys, "seconds"]) as (f, writer):
        t0, losses = time.time(), []
        while trainer.iter < cfg.iters:
            losses.append(trainer.step())
            it = trainer.iter
            final = it == cfg.iters
            if it % cfg.save_every == 0 or final:
                trainer.save(last)
            if it % cfg.log_every == 0 and not final:
                log(f"iter {it}/{cfg.iters} loss {sum(losses[-cfg.log_every :]) / cfg.log_every:.4f}")
            if it % cfg.val_every == 0 or final:
                m = validate_scales(trainer.ema, hrs, cfg.val_scales)
                loss = sum(losses) / len(losses)
                lr_now = trainer.opt.param_groups[0]["lr"]
                writer.writerow([it, f"{loss:.5f}", f"{lr_now:.3g}", *(f"{m[k]:.3f}" for k in keys),
                                 f"{time.time() - t0:.1f}"])  # fmt: skip
                f.flush()
                log(f"iter {it}/{cfg.iters} loss {loss:.4f} | EMA PSNR " + ", ".join(
                    f"x{s:g} {m[f'psnr_x{s:g}']:.2f} (bicubic {m[f'bicubic_x{s:g}']:.2f})" for s in cfg.val_scales
                ))  # fmt: skip
                mean = sum(m[f"psnr_x{s:g}"] for s in cfg.val_scales) / len(cfg.val_scales)
                best.offer(mean, it, trainer, {"iter": it, "mean_psnr_y": f"{mean:.3f}", "variant": cfg.variant})
                t0, losses = time.time(), []
    return out


def main(argv: list[str] | None = None) -> int:
    args = run_parser("Train the arbitrary-scale ESC (ESC + LTE).").parse_args(argv)
    try:
        cfg = apply_overrides(ArbitraryConfig.from_toml(args.config), args)
    except CONFIG_ERRORS as exc:
        print(f"esc-train: {exc}")
        return 2
    try:
        train(cfg, log=lambda s: print(s, flush=True))
    except (FileNotFoundError, ValueError) as exc:
        print(f"esc-train: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
