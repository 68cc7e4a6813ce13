"""Safe image reading: colour modes, EXIF, and every unreadable-file case gives a named DataError."""

from __future__ import annotations

import resource
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comask.data.images import ImageFileError, probe_image, read_image
from comask.errors import DataError


def _rgb(h: int = 12, w: int = 20) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "1", "CMYK"])
def test_modes_become_rgb_uint8(tmp_path: Path, mode: str) -> None:
    src = Image.fromarray(_rgb())
    img = src.convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path)
    arr = read_image(path)
    assert arr.shape == (12, 20, 3) and arr.dtype == np.uint8
    expected = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(arr, expected)
    if mode in ("L", "LA", "1"):
        assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.fromarray(_rgb()).convert("P")
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    arr = read_image(tmp_path / "p.png")
    assert arr.shape == (12, 20, 3) and arr.dtype == np.uint8


def test_16bit_grayscale_scaled_to_8bit(tmp_path: Path) -> None:
    a = np.array([[0, 257, 65535], [32896, 1000, 60000]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    arr = read_image(tmp_path / "g16.png")
    assert arr.dtype == np.uint8 and arr.shape == (2, 3, 3)
    assert arr[0, :, 0].tolist() == [0, 1, 255]
    assert arr[1, 0, 0] == 128


def test_exif_orientation_applied(tmp_path: Path) -> None:
    src = _rgb(10, 30)
    img = Image.fromarray(src)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    img.save(tmp_path / "e.jpg", exif=exif, quality=100)
    arr = read_image(tmp_path / "e.jpg")
    assert arr.shape == (30, 10, 3)
    info = probe_image(tmp_path / "e.jpg")
    assert (info.width, info.height, info.raw_width, info.raw_height) == (10, 30, 30, 10)
    raw = np.asarray(Image.open(tmp_path / "e.jpg").convert("RGB"))
    assert np.abs(arr.astype(int) - np.rot90(raw, k=-1).astype(int)).max() == 0


def test_1x1_image_reads(tmp_path: Path) -> None:
    Image.new("RGB", (1, 1), (9, 8, 7)).save(tmp_path / "one.png")
    assert read_image(tmp_path / "one.png").tolist() == [[[9, 8, 7]]]


def _expect(path: Path, kind: str, **kw) -> ImageFileError:
    with pytest.raises(ImageFileError) as ei:
        read_image(path, **kw)
    assert ei.value.kind == kind
    assert str(path) in str(ei.value)
    assert isinstance(ei.value, DataError)
    return ei.value


def test_missing_file(tmp_path: Path) -> None:
    _expect(tmp_path / "nope.jpg", "missing_file")


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "z.jpg").write_bytes(b"")
    _expect(tmp_path / "z.jpg", "empty_file")


def test_non_image_with_image_extension(tmp_path: Path) -> None:
    (tmp_path / "t.jpg").write_text("this is a text file, not a JPEG\n" * 10)
    _expect(tmp_path / "t.jpg", "not_an_image")


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_truncated_file(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"full.{ext}"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    bad = tmp_path / f"cut.{ext}"
    bad.write_bytes(data[: len(data) // 2])
    _expect(bad, "truncated_image")
    with pytest.raises(ImageFileError) as ei:
        probe_image(bad)  # header reads fine; the missing end marker triggers a confirming decode
    assert ei.value.kind == "truncated_image"
    assert probe_image(path).width == 64


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h but which carries almost no data (a decompression bomb shape)."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                     + chunk(b"IEND", b""))


def test_huge_image_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    _png_header_only(path, 20000, 20000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    err = _expect(path, "image_too_large")
    assert "20000x20000" in str(err) or "pixels" in str(err)
    with pytest.raises(ImageFileError):
        probe_image(path)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100  # decoding would have needed 1.2 GB


def test_limit_is_configurable(tmp_path: Path) -> None:
    Image.fromarray(_rgb(40, 40)).save(tmp_path / "m.png")
    _expect(tmp_path / "m.png", "image_too_large", max_pixels=1000)
    assert read_image(tmp_path / "m.png", max_pixels=1600).shape == (40, 40, 3)


def test_corrupt_middle_found_by_deep_probe(tmp_path: Path) -> None:
    path = tmp_path / "c.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 200] = bytes(200)  # zeroed IDAT bytes: header and end marker intact
    path.write_bytes(bytes(data))
    probe_image(path)  # the fast probe only reads header + end marker
    with pytest.raises(ImageFileError) as ei:
        probe_image(path, decode=True)
    assert ei.value.kind in ("corrupt_image", "truncated_image")
