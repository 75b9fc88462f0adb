"""Up-front memory estimate: a frame whose upscale cannot fit is refused before the model runs, with a tile size
that fits.

The estimate is deliberately simple and conservative (it errs high). For a W x H frame at scale s, a model whose
features have `dim` channels, and an output of OW x OH (W*s x H*s unless resampled to another size):

    peak = FIXED + PER_CHANNEL * dim * SEEN + PER_INPUT * W*H + PER_OUTPUT * (W*s*H*s [+ OW*OH]) [+ in flight]

- SEEN: the input pixels the network works on at once: W*H for a whole-frame run; with `--tile N`, one tile
  with its context, (N + 2 * overlap)^2 rounded up to whole windows (never more than the frame);
- FIXED: what does not grow with the frame (the fast path's plans and DFT caches, allocator slack);
- PER_INPUT: the frame's copies (8/16-bit, float32, reflect-padded float32);
- PER_OUTPUT: the float32 output and its 8/16-bit copy (tiled or not: the whole output is assembled), and
  again for an output resampled to another size; video adds the frames waiting in the encoder's queue.

The constants are calibrated on the peak RSS of whole-frame and tiled runs of the embedded models (`python -m
esc_stream.budget W H [--model fast|balanced] [--scale S] [--tile N]` measures one and prints it beside the
estimate), then rounded up. Peak RSS added by one call (CPU, fp32, uint8 frames; 2-core EPYC) against this estimate:

    esc_fast x2   1024^2 whole 589 MiB (est. 2.01x)   2048^2 whole 1271 (2.22x)   2048^2 tile 256 1080 (1.24x)
    esc_fast x4   1024^2 whole 644 MiB (est. 2.43x)   1024^2 tile 256 1171 (1.06x: tiled runs hold more here)
    esc_medium x2  512^2 whole 424 MiB (est. 2.28x)   1024^2 whole 1176 (1.66x)
    esc x2 (64 ch) 256^2 whole 369 MiB (est. 2.02x)    512^2 whole  530 (2.01x); esc_light x4 512^2 528 (2.20x)

On CUDA, the network's share is checked against the device's free memory (torch.cuda.mem_get_info) and the
frame's copies against the host's; on the CPU all of it against MemAvailable (psutil when installed, else
/proc/meminfo), no more than a cgroup v2 limit leaves, nor than ESC_STREAM_MEMORY_LIMIT.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any

from .errors import MemoryBudgetError, UserError

MiB, GiB = 2**20, 2**30
FIXED = 640 * MiB
PER_CHANNEL = 24  # bytes per input pixel the network sees at once, per feature channel
PER_INPUT = 32  # bytes per input pixel: uint8/uint16 copy, float32, padded float32
PER_OUTPUT = 32  # bytes per output pixel: float32 output, a float32 copy (tiled runs), its 8/16-bit copy
LIMIT_ENV = "ESC_STREAM_MEMORY_LIMIT"  # caps the host memory planned for: bytes, or with K/M/G (e.g. 8G)
TILES = (2048, 1536, 1024, 768, 512, 384, 256, 192, 128, 96, 64)  # --tile values suggested, largest first


@dataclass(frozen=True)
class Estimate:
    """Estimated peak bytes of one upscale: `network` (on the model's device) and `frame` (host copies)."""

    network: int
    frame: int

    @property
    def total(self) -> int:
        return self.network + self.frame


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def model_channels(upscaler: Any) -> int:
    """The feature channels of an upscaler's network (64, ESC's, when it does not say)."""
    model = getattr(upscaler, "model", None)
    dim = getattr(model, "out_dim", None)
    if not isinstance(dim, int):
        proj = getattr(model, "proj", None)
        dim = getattr(proj, "out_channels", None)
    return dim if isinstance(dim, int) and dim > 0 else 64


def estimate(
    width: int,
    height: int,
    scale: int,
    channels: int,
    *,
    tile: int | None = None,
    overlap: int = 64,
    window: int = 16,
    out_size: tuple[int, int] | None = None,
    in_flight: int = 0,
) -> Estimate:
    """Estimated peak bytes of upscaling one `width` x `height` frame (see the module's formula). `out_size`
    (width, height): an output resampled to that size; `in_flight`: output frames queued for an encoder."""
    window = max(1, window)
    pw, ph = _round_up(width, window), _round_up(height, window)
    seen = pw * ph
    if tile is not None:
        side = _round_up(max(window, tile), window) + 2 * _round_up(max(overlap, 0), window)
        seen = min(seen, min(side, pw) * min(side, ph))
    out_px = width * scale * height * scale
    if out_size is not None and tuple(out_size) != (width * scale, height * scale):
        final = out_size[0] * out_size[1]
        # the resampled output and the resampler's one-axis intermediate (either axis may go first)
        out_px += final + max(out_size[0] * height * scale, width * scale * out_size[1])
    else:
        final = out_px
    network = FIXED + PER_CHANNEL * channels * seen
    frame = PER_INPUT * pw * ph + PER_OUTPUT * out_px + in_flight * 6 * final
    return Estimate(network, frame)


def available_memory(device: Any = "cpu") -> tuple[int, str]:
    """(bytes free, what it is) for the host (device "cpu") or a CUDA device."""
    kind = str(device)
    if kind.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(kind))
        return int(free), f"free on {kind}"
    return host_available(), "of RAM available"


