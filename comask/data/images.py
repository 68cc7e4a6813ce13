"""Safe image reading: every image becomes an HxWx3 uint8 RGB array, or a one-line DataError.

Policy for very large images: they are REFUSED (DataError kind `image_too_large`) when the header
says width*height > `max_pixels` (default `MAX_PIXELS`, 8192*8192), before any pixel is decoded, so
a 20000x20000 file can never exhaust memory. Refusing (rather than silently downscaling) keeps the
annotation coordinates and the pixels in the same frame; the fix is to downscale/tile the data set.
PIL's own decompression-bomb limit is set to the same number so no other code path decodes more.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from comask.errors import DataError

MAX_PIXELS = 8192 * 8192
# PIL warns above MAX_IMAGE_PIXELS and refuses above twice that; we check sizes ourselves first.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

# EXIF orientations 5-8 rotate by 90 degrees, so the displayed width and height swap.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND\xaeB`\x82"


class ImageFileError(DataError):
    """An image file that cannot be used; `kind` is a stable code used by `comask data check`."""

    def __init__(self, message: str, kind: str, size: tuple[int, int] | None = None):
        super().__init__(message)
        self.kind = kind
        self.size = size  # (width, height) from the header, for image_too_large


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: size after EXIF orientation (what `read_image` returns)."""

    width: int
    height: int
    raw_width: int
    raw_height: int
    format: str
    mode: str


def _open(path: Path, max_pixels: int) -> Image.Image:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageFileError(f"{path}: image file not found", "missing_file") from None
    except OSError as e:
        raise ImageFileError(f"{path}: cannot access image file ({e.strerror})", "unreadable_image") from None
    except ValueError as e:  # a NUL byte or an unencodable character in the name
        raise ImageFileError(f"{str(path)!r}: not a usable file name ({e})", "unreadable_image") from None
    if not os.path.isfile(path):
        raise ImageFileError(f"{path}: not a regular file", "unreadable_image")
    if st.st_size == 0:
        raise ImageFileError(f"{path}: zero-byte image file (re-copy or re-download it)", "empty_file")
    return _open_image(path, path, max_pixels)


def _open_image(source: Path | BinaryIO, path: Path | str, max_pixels: int,
                max_side: int | None = None) -> Image.Image:
    """Open a file or binary stream (`path` names it in messages), reading only the header."""
    if max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        # a configured limit above the default raises PIL's own guard with it (never disables it)
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)
    except UnidentifiedImageError:
        raise ImageFileError(f"{path}: not an image file (unknown format or corrupt header)", "not_an_image") from None
    except Image.DecompressionBombError:
        raise ImageFileError(
            f"{path}: image is too large (more than {2 * max_pixels} pixels); downscale or tile it",
            "image_too_large",
        ) from None
    except PermissionError:
        raise ImageFileError(f"{path}: permission denied", "unreadable_image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageFileError(f"{path}: cannot read image header ({e})", "corrupt_image") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageFileError(
            f"{path}: image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}; "
            "downscale or tile it (annotations must be scaled too)",
            "image_too_large", size=(w, h),
        )
    if max_side is not None and max(w, h) > max_side:
        img.close()
        raise ImageFileError(f"{path}: image is {w}x{h}, above the limit of {max_side} pixels a side; downscale it",
                             "image_too_large", size=(w, h))
    if w <= 0 or h <= 0:
        img.close()
        raise ImageFileError(f"{path}: image header says size {w}x{h}", "corrupt_image")
    return img


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block must not make a readable image unreadable
        return 1


def _tail_ok(path: Path, fmt: str) -> bool:
    """Cheap truncation test: JPEG/PNG files end with a fixed marker (trailing zero padding allowed)."""
    end = {"JPEG": _JPEG_END, "PNG": _PNG_END}.get(fmt)
    if end is None:
        return True
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4096))
        tail = f.read().rstrip(b"\x00")
    return tail.endswith(end)


