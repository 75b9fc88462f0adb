"""Still pictures: read and write them (8- and 16-bit, alpha, EXIF orientation, atomic writes) and upscale
them whole, alpha included, to the model's scale or to an exact size."""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

if TYPE_CHECKING:  # torch loads lazily: the CLI imports this module to check paths before any model loads
    from .upscaler import Upscaler

__all__ = ["ImageError", "Picture", "check_output", "read_image", "upscale_picture", "write_image"]


@dataclass
class Picture:
    """RGB pixels (HxWx3, uint8 or uint16) and an optional alpha plane of the same type."""

    rgb: np.ndarray
    alpha: np.ndarray | None = None
    grey: bool = False  # a greyscale source: upscaled as RGB, written back as greyscale


def _png_bit_depth(path: Path) -> int | None:
    with open(path, "rb") as f:
        head = f.read(33)
    if len(head) < 29 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24]


_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, *range(2, a.ndim)),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 1)[::-1],  # transverse
    8: lambda a: np.rot90(a, 1),
}


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    f = _ORIENT.get(orientation)
    return np.ascontiguousarray(f(a)) if f else a


def _read_16bit_png(path: Path) -> Picture:
    import av

    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        has_alpha = "a" in frame.format.name.replace("gray", "")
        grey = frame.format.name.startswith(("gray", "ya"))
        if grey and not has_alpha:  # exact levels: swscale's grey -> RGB conversion rescales them slightly
            arr = np.repeat(frame.to_ndarray(format="gray16le")[..., None], 3, axis=2)
        else:
            arr = frame.to_ndarray(format="rgba64le" if has_alpha else "rgb48le")
    with Image.open(path) as im:
        orientation = im.getexif().get(0x0112, 1)
    arr = _orient(arr, orientation)
    if has_alpha:
        return Picture(np.ascontiguousarray(arr[..., :3]), np.ascontiguousarray(arr[..., 3]), grey=grey)
    return Picture(arr, grey=grey)


def read_image(path: str | Path) -> Picture:
    """Read an image file as RGB (+ alpha), honouring EXIF orientation; 16-bit PNG stays 16-bit."""
    with warnings.catch_warnings():
        # a large picture is no attack here: whether it fits is esc_stream.budget's one-line answer (PIL still
        # refuses, as an ImageError, pictures over twice its limit)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return _read_image(Path(path))


def _read_image(path: Path) -> Picture:
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image file")
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    try:
        with Image.open(path) as src:
            frames = getattr(src, "n_frames", 1)
            if frames > 1:  # upscaling the first frame alone would be a silent wrong result
                raise ImageError(f"{path}: an animated image ({frames} frames); `esc-video image` upscales one "
                                 "picture: extract the frames first")  # fmt: skip
        if _png_bit_depth(path) == 16:
            return _read_16bit_png(path)
        with Image.open(path) as src:
            upright = ImageOps.exif_transpose(src)
            grey = upright.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
            has_alpha = upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info
            arr = np.asarray(upright.convert("RGBA" if has_alpha else "RGB"))
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, StopIteration, struct.error) as exc:
        raise ImageError(f"{path}: not a readable image ({exc or type(exc).__name__})") from None
    except Exception as exc:  # PyAV's decoder errors
        raise ImageError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None
    if has_alpha:
        return Picture(np.ascontiguousarray(arr[..., :3]), np.ascontiguousarray(arr[..., 3]), grey=grey)
    return Picture(np.ascontiguousarray(arr), grey=grey)


def _write_16bit_png(tmp: Path, pic: Picture) -> None:
    import av

    arr = pic.rgb if pic.alpha is None else np.dstack([pic.rgb, pic.alpha])
    fmt = "rgb48le" if pic.alpha is None else "rgba64le"
    if pic.grey:
        out_fmt = "gray16be" if pic.alpha is None else "ya16be"
    else:
        out_fmt = "rgb48be" if pic.alpha is None else "rgba64be"
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format=fmt)
    if pic.grey and pic.alpha is None:  # the grey plane itself, not swscale's RGB -> grey conversion
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pic.rgb[..., 0]), format="gray16le")
    with av.open(str(tmp), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height = arr.shape[1], arr.shape[0]
        stream.pix_fmt = out_fmt
        for packet in stream.encode(frame.reformat(format=out_fmt)):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def check_output(path: str | Path, bits: int = 8) -> None:
    """Fail early (before any work) if `path` cannot be written as an image of this bit depth."""
    path = Path(path)
    if not path.parent.exists():
        raise ImageError(f"{path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder")
    if not os.access(path.parent, os.W_OK):
        raise ImageError(f"{path}: folder {path.parent} is not writable")
    ext = path.suffix.lower()
    if bits == 16 and ext != ".png":
        raise ImageError(f"{path}: 16-bit output needs a .png name")
    if ext not in Image.registered_extensions():
        raise ImageError(f"{path}: cannot write this image type (unknown file extension: {ext or 'none'})")


def write_image(path: str | Path, pic: Picture) -> Path:
    """Write under a temporary name in the same folder, then rename into place."""
    path = Path(path)
    if not path.parent.exists():
        raise ImageError(f"{path}: folder {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        if pic.rgb.dtype == np.uint16:
            if path.suffix.lower() != ".png":
                raise ImageError(f"{path}: 16-bit output needs a .png name")
            _write_16bit_png(tmp, pic)
        else:
            plane = pic.rgb[..., :1] if pic.grey else pic.rgb
            arr = plane if pic.alpha is None else np.dstack([plane, pic.alpha])
            arr = arr[..., 0] if arr.shape[2] == 1 else arr
            try:
                Image.fromarray(arr).save(tmp, format=Image.registered_extensions().get(path.suffix.lower()))
            except PermissionError as exc:
                raise ImageError(f"{path}: cannot write in folder {path.parent} ({exc.strerror})") from None
            except (KeyError, ValueError, OSError) as exc:
                raise ImageError(f"{path}: cannot write this image type ({exc})") from None
        tmp.replace(path)
    except PermissionError as exc:
        raise ImageError(f"{path}: cannot write in folder {path.parent} ({exc.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def upscale_picture(upscaler: Upscaler, pic: Picture, size: tuple[int, int] | None = None) -> Picture:
    """`pic` upscaled at the model's scale, or to exactly `size` = (width, height); the sample type (8 or 16
    bits) is kept and alpha is upscaled like a grey picture. An arbitrary-scale model renders `size` directly;
    any other runs at its scale and the result is resampled (MATLAB bicubic, antialiased) before rounding."""
    rgb = np.asarray(upscaler(pic.rgb) if size is None else upscaler.upscale_to(pic.rgb, size))
    alpha = None if pic.alpha is None else _upscale_plane(upscaler, pic.alpha, size)
    if pic.grey:  # the model's channels drift apart by a few levels: a grey picture stays grey
        mean = np.rint(rgb.astype(np.float64).mean(axis=2, keepdims=True)).astype(rgb.dtype)
        rgb = np.ascontiguousarray(np.repeat(mean, 3, axis=2))
    return Picture(rgb, alpha, grey=pic.grey)


def _upscale_plane(upscaler: Upscaler, plane: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    peak = np.iinfo(plane.dtype).max
    grey = np.repeat(plane[..., None], 3, axis=2).astype(np.float32) / peak
    out = np.asarray(upscaler(grey) if size is None else upscaler.upscale_to(grey, size))
    return np.rint(out.mean(axis=2) * peak).astype(plane.dtype)
