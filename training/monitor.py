"""Optional run outputs beside log.csv: TensorBoard scalars/images under <out>/tb and <out>/curves.png.

Both packages come with the `train` extra; each is imported lazily and skipped with one notice when missing.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

INSTALL_HINT = "pip install 'esc-stream[train]'"


def plot_curves(log_csv: str | Path, png: str | Path) -> bool:
    """Loss and validation PSNR (bicubic dashed) vs iteration from log.csv; False if matplotlib or rows are missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    its: list[int] = []
    loss: list[float] = []
    psnr: list[float] = []
    bic: list[float] = []
    try:
        with open(log_csv, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    values = int(row["iter"]), float(row["loss"]), float(row["psnr"]), float(row["bicubic_psnr"])
                except (KeyError, TypeError, ValueError):
                    continue  # a torn last line of a killed run
                its.append(values[0])
                loss.append(values[1])
                psnr.append(values[2])
                bic.append(values[3])
    except OSError:
        return False
    if not its:
        return False
    # Figure + Agg canvas directly: no pyplot, so no global backend switch in the training process
    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_psnr = fig.subplots(1, 2)
    ax_loss.plot(its, loss, marker=".")
    ax_loss.set(xlabel="iteration", ylabel="L1 loss (mean since last validation)", yscale="log", title="loss")
    ax_psnr.plot(its, psnr, marker=".", label="EMA model")
    ax_psnr.plot(its, bic, "--", color="gray", label="bicubic")
    ax_psnr.set(xlabel="iteration", ylabel="PSNR Y (dB)", title="validation PSNR")
    ax_psnr.legend()
    for ax in (ax_loss, ax_psnr):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    png = Path(png)
    tmp = png.with_name(png.name + ".tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(png)  # a viewer refreshing the file never sees half a PNG
    return True


class Monitor:
    """Rank 0's TensorBoard writer and curves plot; each part turns itself off when its package is missing."""

    def __init__(self, out: str | Path, log: Callable[[str], None], start_iter: int = 0) -> None:
        self.out = Path(out)
        self.log = log
        self.writer: Any = None
        self.plots = True
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log(f"TensorBoard logging off: the tensorboard package is not installed ({INSTALL_HINT})")
        else:
            # purge_step drops events a killed run logged after its last checkpoint, so curves do not fold back
            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=start_iter or None)

    def scalars(self, it: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, it)

    def images(self, it: int, strips: list[torch.Tensor]) -> None:
        """(3, H, W) float images in 0..1, e.g. LR-bicubic | SR | HR strips."""
        if self.writer is not None:
            for i, strip in enumerate(strips):
                self.writer.add_image(f"samples/{i}", strip.clamp(0, 1), it, dataformats="CHW")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def curves(self) -> None:
        if self.plots and not plot_curves(self.out / "log.csv", self.out / "curves.png"):
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                self.plots = False
                self.log(f"curves.png off: matplotlib is not installed ({INSTALL_HINT})")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
