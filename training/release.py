"""Evaluate a trained run on Kodak24 and ship its EMA weights as one embedded model of the family.

    python -m training.release --run training/runs/fast_x2 --tier fast --scale 2 [--finetune training/runs/temporal_x2]
    python -m training.release --weights FILE --tier balanced --scale 4     (re-measure and re-stamp a shipped file)

Writes esc_stream/weights/esc_stream_{tier}_x{S}.safetensors with what was measured in its metadata (variant,
parameters, Kodak24 PSNR/SSIM and bicubic's, input Mpx/s at 320x180 on 2 threads, snapshot, training data), then
rewrites the model card's family table from every embedded model's metadata (the table `esc-video models` prints
too), a results block, and for the balanced tier docs/before_after_x{S}.png (bicubic vs model crops). With
--finetune the temporally fine-tuned EMA of that folder is shipped instead of the run's best EMA; both are
evaluated on Kodak24 and the fine-tune's clip validation (PSNR and flicker, first and last rows of its log) goes
into the card.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from esc_stream.checkpoints import load_model, read_state_dict
from esc_stream.metrics import psnr_y, ssim_y
from esc_stream.reparam import prepare_for_inference
from esc_stream.resize import imresize
from esc_stream.tiling import upscale_tensor

from .data import bicubic_down, list_images, read_rgb

ROOT = Path(__file__).resolve().parents[1]


def evaluation_pairs(val_dir: Path, scale: int, limit: int = 0):
    """(HR, LR) pairs of a validation folder: HR cropped to a multiple of scale, LR its MATLAB-bicubic downscale
    quantised to 8 bits (the protocol of the model card's tables); `limit` = only the first N images."""
    for path in list_images(val_dir)[: limit or None]:
        hr = read_rgb(path)[None].float() / 255
        h, w = hr.shape[-2:]
        hr = hr[..., : h - h % scale, : w - w % scale]
        yield hr, (bicubic_down(hr, scale).clamp(0, 1) * 255).round() / 255


@torch.inference_mode()
def evaluate(weights: Path, val_dir: Path, scale: int) -> dict[str, float]:
    """Y-channel PSNR/SSIM (border = scale) of the model and of MATLAB-bicubic upscaling, over a folder."""
    model, desc = load_model(weights)
    prepare_for_inference(model)
    window = int(desc.config["window_size"])
    sums = dict(psnr=0.0, ssim=0.0, bicubic_psnr=0.0, bicubic_ssim=0.0, seconds=0.0)
    images = 0
    for hr, lr in evaluation_pairs(val_dir, scale):
        images += 1
        t0 = time.perf_counter()
        sr = upscale_tensor(model, lr, scale, window)
        sums["seconds"] += time.perf_counter() - t0
        bic = imresize(lr.double(), scale=scale).float()
        sums["psnr"] += psnr_y(sr, hr, scale)
        sums["ssim"] += ssim_y(sr, hr, scale)
        sums["bicubic_psnr"] += psnr_y(bic, hr, scale)
        sums["bicubic_ssim"] += ssim_y(bic, hr, scale)
    return {k: v / images for k, v in sums.items()} | {"images": images}


@torch.inference_mode()
def before_after(weights: Path, val_dir: Path, scale: int, out: Path, crops: int = 3, hr_size: int = 192) -> Path:
    """A grid of crops: bicubic | model | original, for the README (the same 192x192 HR regions at any scale)."""
    size = hr_size // scale
    model, desc = load_model(weights)
    prepare_for_inference(model)
    window = int(desc.config["window_size"])
    picks = [("kodim23.png", (200, 260)), ("kodim08.png", (180, 300)), ("kodim19.png", (380, 200))][:crops]
    rows = []
    for name, (y, x) in picks:
        hr = read_rgb(val_dir / name)[None].float() / 255
        hr = hr[..., y : y + size * scale, x : x + size * scale]
        lr = (bicubic_down(hr, scale).clamp(0, 1) * 255).round() / 255
        sr = upscale_tensor(model, lr, scale, window).clamp(0, 1)
        bic = imresize(lr.double(), scale=scale).float().clamp(0, 1)
        tiles = [F.interpolate(t, scale_factor=2, mode="nearest") for t in (bic, sr, hr)]  # enlarged to see pixels
        rows.append(torch.cat(tiles, dim=3))
    grid = (torch.cat(rows, dim=2)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(grid)
    draw = ImageDraw.Draw(img)
    step = grid.shape[1] // 3
    for i, label in enumerate(["bicubic", "esc-stream default", "original"]):
        draw.rectangle([i * step + 4, 4, i * step + 8 + 7 * len(label), 18], fill=(0, 0, 0))
        draw.text((i * step + 6, 5), label, fill=(255, 255, 255))
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


def _run_summary(run: Path) -> tuple[int, float]:
    """(iteration of the best EMA, CPU hours so far) from the run's log."""
    best_iter = int((run / "best.txt").read_text().split()[1])
    return best_iter, _logged_hours(run)


def _logged_hours(run: Path, upto: float = math.inf) -> float:
    """Hours in a run's log.csv (each row's seconds since the row before), counting rows up to iteration `upto`."""
    seconds = 0.0
    with open(run / "log.csv") as f:
        for row in csv.DictReader(f):
            if int(row["iter"]) <= upto:
                seconds += float(row["seconds"])
    return seconds / 3600


def parse_lineage(spec: str) -> tuple[Path, int]:
    """`RUN:ITER`, a run this one started from (init_from or a copy of its checkpoint) and the iteration it left at."""
    run, sep, it = spec.rpartition(":")
    if not sep or not it.isdigit() or not (Path(run) / "log.csv").is_file():
        raise argparse.ArgumentTypeError(f"{spec!r}: expected RUN:ITERATION with RUN a run folder holding log.csv")
    return Path(run), int(it)


def finetune_summary(folder: Path) -> dict[str, float]:
    """Iterations and clip PSNR / flicker before and after, from a temporal fine-tune's log."""
    with open(folder / "finetune_log.csv") as f:
        rows = list(csv.DictReader(f))
    if len(rows) < 2:
        raise SystemExit(f"{folder}: the fine-tune has no validation after its start yet")
    first, last = rows[0], rows[-1]
    return {"iters": int(last["iter"]), "psnr_before": float(first["psnr"]), "psnr_after": float(last["psnr"]),
            "flicker_before": float(first["flicker"]), "flicker_after": float(last["flicker"])}  # fmt: skip


def _replace_block(text: str, start: str, end: str, block: str, anchor: str) -> str:
    """Swap the block between the `start` and `end` comments, or add it under the `anchor` comment the first time."""
    pattern = re.compile(rf"<!-- {start} -->.*?<!-- {end} -->", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    if f"<!-- {anchor} -->" not in text:
        raise SystemExit(f"MODEL_CARD.md has no <!-- {anchor} --> marker")
    return text.replace(f"<!-- {anchor} -->", f"<!-- {anchor} -->\n{block}")


def release_speed(weights: Path, threads: int = 2, repeat: int = 5) -> float:
    """Input Mpx/s of `esc_stream.load(weights)` on a 320x180 uint8 frame (median of `repeat` calls)."""
    import esc_stream

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        up = esc_stream.load(weights)
        frame = np.random.default_rng(0).integers(0, 256, (180, 320, 3), dtype=np.uint8)
        up(frame)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            up(frame)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 320 * 180 / float(np.median(times)) / 1e6


def ship(source: Path, target: Path, meta: dict[str, str]) -> Path:
    """Write the weights of `source` to `target` (safetensors, temporary name then rename) with `meta` attached."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in read_state_dict(source).items()}
    tmp = target.with_name(target.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(target)
    return target


FAMILY_HEAD = (
    "| tier | scale | variant | parameters | Kodak24 PSNR / SSIM | vs bicubic | input Mpx/s at 320×180 (release) "
    "| snapshot | trained on |\n|---|---|---|---|---|---|---|---|---|"
)


def family_table(weights_dir: Path) -> str:
    """The model card's family table: one row per embedded model file, from the metadata `ship` wrote."""
    from safetensors import safe_open

    rows = []
    for path in sorted(weights_dir.glob("esc_stream_*_x*.safetensors")):
        with safe_open(str(path), "pt") as f:
            m = f.metadata() or {}
        if "tier" not in m:
            continue
        psnr, bic = float(m["kodak24_psnr"]), float(m["kodak24_bicubic_psnr"])
        rows.append((m["tier"] != "fast", int(m["scale"]), (
            f"| {m['tier']} | ×{m['scale']} | `{m['variant']}` | {int(m['parameters']) / 1e3:.0f}K | "
            f"{psnr:.2f} / {float(m['kodak24_ssim']):.4f} | {psnr - bic:+.2f} dB | {float(m['mpx_s_320x180']):.2f} | "
            f"{m['snapshot']} | {m['train_data']} |"
        )))  # fmt: skip
    return "\n".join([FAMILY_HEAD] + [r[2] for r in sorted(rows)])


def main(argv: list[str] | None = None) -> None:
    from esc_stream.upscaler import TIERS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="a run folder: its best_ema.safetensors is shipped")
    src.add_argument("--weights", type=Path, help="a weights file to ship (e.g. to re-stamp a shipped model)")
    ap.add_argument("--tier", choices=TIERS, default="balanced")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--val", type=Path, default=ROOT.parent / "shared" / "data" / "kodak24")
    ap.add_argument("--finetune", type=Path, help="ship this temporal fine-tune folder's finetuned_ema.safetensors")
    ap.add_argument("--lineage", type=parse_lineage, action="append", default=[], metavar="RUN:ITER",
                    help="a run this one started from and the iteration it left at, so that the training time "
                    "counts its hours too (repeatable)")  # fmt: skip
    ap.add_argument("--snapshot", help="how the snapshot is described in the card (default: from the run's log)")
    ap.add_argument("--train-data", default="photos63", help="what the weights were trained on, for the card")
    ap.add_argument("--weights-dir", type=Path, default=ROOT / "esc_stream" / "weights")
    args = ap.parse_args(argv)
    target = args.weights_dir / f"esc_stream_{args.tier}_x{args.scale}.safetensors"
    card = args.weights_dir / "MODEL_CARD.md"
    if args.run is not None:
        best = args.run / "best_ema.safetensors"
        it, hours = _run_summary(args.run)
        hours += sum(_logged_hours(run, upto) for run, upto in args.lineage)
        snapshot = args.snapshot or f"iteration {it}"
    else:
        best, hours = args.weights, math.nan
        snapshot = args.snapshot or "as shipped"
    if args.finetune:
        image_model = evaluate(best, args.val, args.scale)
        print(f"image model before the temporal fine-tune: Kodak24 {image_model['psnr']:.3f} dB / "
              f"{image_model['ssim']:.4f}")  # fmt: skip
        ft = finetune_summary(args.finetune)
        best = args.finetune / "finetuned_ema.safetensors"
        snapshot += f" + {ft['iters']} temporal"
    m = evaluate(best, args.val, args.scale)
    model, desc = load_model(best)
    if desc.scale != args.scale:
        raise SystemExit(f"{best} is a x{desc.scale} model, not x{args.scale}")
    meta = {
        "tier": args.tier,
        "scale": str(args.scale),
        "variant": desc.variant,
        "parameters": str(sum(p.numel() for p in model.parameters())),
        "kodak24_psnr": f"{m['psnr']:.4f}",
        "kodak24_ssim": f"{m['ssim']:.4f}",
        "kodak24_bicubic_psnr": f"{m['bicubic_psnr']:.4f}",
        "mpx_s_320x180": f"{release_speed(best):.4f}",
        "snapshot": snapshot,
        "train_data": args.train_data,
    }
    ship(best, target, meta)
    text = card.read_text()
    text = _replace_block(text, "family", "end family", f"<!-- family -->\n{family_table(args.weights_dir)}\n"
                          "<!-- end family -->", "family table")  # fmt: skip
    if args.tier == "balanced" and args.weights_dir == ROOT / "esc_stream" / "weights":
        pic = before_after(target, args.val, args.scale, ROOT / "docs" / f"before_after_x{args.scale}.png")
        print(f"wrote {pic}")
    name = f"{args.tier} x{args.scale}"
    block = (
        f"<!-- results {name} -->\n"
        f"| {args.tier} | x{args.scale} | {snapshot} | {hours:.1f} h | "
        f"{m['psnr']:.2f} / {m['ssim']:.4f} | {m['bicubic_psnr']:.2f} / {m['bicubic_ssim']:.4f} | "
        f"{m['psnr'] - m['bicubic_psnr']:+.2f} dB |\n"
        f"<!-- end {name} -->"
    )
    if args.run is not None:
        text = _replace_block(text, f"results {name}", f"end {name}", block, "results")
    if args.finetune:
        tname = f"temporal {name}"
        text = _replace_block(text, tname, f"end {tname}", (
            f"<!-- {tname} -->\n"
            f"| {args.tier} | x{args.scale} | {ft['iters']} | {ft['psnr_before']:.2f} → {ft['psnr_after']:.2f} dB | "
            f"{ft['flicker_before']:.3f} → {ft['flicker_after']:.3f} | "
            f"{image_model['psnr']:.2f} → {m['psnr']:.2f} dB |\n"
            f"<!-- end {tname} -->"
        ), "temporal")  # fmt: skip
    card.write_text(text)
    print(f"{best} -> {target}")
    print(f"Kodak24 x{args.scale} (Y, border {args.scale}, {m['images']} images): model {m['psnr']:.3f} dB / "
          f"{m['ssim']:.4f}, bicubic {m['bicubic_psnr']:.3f} dB / {m['bicubic_ssim']:.4f}, "
          f"gain {m['psnr'] - m['bicubic_psnr']:+.3f} dB; {m['seconds']:.2f} s/image; "
          f"{float(meta['mpx_s_320x180']):.3f} input Mpx/s at 320x180")  # fmt: skip
    print(f"wrote {target} and {card}")


if __name__ == "__main__":
    main()
