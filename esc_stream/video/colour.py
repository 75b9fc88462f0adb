"""Colour handling: YUV <-> RGB with the source's explicit matrix and range, at 8 or 16 bits per sample.

The network sees RGB in [0, 1]. Sources deeper than 8 bits go through rgb48 so no precision is lost;
the conversion back uses the same matrix and range, and the output is tagged like the source.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np
from av.video.reformatter import ColorRange, Interpolation

# AVColorSpace (as tagged in streams) -> swscale's matrix constant
_SWS_MATRIX = {1: 1, 4: 4, 5: 5, 6: 5, 7: 7, 9: 9, 10: 9}
_RANGE_NAMES = {0: "unspecified", 1: "limited (tv)", 2: "full (pc)"}
_MATRIX_NAMES = {0: "rgb", 1: "bt709", 2: "unspecified", 4: "fcc", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m",
                 9: "bt2020nc", 10: "bt2020c"}  # fmt: skip
_PRIMARIES_NAMES = {1: "bt709", 2: "unspecified", 4: "bt470m", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m",
                    9: "bt2020", 11: "smpte431", 12: "smpte432"}  # fmt: skip
_TRC_NAMES = {1: "bt709", 2: "unspecified", 4: "gamma22", 5: "gamma28", 6: "smpte170m", 7: "smpte240m", 8: "linear",
              13: "iec61966-2-1", 14: "bt2020-10", 15: "bt2020-12", 16: "smpte2084", 18: "arib-std-b67"}  # fmt: skip

_SCALE_FLAGS = Interpolation.BICUBIC | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT


def target_size(
    width: int, height: int, sar: Fraction | None, size: tuple[int | None, int | None]
) -> tuple[int, int, Fraction]:
    """Output (w, h, sar) for a requested size; a missing side follows the display aspect, rounded to even.

    The display aspect ratio is kept: the output's sample aspect ratio is whatever makes w x h show it, so an
    anamorphic source scaled to its display aspect gets square pixels.
    """
    dar = Fraction(width, height) * (sar if sar and sar > 0 else 1)
    w, h = size
    if w is None and h is None:
        raise ValueError("give a width, a height or both")
    if w is None:
        assert h is not None
        w = max(2, round(h * dar / 2) * 2)
    if h is None:
        h = max(2, round(w / dar / 2) * 2)
    out_sar = (dar / Fraction(w, h)).limit_denominator(1000)
    return w, h, out_sar


@dataclass(frozen=True)
class Colour:
    """A stream's colour description (AVColor* integer codes) and sample depth."""

    matrix: int = 2
    primaries: int = 2
    transfer: int = 2
    range: int = 0
    bits: int = 8
    height: int = 0

    @property
    def sws_matrix(self) -> int:
        """The matrix to convert with: tagged, else BT.709 for HD and BT.601 for SD (the usual guess)."""
        if self.matrix in _SWS_MATRIX:
            return _SWS_MATRIX[self.matrix]
        return 1 if self.height >= 720 else 5

    @property
    def matrix_known(self) -> bool:
        """Tagged with a matrix the conversion can use (else `sws_matrix` is a guess from the height)."""
        return self.matrix in _SWS_MATRIX

    @property
    def full_range(self) -> bool:
        return self.range == 2

    @property
    def deep(self) -> bool:
        return self.bits > 8

    def describe(self) -> str:
        guessed = (
            ""
            if self.matrix in _SWS_MATRIX
            else " (untagged: assuming " + ("bt709)" if self.sws_matrix == 1 else "bt601)")
        )
        return (
            f"matrix {_MATRIX_NAMES.get(self.matrix, self.matrix)}{guessed}, "
            f"primaries {_PRIMARIES_NAMES.get(self.primaries, self.primaries)}, "
            f"transfer {_TRC_NAMES.get(self.transfer, self.transfer)}, "
            f"range {_RANGE_NAMES.get(self.range, self.range)}{' (assuming limited)' if not self.range else ''}, "
            f"{self.bits}-bit"
        )


# transfer characteristics of HDR video: SMPTE ST 2084 (PQ) and ARIB STD-B67 (HLG)
HDR_TRANSFERS = {16: "PQ", 18: "HLG"}
# frame side data that holds dynamic HDR metadata no encoder here can write back: name -> what it is
DYNAMIC_HDR = {"DYNAMIC_HDR_PLUS": "HDR10+ dynamic metadata", "DOVI_RPU_BUFFER": "Dolby Vision RPU",
               "DOVI_METADATA": "Dolby Vision metadata", "DYNAMIC_HDR_VIVID": "HDR Vivid dynamic metadata"}  # fmt: skip


