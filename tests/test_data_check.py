"""`comask data check`: the coco128 counts, and one test per defect kind it claims to find."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comask.cli import main
from comask.data.check import run_check


def _report(capsys, ann: Path, images: Path, deep: bool = False) -> tuple[int, dict]:
    code = run_check(ann, images, as_json=True, deep=deep)
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one JSON object
    return code, json.loads(out)


def test_coco128_counts(coco128, capsys) -> None:
    code, r = _report(capsys, coco128.ann, coco128.images)
    assert (r["images"], r["annotations"], r["crowd"], r["categories"]) == (128, 939, 10, 80)
    assert code == 0 and r["errors"] == []
    assert r["per_category"]["person"]["instances"] + r["per_category"]["person"]["crowd"] == sum(
        1 for a in json.loads(coco128.ann.read_text())["annotations"] if a["category_id"] == 1)
    used = [k for k, v in r["per_category"].items() if v["instances"] + v["crowd"]]
    assert len(used) == 71


def test_cli_text_and_exit_codes(coco128, tiny_coco, capsys) -> None:
    assert main(["data", "check", "--ann", str(coco128.ann), "--images", str(coco128.images)]) == 0
    out = capsys.readouterr().out
    assert "images: 128" in out and "annotations: 939 (10 crowd)" in out and "OK: 0 error(s)" in out
    tiny_coco.image_path(3).unlink()
    assert main(["data", "check", "--ann", str(tiny_coco.ann), "--images", str(tiny_coco.images)]) == 1
    out = capsys.readouterr().out
    assert "ERROR [missing_file] image 3 (c.png)" in out and "FAILED: 1 error(s)" in out


def test_clean_tiny_set_has_no_problems(tiny_coco, capsys) -> None:
    code, r = _report(capsys, tiny_coco.ann, tiny_coco.images, deep=True)
    assert code == 0 and r["errors"] == [] and r["warnings"] == []
    assert (r["images"], r["annotations"], r["crowd"], r["categories"], r["empty_images"]) == (4, 5, 1, 3, 1)


def _png_header_only(path: Path, w: int, h: int) -> None:
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _img(tc, iid: int) -> dict:
    return next(im for im in tc.data["images"] if im["id"] == iid)


def _ann(tc, aid: int) -> dict:
    return next(a for a in tc.data["annotations"] if a["id"] == aid)


def _truncate(path: Path) -> None:
    b = path.read_bytes()
    path.write_bytes(b[: len(b) * 2 // 3])


def _corrupt_middle(tc) -> None:
    p = tc.image_path(1)
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8), (48, 1))[..., None].repeat(3, 2)).save(p)
    b = bytearray(p.read_bytes())
    mid = len(b) // 2
    b[mid : mid + 8] = b"\x00" * 8
    p.write_bytes(bytes(b))


def _huge(tc) -> None:
    _png_header_only(tc.image_path(3), 20000, 20000)
    _img(tc, 3).update(width=20000, height=20000)


def _tiny(tc) -> None:
    Image.new("RGB", (1, 1)).save(tc.image_path(3))
    _img(tc, 3).update(width=1, height=1)


# (mutation of the tiny set, kind, level, id the problem must name: ("image_id"|"ann_id", value) or None)
CASES: list[tuple[str, Callable, str, str, tuple | None]] = [
    ("missing file", lambda tc: tc.image_path(3).unlink(), "missing_file", "error", ("image_id", 3)),
    ("zero-byte file", lambda tc: tc.image_path(3).write_bytes(b""), "empty_file", "error", ("image_id", 3)),
    ("non-image file", lambda tc: tc.image_path(3).write_text("hello"), "not_an_image", "error", ("image_id", 3)),
    ("truncated PNG", lambda tc: _truncate(tc.image_path(1)), "truncated_image", "error", ("image_id", 1)),
    ("truncated JPEG", lambda tc: _truncate(tc.image_path(2)), "truncated_image", "error", ("image_id", 2)),
    ("huge image", _huge, "image_too_large", "error", ("image_id", 3)),
    ("1x1 image", _tiny, "tiny_image", "warning", ("image_id", 3)),
    ("stored size != file", lambda tc: _img(tc, 1).update(width=100), "size_mismatch", "error", ("image_id", 1)),
    ("bad image entry", lambda tc: _img(tc, 2).update(file_name=5), "bad_image_entry", "error", ("image_id", 2)),
    ("duplicate image id", lambda tc: tc.data["images"].append({**_img(tc, 1), "file_name": "c.png"}),
     "duplicate_image_id", "error", ("image_id", 1)),
    ("duplicate file name", lambda tc: _img(tc, 3).update(file_name="a.png", width=64, height=48),
     "duplicate_file_name", "warning", ("image_id", 3)),
    ("bad annotation entry", lambda tc: _ann(tc, 10).update(category_id="seven"), "bad_annotation_entry", "error",
     ("ann_id", 10)),
    ("bbox not 4 numbers", lambda tc: _ann(tc, 10).update(bbox=[1, 2, 3]), "bad_annotation_entry", "error",
     ("ann_id", 10)),
    ("duplicate annotation id", lambda tc: _ann(tc, 11).update(id=10), "duplicate_annotation_id", "error",
     ("ann_id", 10)),
    ("unknown image id", lambda tc: _ann(tc, 20).update(image_id=999), "unknown_image", "error", ("ann_id", 20)),
    ("unknown category id", lambda tc: _ann(tc, 20).update(category_id=999), "unknown_category", "error",
     ("ann_id", 20)),
    ("bad category entry", lambda tc: tc.data["categories"][0].update(name=None), "bad_category_entry", "error",
     None),
    ("duplicate category id", lambda tc: tc.data["categories"].append({"id": 3, "name": "again"}),
     "duplicate_category_id", "error", None),
    ("zero-size box", lambda tc: _ann(tc, 10).update(bbox=[5, 4, 0, 16]), "zero_size_box", "warning",
     ("ann_id", 10)),
    ("negative box", lambda tc: _ann(tc, 10).update(bbox=[25, 4, -20, 16]), "negative_box", "error",
     ("ann_id", 10)),
    ("box outside image", lambda tc: _ann(tc, 10).update(bbox=[500, 4, 20, 16]), "box_outside_image", "error",
     ("ann_id", 10)),
    ("box partly outside", lambda tc: _ann(tc, 10).update(bbox=[50, 4, 30, 16]), "box_out_of_bounds", "warning",
     ("ann_id", 10)),
    ("polygon < 3 points", lambda tc: _ann(tc, 10).update(segmentation=[[5, 4, 25, 4]]), "degenerate_polygon",
     "warning", ("ann_id", 10)),
    ("polygon NaN", lambda tc: _ann(tc, 10).update(segmentation=[[5, 4, 25, float("nan"), 25, 20]]),
     "nan_coordinates", "error", ("ann_id", 10)),
    ("bbox NaN", lambda tc: _ann(tc, 10).update(bbox=[5, 4, float("nan"), 16]), "nan_coordinates", "error",
     ("ann_id", 10)),
    ("polygon odd length", lambda tc: _ann(tc, 10).update(segmentation=[[5, 4, 25, 4, 25]]), "bad_segmentation",
     "error", ("ann_id", 10)),
    ("RLE without counts", lambda tc: _ann(tc, 11).update(segmentation={"size": [48, 64]}), "bad_segmentation",
     "error", ("ann_id", 11)),
    ("uncompressed RLE wrong total", lambda tc: _ann(tc, 40)["segmentation"]["counts"].append(5),
     "bad_segmentation", "error", ("ann_id", 40)),
    ("RLE size != image", lambda tc: _ann(tc, 11)["segmentation"].update(size=[40, 64]), "rle_size_mismatch",
     "error", ("ann_id", 11)),
]


@pytest.mark.parametrize("name, mutate, kind, level, ident", CASES, ids=[c[0] for c in CASES])
def test_defect_kind(tiny_coco, capsys, name, mutate, kind, level, ident) -> None:
    mutate(tiny_coco)
    tiny_coco.write()
    code, r = _report(capsys, tiny_coco.ann, tiny_coco.images)
    bucket = r["errors"] if level == "error" else r["warnings"]
    found = [p for p in bucket if p["kind"] == kind]
    assert found, f"{name}: no {level} of kind {kind}; got {r['errors'] + r['warnings']}"
    assert all(p["message"] and p["fix"] for p in found)
    if ident is not None:
        assert any(p.get(ident[0]) == ident[1] for p in found), found
    assert code == (1 if r["errors"] else 0)
    if level == "warning":
        assert code == 0 and r["errors"] == []


def test_corrupt_image_needs_deep_check(tiny_coco, capsys) -> None:
    _corrupt_middle(tiny_coco)
    code, r = _report(capsys, tiny_coco.ann, tiny_coco.images, deep=True)
    assert code == 1
    assert any(p["kind"] in ("corrupt_image", "truncated_image") and p["image_id"] == 1 for p in r["errors"])


@pytest.mark.parametrize(
    "content, kind",
    [("{oops", "not_json"), ('{"images": [], "annotations": []}', "missing_keys"),
     ('{"images": [], "annotations": {}, "categories": []}', "wrong_type"), ("[]", "wrong_type")],
)
def test_annotation_file_defects(tmp_path, capsys, content: str, kind: str) -> None:
    ann = tmp_path / "a.json"
    ann.write_text(content)
    code, r = _report(capsys, ann, tmp_path)
    assert code == 1 and [p["kind"] for p in r["errors"]] == [kind] and str(ann) in r["errors"][0]["message"]


def test_missing_annotation_file_and_image_dir(tiny_coco, capsys) -> None:
    code, r = _report(capsys, tiny_coco.root / "nope.json", tiny_coco.images)
    assert code == 1 and r["errors"][0]["kind"] == "missing_annotation_file"
    code, r = _report(capsys, tiny_coco.ann, tiny_coco.root / "no_images")
    assert code == 1 and r["errors"][0]["kind"] == "missing_image_dir" and r["images"] == 4