def probe_image(path: str | Path, max_pixels: int = MAX_PIXELS, *, decode: bool = False) -> ImageInfo:
    """Read only the header (and, for JPEG/PNG, the last bytes) of an image; raise ImageFileError.

    A file whose end marker is missing is decoded to confirm truncation; `decode=True` always decodes
    (finds corruption in the middle of a file too, at the cost of reading every pixel).
    """
    path = Path(path)
    img = _open(path, max_pixels)
    try:
        rw, rh = img.size
        fmt, mode = img.format or "?", img.mode
        swap = _orientation(img) in _SWAPPING_ORIENTATIONS
        if decode or not _tail_ok(path, fmt):
            _load(img, path)
    finally:
        img.close()
    if decode:
        _verify(path, max_pixels)
    w, h = (rh, rw) if swap else (rw, rh)
    return ImageInfo(width=w, height=h, raw_width=rw, raw_height=rh, format=fmt, mode=mode)


def _verify(path: Path, max_pixels: int) -> None:
    """PIL's structural check (PNG chunk CRCs, ...): finds damage that still decodes to some pixels."""
    img = _open(path, max_pixels)
    try:
        img.verify()
    except Exception as e:  # verify raises many types for the many ways a file can be damaged
        raise ImageFileError(f"{path}: corrupt image data ({e}); re-copy or re-encode the file", "corrupt_image") from None
    finally:
        img.close()


def _load(img: Image.Image, path: Path | str) -> None:
    try:
        img.load()
    except OSError as e:
        kind = "truncated_image" if "truncated" in str(e) else "corrupt_image"
        raise ImageFileError(f"{path}: {kind.replace('_', ' ')} ({e}); re-copy or re-encode the file", kind) from None
    except (SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ImageFileError(f"{path}: corrupt image data ({e}); re-copy or re-encode the file", "corrupt_image") from None


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img)
        if mode == "F":
            a = np.nan_to_num(a.astype(np.float64))
            # float images are either in [0, 1] or already in 0..255
            a = np.clip(a * (255.0 if a.max(initial=0.0) <= 1.0 else 1.0), 0.0, 255.0)
        else:
            a = a.astype(np.int64)
            # 16-bit data (the common case) maps 0..65535 to 0..255; 32-bit data is rescaled by its own range.
            top = 65535 if a.max(initial=0) <= 65535 and a.min(initial=0) >= 0 else max(int(a.max()), 1)
            a = np.clip(a, 0, top) * 255 // top
        g = a.astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode != "RGB":
        # RGBA/LA drop alpha, CMYK/YCbCr/L/1/P go through PIL's standard conversions.
        img = img.convert("RGB")
    # np.array (not asarray): PIL's buffer is read-only and torch.from_numpy wants a writable array
    return np.array(img, dtype=np.uint8)


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 RGB array with EXIF orientation applied."""
    path = Path(path)
    return _decode(_open(path, max_pixels), path)


def read_image_bytes(data: bytes, max_pixels: int = MAX_PIXELS, *, max_side: int | None = None,
                     name: str = "image") -> np.ndarray:
    """`read_image` for an in-memory file (an upload): the same size limits, checked from the header
    before any pixel is decoded (plus `max_side`), the same EXIF orientation and RGB conversion.
    Errors are ImageFileErrors whose message starts with `name`."""
    if not data:
        raise ImageFileError(f"{name}: zero-byte image file", "empty_file")
    return _decode(_open_image(io.BytesIO(data), name, max_pixels, max_side), name)


def _decode(img: Image.Image, path: Path | str) -> np.ndarray:
    try:
        _load(img, path)
        try:
            oriented = ImageOps.exif_transpose(img)
        except Exception:  # unreadable EXIF: keep the pixels as stored
            oriented = img
        arr = _to_rgb_array(oriented)
    finally:
        img.close()
    return np.ascontiguousarray(arr)
