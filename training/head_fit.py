"""A new scale's upsampler fitted by least squares on a trained body: the starting point of a x3 model.

    python -m training.head_fit --init esc_stream/weights/esc_stream_balanced_x2.safetensors --scale 3 \
        --out training/runs/balanced_x3_fit.safetensors [--data ../shared/data/photos63] [--patches 384]

ESC's upsampler is one 3x3 convolution from the body's features to scale² x 3 sub-pixel residuals over
nearest-neighbour upscaling, then a pixel shuffle. With the body fixed, the convolution that minimises the squared
error on training patches is a linear least-squares problem: gather the 3x3 feature neighbourhoods X of LR pixels
and the residuals Y the HR patch asks of them, and solve (XᵀX + λI) W = XᵀY in float64. That is the
mean-squared-error (PSNR) optimum for this body, found in minutes where gradient descent on a fresh upsampler
takes thousands of iterations to catch up with bicubic. Training can then go on from the written weights
(`init_from`). Patches are drawn as the training configs draw them: photos63 downscaled x1/2 as read, textured
patches, MATLAB-bicubic LR quantised to 8 bits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from esc_stream.checkpoints import load_model, read_state_dict, save_checkpoint
from esc_stream.models import create_model

from .data import PatchSampler, load_images
from .loop import transfer_weights

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def fit_head(model: torch.nn.Module, sampler: PatchSampler, batches: int, ridge: float = 1e-4) -> float:
    """Set `model.to_img` to the least-squares fit over `batches` batches of `sampler`; returns the fit's
    training PSNR (RGB, patches) for a sanity check."""
    s = model.upscaling_factor
    conv = model.to_img
    k = conv.weight.shape[1] * 9 + 1
    xtx = torch.zeros(k, k, dtype=torch.float64)
    xty = torch.zeros(k, conv.weight.shape[0], dtype=torch.float64)
    for _ in range(batches):
        lr, hr = sampler.sample()
        feat = model.features(lr)  # (B, C, h, w)
        cols = F.unfold(feat, 3, padding=1)  # (B, C*9, h*w), the conv weight's (c, ky, kx) order
        x = torch.cat([cols, torch.ones_like(cols[:, :1])], 1).transpose(1, 2).reshape(-1, k).double()
        target = F.pixel_unshuffle(hr, s) - torch.repeat_interleave(lr, s * s, dim=1)  # (B, 3*s*s, h, w)
        y = target.flatten(2).transpose(1, 2).reshape(-1, target.shape[1]).double()
        xtx += x.T @ x
        xty += x.T @ y
    n = float(xtx[-1, -1])
    w = torch.linalg.solve(xtx + ridge * n * torch.eye(k, dtype=torch.float64), xty)  # (k, out)
    conv.weight.copy_(w[:-1].T.reshape(conv.weight.shape).to(conv.weight.dtype))
    conv.bias.copy_(w[-1].to(conv.bias.dtype))
    lr, hr = sampler.sample()
    mse = F.mse_loss(model(lr).clamp(0, 1), hr).item()
    return -10.0 * torch.log10(torch.tensor(mse)).item()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", required=True, help="a trained model of the same variant (its body is kept)")
    ap.add_argument("--scale", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "photos63"))
    ap.add_argument("--prescale", type=float, default=0.5)
    ap.add_argument("--min-texture", type=float, default=4.0)
    ap.add_argument("--lr-patch", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--patches", type=int, default=384, help="patches in the fit (a multiple of --batch)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, desc = load_model(args.init)
    model = create_model(desc.variant, args.scale).eval()
    fresh = transfer_weights(model, read_state_dict(args.init))
    print(f"head_fit: {desc.variant} x{args.scale} from {args.init}; fitted: {', '.join(fresh)}")
    sampler = PatchSampler(
        load_images(args.data, prescale=args.prescale), args.scale, args.lr_patch, args.batch, "area", 2,
        args.min_texture,
    )  # fmt: skip
    sampler.seed(args.seed)
    psnr = fit_head(model, sampler, max(1, args.patches // args.batch))
    out = save_checkpoint(args.out, model, extra={"head_fit": f"{args.patches} patches from {args.init}"})
    print(f"head_fit: wrote {out} (training-patch PSNR {psnr:.2f} dB)")


if __name__ == "__main__":
    main()
