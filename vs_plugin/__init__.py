"""VapourSynth front end of esc-stream: `core.esc.Upscale` (native shim) and `esc_stream.vapoursynth.upscale`
(import style). Installed as `esc_stream.vapoursynth` (the repository keeps it in vs_plugin/)."""

from __future__ import annotations

import os

import vapoursynth as vs

__all__ = ["upscale"]


def _ensure_plugin(core: vs.Core) -> None:
    """Load the shim by path where autoloading did not (e.g. a VapourSynth started with autoloading off)."""
    if any(p.namespace == "esc" for p in core.plugins()):
        return
    from .build import plugin_path

    path = plugin_path()
    if not path.is_file():
        raise vs.Error("esc.Upscale: the native plugin is not installed; run `python -m esc_stream.vapoursynth.build`")
    core.std.LoadPlugin(str(path))


def upscale(
    clip: vs.VideoNode,
    scale: int | None = None,
    weights: str | os.PathLike[str] | None = None,
    model: str | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    device: str | None = None,
    num_streams: int | None = None,
    batch: int | None = None,
    width: int | None = None,
    height: int | None = None,
) -> vs.VideoNode:
    """Same as `core.esc.Upscale(clip, ...)`; None leaves an argument at the filter's default."""
    _ensure_plugin(vs.core)
    kwargs = {"scale": scale, "tile": tile, "overlap": overlap, "device": device}
    kwargs |= {"num_streams": num_streams, "batch": batch, "weights": None if weights is None else os.fspath(weights)}
    kwargs |= {"width": width, "height": height, "model": model}
    return vs.core.esc.Upscale(clip, **{k: v for k, v in kwargs.items() if v is not None})
