"""`python -m esc_stream.cuda [WEIGHTS] [--tol T]`: the FlashBias rank and bias error of each window attention."""

from __future__ import annotations

import argparse

from ..models.blocks import WindowAttention
from ..upscaler import load
from .attention import DEFAULT_TOLERANCE, factors_of, rank_limit


def main(argv: list[str] | None = None) -> int:
    """FlashBias rank and bias error per block."""
    parser = argparse.ArgumentParser(prog="python -m esc_stream.cuda", description=__doc__)
    parser.add_argument("weights", nargs="?", help="checkpoint (default: the embedded default model)")
    parser.add_argument("--tol", type=float, default=DEFAULT_TOLERANCE)
    args = parser.parse_args(argv)
    up = load(args.weights, device="cpu", backend="torch-eager")
    print(f"{up.variant} x{up.scale} ({up.source}), tolerance {args.tol:g}")
    for name, m in up.model.named_modules():
        if isinstance(m, WindowAttention):
            n, hd = m.window_size**2, m.dim // m.num_heads
            f = factors_of(m, tol=args.tol)
            print(
                f"{name}: N={n}, head dim {hd}, rank {f.rank} (limit {rank_limit(hd)}), max |bias error| {f.error:.2e}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