@dataclass(frozen=True)
class HdrMetadata:
    """HDR10 static metadata: the mastering display colour volume (SMPTE ST 2086) and the content light level.

    Chromaticities are CIE 1931 xy as fractions (red, green, blue, white point), luminances in cd/m²;
    `max_cll`/`max_fall` in cd/m². A part the source does not carry is None.
    """

    primaries: tuple[tuple[Fraction, Fraction], ...] | None = None  # (R, G, B) xy
    white: tuple[Fraction, Fraction] | None = None
    min_luminance: Fraction | None = None
    max_luminance: Fraction | None = None
    max_cll: int | None = None
    max_fall: int | None = None

    @property
    def has_mastering(self) -> bool:
        return self.primaries is not None and self.white is not None

    @property
    def has_light_level(self) -> bool:
        return self.max_cll is not None

    @classmethod
    def from_side_data(cls, side_data: Mapping[Any, Any]) -> HdrMetadata | None:
        """Parse frame/stream side data (keys: PyAV side-data types or their names; values: the raw FFmpeg
        structs AVMasteringDisplayMetadata and AVContentLightMetadata). None when neither is there."""
        by_name = {getattr(k, "name", str(k)).upper(): v for k, v in side_data.items()}
        fields: dict[str, Any] = {}
        mdcv = by_name.get("MASTERING_DISPLAY_METADATA")
        if mdcv is not None:
            raw = bytes(mdcv)
            if len(raw) >= 88:
                v = struct.unpack("<20i2i", raw[:88])
                q = [Fraction(v[2 * i], v[2 * i + 1]) if v[2 * i + 1] else Fraction(0) for i in range(10)]
                has_primaries, has_luminance = v[20], v[21]
                if has_primaries:
                    fields["primaries"] = ((q[0], q[1]), (q[2], q[3]), (q[4], q[5]))
                    fields["white"] = (q[6], q[7])
                if has_luminance:
                    fields["min_luminance"], fields["max_luminance"] = q[8], q[9]
        cll = by_name.get("CONTENT_LIGHT_LEVEL")
        if cll is not None:
            raw = bytes(cll)
            if len(raw) >= 8:
                fields["max_cll"], fields["max_fall"] = struct.unpack("<2I", raw[:8])
        return cls(**fields) if fields else None

    def x265_params(self) -> dict[str, str]:
        """The libx265 parameters that write this metadata as SEI (master-display in 0.00002 xy units and
        0.0001 cd/m²; max-cll as MaxCLL,MaxFALL)."""
        params: dict[str, str] = {}
        if self.has_mastering and self.max_luminance is not None:
            assert self.primaries is not None and self.white is not None
            (rx, ry), (gx, gy), (bx, by) = self.primaries

            def xy(x: Fraction, y: Fraction) -> str:
                return f"({round(x * 50000)},{round(y * 50000)})"

            lo = round((self.min_luminance or 0) * 10000)
            params["master-display"] = (f"G{xy(gx, gy)}B{xy(bx, by)}R{xy(rx, ry)}WP{xy(*self.white)}"
                                        f"L({round(self.max_luminance * 10000)},{lo})")  # fmt: skip
        if self.has_light_level:
            params["max-cll"] = f"{self.max_cll},{self.max_fall or 0}"
        return params

    def describe(self) -> str:
        parts = []
        if self.has_mastering:
            assert self.primaries is not None and self.white is not None
            pairs = zip(("R", "G", "B"), self.primaries, strict=True)
            xy = " ".join(f"{n}({float(x):.4f},{float(y):.4f})" for n, (x, y) in pairs)
            wp = f"WP({float(self.white[0]):.4f},{float(self.white[1]):.4f})"
            lum = ""
            if self.max_luminance is not None:
                lum = f" L {float(self.min_luminance or 0):.4f}-{float(self.max_luminance):g} cd/m²"
            parts.append(f"mastering display {xy} {wp}{lum}")
        if self.has_light_level:
            parts.append(f"MaxCLL {self.max_cll} cd/m², MaxFALL {self.max_fall or 0} cd/m²")
        return "; ".join(parts)


def pixel_bits(pix_fmt: str) -> int:
    """Bits per sample of a pixel format (8 for the usual yuv420p)."""
    desc = av.VideoFormat(pix_fmt)
    return max((c.bits for c in desc.components), default=8)


def frame_to_rgb(frame: av.VideoFrame, colour: Colour) -> np.ndarray:
    """Decoded frame -> HxWx3 RGB (uint8, or uint16 for deep sources), converted with explicit matrix/range."""
    fmt = "rgb48le" if colour.deep else "rgb24"
    if frame.format.name in ("rgb24", "rgb48le"):
        rgb = frame if frame.format.name == fmt else frame.reformat(format=fmt)
    else:
        rgb = frame.reformat(
            format=fmt,
            src_colorspace=colour.sws_matrix,
            src_color_range=ColorRange.JPEG if colour.full_range else ColorRange.MPEG,
            dst_color_range=ColorRange.JPEG,
            interpolation=_SCALE_FLAGS,
        )
    return rgb.to_ndarray()


_RESAMPLE_FLAGS = Interpolation.LANCZOS | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT


def rgb_to_frame(rgb: np.ndarray, pix_fmt: str, colour: Colour, size: tuple[int, int] | None = None) -> av.VideoFrame:
    """HxWx3 uint8/uint16 RGB -> frame in `pix_fmt` (resampled to `size` = (w, h) with Lanczos if given),
    with the source's matrix and range, tagged."""
    src = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb48le" if rgb.dtype == np.uint16 else "rgb24")
    w, h = size if size else (None, None)
    flags = _RESAMPLE_FLAGS if size and size != (rgb.shape[1], rgb.shape[0]) else _SCALE_FLAGS
    if pix_fmt.startswith(("rgb", "bgr", "gbr")):
        return src.reformat(width=w, height=h, format=pix_fmt, interpolation=flags)
    out = src.reformat(
        width=w,
        height=h,
        format=pix_fmt,
        dst_colorspace=colour.sws_matrix,
        src_color_range=ColorRange.JPEG,
        dst_color_range=ColorRange.JPEG if colour.full_range else ColorRange.MPEG,
        interpolation=flags,
    )
    out.colorspace = colour.matrix
    out.color_range = colour.range if colour.range else 1
    if colour.primaries:
        out.color_primaries = colour.primaries
    if colour.transfer:
        out.color_trc = colour.transfer
    return out
