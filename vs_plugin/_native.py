"""The Python half of `core.esc.Upscale`: the C shim calls `create` at script time and `NodeRunner.process` per
frame.

Everything a user can get wrong is checked here, before any frame is requested, and raised as an `EscError`
(the shim turns it into a one-line vs.Error "esc.Upscale: ..."). No VapourSynth object is touched here:
the shim builds the graph from the plan this module returns.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

import esc_stream
from esc_stream.devices import resolve_device
from esc_stream.errors import CheckpointError, EscError, UserError
from esc_stream.upscaler import check_tier
from esc_stream.video.colour import target_size

from .runner import NodeRunner

# VapourSynth API v4 enums (VapourSynth4.h).
CF_GRAY, CF_RGB, CF_YUV = 1, 2, 3
ST_INTEGER, ST_FLOAT = 0, 1

MATRIX_NAMES = {0: "RGB", 1: "BT.709", 4: "FCC", 5: "BT.470BG", 6: "ST170M (BT.601)", 7: "ST240M", 8: "YCgCo"}
MATRIX_NAMES |= {9: "BT.2020 NCL", 10: "BT.2020 CL", 12: "chromaticity NCL", 13: "chromaticity CL", 14: "ICtCp"}
CHROMA_NAMES = {0: "left", 1: "center", 2: "top_left", 3: "top", 4: "bottom_left", 5: "bottom"}
# Constant-luminance matrices convert through linear light, so only for them the transfer matters.
MATRICES_NEEDING_TRANSFER = {10, 13, 14}
UNSPECIFIED = 2
MAX_BATCH = 64
MAX_STREAMS = 16

Step = tuple[str, str, dict[str, int | str]]


def video_format_id(cf: int, st: int, bits: int, ssw: int, ssh: int) -> int:
    """VS_MAKE_VIDEO_ID of VapourSynth4.h: the preset format constant for these properties."""
    return (cf << 28) | (st << 24) | (bits << 16) | (ssw << 8) | ssh


def create(info: dict[str, int], props: dict[str, int], args: dict[str, Any]) -> tuple[NodeRunner, dict[str, Any], int]:
    """Validate clip and arguments, load the model: (node runner, {"pre", "post", "warnings"}, scale)."""
    try:
        return _create(info, props, args)
    except CheckpointError as exc:
        raise UserError(f"weights: {exc}") from None
    except EscError:  # its message is the one line the user sees
        raise
    except Exception as exc:  # a bug or an environment problem: keep the type in the one-line message
        raise RuntimeError(f"internal error: {type(exc).__name__}: {exc}") from exc


def _create(
    info: dict[str, int], props: dict[str, int], args: dict[str, Any]
) -> tuple[NodeRunner, dict[str, Any], int]:
    known = {"scale", "weights", "model", "tile", "overlap", "device", "num_streams", "batch", "width", "height"}
    unknown = set(args) - known
    if unknown:
        raise UserError(f"unknown arguments {sorted(unknown)}")
    width, height = info["width"], info["height"]
    if info["color_family"] == 0:
        raise UserError("the clip has a variable format; convert it to one format first")
    if width <= 0 or height <= 0:
        raise UserError("the clip has a variable frame size; resize it to one size first")
    pre, post, warnings, half = _colour_plan(info, props)

    device = resolve_device(args.get("device"))  # "auto"/None: CUDA when present
    tile = _int_arg(args, "tile", 0, minimum=0) or None
    overlap = _int_arg(args, "overlap", 64, minimum=0)
    streams = _int_arg(args, "num_streams", 1, minimum=1, maximum=MAX_STREAMS)
    batch = _int_arg(args, "batch", 4, minimum=1, maximum=MAX_BATCH)
    if streams > 1 and device.type != "cuda":
        warnings.append(f"esc.Upscale: num_streams={streams} applies to CUDA only; running one stream on {device}")
        streams = 1
    scale = args.get("scale")
    weights = args.get("weights")
    if scale is not None and scale not in (2, 3, 4):
        raise UserError(f"scale must be 2, 3 or 4, got {scale}")
    tier = check_tier(args.get("model"))  # "fast" | "balanced"; anything else: one line listing them

    # fp16 where the clip is fp16 and the device computes it well; fp32 everywhere else (CPU half is slow).
    dtype = torch.float16 if half and device.type == "cuda" else torch.float32
    if weights is None:
        try:
            up = esc_stream.load(None, scale=scale or 2, model=tier, device=device, dtype=dtype, tile=tile,
                                 overlap=overlap)  # fmt: skip
        except CheckpointError as exc:  # no embedded model of this tier at this scale: the message lists them
            raise UserError(str(exc)) from None
    else:
        path = Path(os.path.expanduser(weights))
        if not path.is_file():
            raise UserError(f"weights file not found: {weights} (relative paths start at {Path.cwd()})")
        up = esc_stream.load(path, device=device, dtype=dtype, tile=tile, overlap=overlap)
        if scale is not None and scale != up.scale:
            raise UserError(f"scale={scale} but {path.name} is a x{up.scale} model")

    post = _resize_plan(info, props, args, up.scale, post)
    runner = NodeRunner(up, width, height, half=half, batch=batch, streams=streams)
    return runner, {"pre": pre, "post": post, "warnings": warnings}, up.scale


def _resize_plan(info: dict[str, int], props: dict[str, int], args: dict[str, Any], scale: int,
                 post: list[Step]) -> list[Step]:  # fmt: skip
    """Post steps that also bring the model's output to width x height, keeping the display aspect.

    The model runs at its own scale; the exact size comes from one Spline36 pass over the assembled RGB frame
    (tiles cannot seam), merged into the conversion back to the clip's format when there is one. A missing
    side follows the display aspect (frame 0's _SARNum/_SARDen); the output's _SAR says how to show the new size.
    """
    want_w, want_h = args.get("width"), args.get("height")
    if want_w is None and want_h is None:
        return post
    for name, value in (("width", want_w), ("height", want_h)):
        if value is not None and not 1 <= value <= 65536:
            raise UserError(f"{name} must be in 1..65536, got {value}")
    num, den = props.get("_SARNum", 0), props.get("_SARDen", 0)
    sar = Fraction(num, den) if num > 0 and den > 0 else None
    w, h, out_sar = target_size(info["width"], info["height"], sar, (want_w, want_h))
    step_w, step_h = 1 << info["subsampling_w"], 1 << info["subsampling_h"]
    if w % step_w or h % step_h:
        raise UserError(f"{w}x{h} does not fit the clip's chroma subsampling: width must be a multiple of "
                        f"{step_w} and height of {step_h}")  # fmt: skip
    steps = [(ns, fn, dict(kw)) for ns, fn, kw in post]
    last = steps.pop()[2] if steps else {}
    steps.append(("resize", "Spline36", last | {"width": w, "height": h}))  # Point (integer RGB) would alias
    if (w, h) != (info["width"] * scale, info["height"] * scale) and (sar is not None or out_sar != 1):
        steps.append(("std", "SetFrameProps", {"_SARNum": out_sar.numerator, "_SARDen": out_sar.denominator}))
    return steps


def _int_arg(args: dict[str, Any], name: str, default: int, minimum: int, maximum: int | None = None) -> int:
    value = args.get(name, default)
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise UserError(f"{name} must be {bounds}, got {value}")
    return int(value)


def _colour_plan(info: dict[str, int], props: dict[str, int]) -> tuple[list[Step], list[Step], list[str], bool]:
    """How to reach float RGB and back: (pre steps, post steps, warnings, clip is fp16 RGB)."""
    cf, st, bits = info["color_family"], info["sample_type"], info["bits"]
    ssw, ssh = info["subsampling_w"], info["subsampling_h"]
    fmt = video_format_id(cf, st, bits, ssw, ssh)
    if cf == CF_RGB and st == ST_FLOAT:
        if bits not in (16, 32):
            raise UserError(f"unsupported float RGB with {bits} bits")
        return [], [], [], bits == 16
    if cf == CF_RGB:
        # Integer RGB: only the sample type changes, so no kernel or colour parameter is involved.
        to_float: dict[str, int | str] = {"format": video_format_id(CF_RGB, ST_FLOAT, 32, 0, 0)}
        return [("resize", "Point", to_float)], [("resize", "Point", {"format": fmt})], [], False
    if cf != CF_YUV:
        raise UserError("GRAY clips are not supported: ESC upscales colour; convert to RGB or YUV first")

    assumed: list[str] = []
    matrix = props.get("_Matrix", UNSPECIFIED)
    if matrix == UNSPECIFIED:
        # The usual guess of players and encoders: BT.601 for SD, BT.709 above.
        matrix = 1 if info["width"] > 1024 or info["height"] > 576 else 6
        assumed.append(f"_Matrix={matrix} ({MATRIX_NAMES[matrix]})")
    if "_Range" in props:
        full = props["_Range"] == 1
    elif "_ColorRange" in props:  # before R74, with the opposite numbering
        full = props["_ColorRange"] == 0
    else:
        full = False
        assumed.append("_Range=0 (limited)")
    colour: dict[str, int | str] = {"matrix": matrix, "range": "full" if full else "limited"}
    if ssw or ssh:
        chromaloc = props.get("_ChromaLocation")
        if chromaloc is None:
            chromaloc = 0
            assumed.append("_ChromaLocation=0 (left)")
        colour["chromaloc"] = chromaloc
    if matrix in MATRICES_NEEDING_TRANSFER and props.get("_Transfer", UNSPECIFIED) == UNSPECIFIED:
        colour["transfer"] = 1
        assumed.append("_Transfer=1 (BT.709)")

    # Frame properties, where set, take precedence over the *_in arguments in VapourSynth R74+ resize,
    # so the values above only fill in what a frame lacks; the way back uses frame 0's values.
    into: dict[str, int | str] = {"format": video_format_id(CF_RGB, ST_FLOAT, 32, 0, 0)}
    into |= {f"{k}_in" if k != "range" else "range_in_s": v for k, v in colour.items()}
    back: dict[str, int | str] = {"format": fmt}
    back |= {k if k != "range" else "range_s": v for k, v in colour.items()}
    warnings = []
    if assumed:
        warnings.append(
            f"esc.Upscale: frame 0 does not say how to convert YUV to RGB; assuming {', '.join(assumed)}. "
            "Set the properties with core.std.SetFrameProps if that is wrong."
        )
    return [("resize", "Spline36", into)], [("resize", "Spline36", back)], warnings, False