def parse_bytes(text: str) -> int:
    """ "8G", "512M", "64k" or a number of bytes; UserError otherwise."""
    units = {"": 1, "K": 2**10, "M": MiB, "G": GiB, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in units and t[-1:] else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise UserError(f"{LIMIT_ENV}={text}: give bytes, or a number with K, M or G (e.g. 8G)") from None
    if not value > 0:
        raise UserError(f"{LIMIT_ENV}={text}: must be more than 0")
    return int(value * units[unit])


def host_available() -> int:
    """The host memory a run may plan for: MemAvailable (psutil's when it is installed, else /proc/meminfo's),
    no more than a cgroup v2 limit leaves (containers: meminfo shows the host's), nor than ESC_STREAM_MEMORY_LIMIT;
    very large when none of these can be read."""
    free = sys.maxsize
    try:
        import psutil  # type: ignore[import-untyped]

        free = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                free = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), free)
        except OSError:
            pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            free = min(free, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    cap = os.environ.get(LIMIT_ENV)
    return min(free, parse_bytes(cap)) if cap else free


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{math.ceil(n / MiB)} MiB"


def check_memory(
    upscaler: Any,
    width: int,
    height: int,
    *,
    out_size: tuple[int, int] | None = None,
    in_flight: int = 0,
    what: str = "",
    available: tuple[int, int] | None = None,
) -> Estimate:
    """Refuse (MemoryBudgetError, one line) a frame whose estimated peak does not fit; return the estimate.

    The upscaler's own tile (--tile) is estimated for when it has one; the suggested --tile is the largest of
    TILES that fits. `what` names the input in the message; `available` = (device bytes, host bytes) overrides
    what is measured (tests)."""
    scale = int(getattr(upscaler, "scale", 2))
    channels = model_channels(upscaler)
    window = int(getattr(upscaler, "window_size", 16) or 16)
    overlap = int(getattr(upscaler, "overlap", 64))
    tile = getattr(upscaler, "tile", None)
    device = getattr(upscaler, "device", "cpu")
    on_cuda = str(device).startswith("cuda")
    if available is not None:
        dev_free, host_free = available
        where = "free on the device" if on_cuda else "of RAM available"
    else:
        host_free = host_available()
        dev_free, where = available_memory(device) if on_cuda else (host_free, "of RAM available")

    def fits(e: Estimate) -> bool:
        if on_cuda:
            return e.network + e.frame <= dev_free and e.frame <= host_free  # the output is assembled on the device
        return e.total <= host_free

    def est(t: int | None) -> Estimate:
        return estimate(width, height, scale, channels, tile=t, overlap=overlap, window=window,
                        out_size=out_size, in_flight=in_flight)  # fmt: skip

    e = est(tile)
    if fits(e):
        return e
    free = min(dev_free, host_free) if on_cuda else host_free
    name = f"{what}: " if what else ""
    size = f"{width}x{height}"
    target = f" -> {out_size[0]}x{out_size[1]}" if out_size else f" at x{scale}"
    tiled = f" with --tile {tile}" if tile else ""
    head = f"{name}{size}{target}{tiled} needs about {_gib(e.total)} (estimate), more than the {_gib(free)} {where}"
    for t in TILES:
        if (tile is None or t < tile) and t < max(width, height) and fits(est(t)):
            raise MemoryBudgetError(f"{head}; try --tile {t} (about {_gib(est(t).total)})")
    whole = est(TILES[-1]).frame  # the input and output copies, which no tile size makes smaller
    raise MemoryBudgetError(f"{head}; no --tile helps, the input and output alone need about {_gib(whole)}: "
                            "ask for a smaller size")  # fmt: skip


def _measure(argv: list[str] | None = None) -> None:
    """Peak RSS added by one upscale of a random W x H frame (after loading and a warm-up call), beside the
    estimate: the calibration of this module's constants. Linux only (VmHWM, reset through clear_refs)."""
    import argparse
    import time

    import numpy as np

    from .upscaler import load

    ap = argparse.ArgumentParser(prog="python -m esc_stream.budget", description=_measure.__doc__)
    ap.add_argument("width", type=int)
    ap.add_argument("height", type=int)
    ap.add_argument("--model", default="fast")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--weights")
    ap.add_argument("--tile", type=int)
    args = ap.parse_args(argv)

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    up = load(args.weights, scale=args.scale, model=args.model, tile=args.tile)
    up(np.zeros((64, 64, 3), np.uint8))
    x = np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base, t0 = status("VmRSS:"), time.perf_counter()
    up(x)
    seconds, peak = time.perf_counter() - t0, status("VmHWM:") - base
    e = estimate(args.width, args.height, up.scale, model_channels(up), tile=args.tile, overlap=up.overlap,
                 window=up.window_size)  # fmt: skip
    print(f"{up.variant} x{up.scale} dim {model_channels(up)} {args.width}x{args.height} tile {args.tile}: "
          f"measured {peak / MiB:.0f} MiB, estimate {e.total / MiB:.0f} MiB ({e.total / max(peak, 1):.2f}x), "
          f"{seconds:.1f} s")  # fmt: skip


if __name__ == "__main__":
    _measure()


__all__ = ["Estimate", "MemoryBudgetError", "available_memory", "check_memory", "estimate", "host_available"]
