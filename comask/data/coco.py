"""COCO-format instance segmentation data set.

One scanner (`scan_coco`) validates the annotation JSON (and, optionally, the image headers) and
lists every problem as a `Problem` with a stable `kind`; `comask data check` prints them and
`CocoDataset` applies its policy to them:

- degenerate annotations (zero/negative-size or out-of-image boxes, polygons with < 3 points or
  NaN coordinates) are always dropped from training and counted in `dataset.skipped`;
- other errors (missing/corrupt files, unknown ids, duplicate ids, bad entries, RLE or stored size
  mismatches) raise a DataError naming the image/annotation and the fix, or, with `skip_bad=True`,
  skip the image/annotation and count it;
- warnings (boxes partly outside the image, tiny images) are handled (boxes clipped) silently.

Per-image records are pickled into one byte buffer so DataLoader workers share them copy-on-write
instead of touching (and so copying) millions of Python objects.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch

from comask.data import transforms as T
from comask.data.images import MAX_PIXELS, ImageFileError, probe_image, read_image
from comask.errors import DataError

log = logging.getLogger("comask.data")

# Problems that make an annotation unusable for training but never stop a run: dropped and counted.
DEGENERATE_KINDS = frozenset(
    {"zero_size_box", "negative_box", "box_outside_image", "degenerate_polygon", "nan_coordinates"}
)
# ImageFileError kinds a file can show only when decoded (or after the start-up scan): index + 1 is
# the code stored per record in CocoDataset._lazy_bad.
_LAZY_KINDS = ("corrupt_image", "truncated_image", "size_mismatch", "missing_file", "empty_file",
               "not_an_image", "unreadable_image", "image_too_large")
BOX_TOLERANCE = 1.0  # pixels a box may extend beyond the image (float rounding in COCO) unreported


@dataclass
class Problem:
    """One defect found in a data set."""

    level: str  # "error" | "warning"
    kind: str
    message: str
    fix: str
    image_id: int | None = None
    ann_id: int | None = None
    file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def __str__(self) -> str:
        return f"{self.message} -> {self.fix}" if self.fix else self.message


@dataclass
class AnnInfo:
    """An annotation entry after validation; `segm`/`box` are None when unusable."""

    index: int
    ann_id: Any
    image_id: Any
    category_id: Any
    iscrowd: bool
    box: list[float] | None = None  # xyxy, clipped to the stored image size
    segm: Any = None
    problems: list[Problem] = field(default_factory=list)


@dataclass
class ScanResult:
    num_images: int
    num_annotations: int
    num_crowd: int
    images: list[dict]  # valid, unique image entries (id, file_name, height, width), in file order
    categories: list[dict]  # valid, unique categories sorted by id
    anns: list[AnnInfo]
    image_problems: dict[Any, list[Problem]]  # image id (or "#index") -> problems
    global_problems: list[Problem]
    file_sizes: dict[int, tuple[int, int]]  # image id -> (h, w) of the file, after EXIF orientation

    @property
    def problems(self) -> list[Problem]:
        out = list(self.global_problems)
        for ps in self.image_problems.values():
            out.extend(ps)
        for a in self.anns:
            out.extend(a.problems)
        return out


_BAD_NAME_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # JSON decodes valid pairs to one char


def path_leaves_folder(file_name: str) -> bool:
    """True when `file_name`, joined to the image folder, names a file outside it: an absolute path, a
    drive (Windows) or a `..` segment (POSIX or Windows separators). Symlinks inside the folder are not
    followed: a linked image folder is a common, deliberate layout."""
    return any(p.is_absolute() or p.anchor or ".." in p.parts
               for p in (PurePosixPath(file_name), PureWindowsPath(file_name)))


def _as_int(x: Any) -> int | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return None


def _scalar(x: Any) -> Any:
    """A malformed id as a hashable, printable value (a list or object id becomes its short repr)."""
    return x if x is None or isinstance(x, (int, float, str)) else repr(x)[:40]


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class AnnotationFileError(DataError):
    """The annotation file itself is unusable; `kind` is a stable code used by `comask data check`."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def load_coco_json(path: str | Path) -> dict:
    """Read a COCO instances JSON; raise DataError naming the file and the fix if its shape is wrong."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise AnnotationFileError(f"{path}: annotation file not found; check data.*.ann / --ann",
                                  "missing_annotation_file") from None
    except OSError as e:
        raise AnnotationFileError(f"{path}: cannot read annotation file ({e.strerror})",
                                  "missing_annotation_file") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationFileError(f"{path}: not valid JSON ({e}); export the annotations again as COCO JSON",
                                  "not_json") from None
    except RecursionError:
        raise AnnotationFileError(f"{path}: JSON nested too deeply; this is not a COCO file", "not_json") from None
    if not isinstance(data, dict):
        raise AnnotationFileError(f"{path}: top level must be a JSON object with images/annotations/categories, "
                                  f"got {type(data).__name__}", "wrong_type")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise AnnotationFileError(f"{path}: missing key(s) {', '.join(missing)}; a COCO instances file needs "
                                  "images, annotations and categories", "missing_keys")
    for k in ("images", "annotations", "categories"):
        if not isinstance(data[k], list):
            raise AnnotationFileError(f"{path}: '{k}' must be a list, got {type(data[k]).__name__}", "wrong_type")
    return data


_FAR = 1e9  # coordinates beyond this are clamped before clipping (no float overflow in the intersections)


def _clip_margin(h: int, w: int) -> float:
    # polygons reaching further than this outside the image are clipped: far enough that real data (a
    # few pixels out) is never touched, near enough that rasterizing costs no more than a large image
    return float(max(h, w) + 1024)


def clip_polygon(xy: np.ndarray, width: float, height: float, margin: float) -> np.ndarray:
    """The part of polygon `xy` (N, 2) inside [-margin, width + margin] x [-margin, height + margin]
    (Sutherland-Hodgman; the rectangle is convex, so the result is one polygon, maybe empty).

    Rasterizers walk every polygon edge pixel by pixel: pycocotools allocates ~ the edge length in
    pixels, so one coordinate of 1e9 costs gigabytes. Inside the image the clipped polygon covers the
    same pixels, up to sub-pixel rounding of the new vertices on the clip lines.
    """
    pts = np.clip(np.asarray(xy, dtype=np.float64).reshape(-1, 2), -_FAR, _FAR)
    for axis, bound, above in ((0, -margin, True), (0, width + margin, False),
                               (1, -margin, True), (1, height + margin, False)):
        if len(pts) == 0:
            break
        inside = pts[:, axis] >= bound if above else pts[:, axis] <= bound
        if inside.all():
            continue
        out: list[np.ndarray] = []
        for k in range(len(pts)):
            p, q, p_in, q_in = pts[k - 1], pts[k], inside[k - 1], inside[k]  # the edge p -> q
            if p_in != q_in:
                t = (bound - p[axis]) / (q[axis] - p[axis])
                cross = p + t * (q - p)
                cross[axis] = bound
                out.append(cross)
            if q_in:
                out.append(q)
        pts = np.array(out, dtype=np.float64).reshape(-1, 2)
    return pts


def _check_polygons(segm: list, img_id: Any, ann_id: Any,
                    hw: tuple[int, int] | None = None) -> tuple[list | None, list[Problem]]:
    probs: list[Problem] = []
    good = []
    for poly in segm:
        # numpy validates long coordinate lists ~10x faster than per-element Python checks
        try:
            arr = np.array(poly) if isinstance(poly, list) else None
        except (ValueError, TypeError, OverflowError):  # ragged nesting, mixed types
            arr = None
        if arr is None or arr.ndim != 1 or (arr.size and arr.dtype.kind not in "fiu") or len(poly) % 2:
            return None, [Problem("error", "bad_segmentation",
                                  f"annotation {ann_id} (image {img_id}): polygon is not a flat list of x,y numbers",
                                  "fix the exporter; polygons are [[x0, y0, x1, y1, ...], ...]",
                                  image_id=img_id, ann_id=ann_id)]
        if arr.size and not np.isfinite(arr).all():
            return None, [Problem("error", "nan_coordinates",
                                  f"annotation {ann_id} (image {img_id}): polygon has NaN/inf coordinates",
                                  "fix or delete the annotation (it is dropped in training)",
                                  image_id=img_id, ann_id=ann_id)]
        if len(poly) < 6:
            probs.append(Problem("warning", "degenerate_polygon",
                                 f"annotation {ann_id} (image {img_id}): polygon with {len(poly) // 2} point(s) "
                                 "(< 3)", "delete the polygon (it is ignored in training)",
                                 image_id=img_id, ann_id=ann_id))
            continue
        if hw is not None:
            h, w = hw
            xs, ys, m = arr[0::2], arr[1::2], _clip_margin(h, w)
            if xs.min() < -m or ys.min() < -m or xs.max() > w + m or ys.max() > h + m:
                clipped = clip_polygon(arr, w, h, m)
                if len(clipped) < 3:
                    probs.append(Problem("warning", "degenerate_polygon",
                                         f"annotation {ann_id} (image {img_id}): polygon lies outside the image",
                                         "delete the polygon (it is ignored in training)",
                                         image_id=img_id, ann_id=ann_id))
                    continue
                poly = [float(v) for v in clipped.reshape(-1)]
        good.append(poly)
    if not good:
        if not probs:
            probs.append(Problem("warning", "degenerate_polygon",
                                 f"annotation {ann_id} (image {img_id}): empty segmentation",
                                 "delete the annotation (it is dropped in training)", image_id=img_id, ann_id=ann_id))
        else:
            probs[-1].message += "; no valid polygon left, annotation dropped"
        return None, probs
    return good, probs


def rle_string_counts(s: str) -> list[int] | None:
    """The run lengths of a COCO compressed RLE string (pycocotools' rleFrString), or None when `s` is
    not one (a character outside '0'..'o', or a run cut off at the end)."""
    runs: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return None
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def _check_rle(segm: dict, img_id: Any, ann_id: Any, hw: tuple[int, int] | None) -> tuple[dict | None, list[Problem]]:
    size, counts = segm.get("size"), segm.get("counts")
    ok_size = isinstance(size, list) and len(size) == 2 and all(_as_int(v) is not None and v > 0 for v in size)
    ok_counts = isinstance(counts, str) or (isinstance(counts, list) and all(_as_int(v) is not None and v >= 0
                                                                             for v in counts))
    if not ok_size or not ok_counts:
        return None, [Problem("error", "bad_segmentation",
                              f"annotation {ann_id} (image {img_id}): RLE needs 'size' [h, w] and 'counts' "
                              "(list of ints or COCO string)", "re-encode the mask with pycocotools",
                              image_id=img_id, ann_id=ann_id)]
    h, w = int(size[0]), int(size[1])
    if isinstance(counts, list) and sum(counts) != h * w:
        return None, [Problem("error", "bad_segmentation",
                              f"annotation {ann_id} (image {img_id}): uncompressed RLE counts sum to {sum(counts)}, "
                              f"not {h}*{w}", "re-encode the mask with pycocotools", image_id=img_id, ann_id=ann_id)]
    if hw is not None and (h, w) != hw:
        return None, [Problem("error", "rle_size_mismatch",
                              f"annotation {ann_id} (image {img_id}): RLE size {h}x{w} differs from the image "
                              f"{hw[0]}x{hw[1]}", "re-encode the mask at the image size",
                              image_id=img_id, ann_id=ann_id)]
    if isinstance(counts, str):
        # pycocotools' decoder writes every run without a bounds check: runs past h*w overflow its buffer
        runs = rle_string_counts(counts)
        if runs is None or any(r < 0 for r in runs) or sum(runs) != h * w:
            why = "is not a COCO RLE string" if runs is None else (
                "has negative runs" if any(r < 0 for r in runs) else f"decodes to {sum(runs)} pixels, not {h}*{w}")
            return None, [Problem("error", "bad_segmentation",
                                  f"annotation {ann_id} (image {img_id}): compressed RLE counts {why}",
                                  "re-encode the mask with pycocotools", image_id=img_id, ann_id=ann_id)]
    return {"size": [h, w], "counts": counts}, []


def _check_box(bbox: Any, img_id: Any, ann_id: Any, hw: tuple[int, int] | None) -> tuple[list | None, list[Problem]]:
    def p(level: str, kind: str, msg: str, fix: str) -> Problem:
        return Problem(level, kind, f"annotation {ann_id} (image {img_id}): {msg}", fix, image_id=img_id, ann_id=ann_id)

    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_num(v) for v in bbox)):
        return None, [p("error", "bad_annotation_entry", f"bbox must be [x, y, w, h] numbers, got {bbox!r}",
                        "fix the exporter")]
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None, [p("error", "nan_coordinates", f"bbox {bbox} has NaN/inf", "fix or delete the annotation "
                        "(it is dropped in training)")]
    if w < 0 or h < 0:
        return None, [p("error", "negative_box", f"bbox {bbox} has negative width/height",
                        "bbox is [x, y, width, height], not xyxy; fix the exporter (dropped in training)")]
    if w == 0 or h == 0:
        return None, [p("warning", "zero_size_box", f"bbox {bbox} has zero width/height",
                        "delete the annotation (it is dropped in training)")]
    if hw is None:
        return [x, y, x + w, y + h], []
    H, W = hw
    if x >= W or y >= H or x + w <= 0 or y + h <= 0:
        return None, [p("error", "box_outside_image", f"bbox {bbox} lies outside the {W}x{H} image",
                        "fix the coordinates or the image size (dropped in training)")]
    probs = []
    if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > W + BOX_TOLERANCE or y + h > H + BOX_TOLERANCE:
        probs.append(p("warning", "box_out_of_bounds", f"bbox {bbox} extends beyond the {W}x{H} image",
                       "it is clipped to the image; check the annotation"))
    return [max(0.0, x), max(0.0, y), min(float(W), x + w), min(float(H), y + h)], probs


def _probe(path: Path, max_pixels: int, decode: bool) -> Any:
    try:
        return probe_image(path, max_pixels, decode=decode)
    except ImageFileError as e:
        return e


def scan_coco(
    data: dict,
    image_dir: str | Path | None = None,
    *,
    check_files: bool = True,
    decode: bool = False,
    max_pixels: int = MAX_PIXELS,
    workers: int = 8,
    allow_outside_paths: bool = False,
) -> ScanResult:
    """Validate a loaded COCO dict; with `check_files`, also read every image header in `image_dir`.

    A `file_name` that leaves the image folder (`..` segments, an absolute path or drive) is an error
    (`path_outside_images`: the entry is not used and its file is never opened) unless
    `allow_outside_paths`, which turns it into a warning.
    """
    global_problems: list[Problem] = []
    cats = _scan_categories(data["categories"], global_problems)
    images, invalid_ids, image_problems = _scan_images(data["images"], allow_outside_paths)
    file_sizes: dict[int, tuple[int, int]] = {}
    if check_files and image_dir is not None:
        file_sizes = _probe_files(images, Path(image_dir), max_pixels, decode, workers, image_problems)
    anns, num_crowd = _scan_annotations(data["annotations"], images, invalid_ids, cats)
    return ScanResult(
        num_images=len(data["images"]), num_annotations=len(data["annotations"]), num_crowd=num_crowd,
        images=list(images.values()), categories=[cats[k] for k in sorted(cats)], anns=anns,
        image_problems=image_problems, global_problems=global_problems, file_sizes=file_sizes,
    )


def _scan_categories(entries: list, problems: list[Problem]) -> dict[int, dict]:
    """Valid categories by id; bad or duplicate entries are reported into `problems`."""
    cats: dict[int, dict] = {}
    for i, c in enumerate(entries):
        cid = _as_int(c.get("id")) if isinstance(c, dict) else None
        if cid is None or not isinstance(c.get("name"), str):
            problems.append(Problem("error", "bad_category_entry",
                                           f"categories[{i}]: needs an integer 'id' and a string 'name', got {c!r:.80}",
                                           "fix the categories list"))
        elif cid in cats:
            problems.append(Problem("error", "duplicate_category_id",
                                           f"categories[{i}]: category id {cid} appears twice",
                                           "give every category a unique id"))
        else:
            cats[cid] = {"id": cid, "name": c["name"]}
    return cats


def _scan_images(entries: list, allow_outside_paths: bool) -> tuple[dict[int, dict], set[int], dict[Any, list[Problem]]]:
    """Usable image entries by id, the ids of entries reported as bad, and the problems per image."""
    image_problems: dict[Any, list[Problem]] = {}
    images: dict[int, dict] = {}
    invalid_ids: set[int] = set()  # ids of image entries that are themselves reported as bad
    seen_files: dict[str, int] = {}
    for i, im in enumerate(entries):
        if not isinstance(im, dict):
            image_problems.setdefault(f"#{i}", []).append(Problem(
                "error", "bad_image_entry", f"images[{i}]: must be an object, got {type(im).__name__}",
                "fix the images list"))
            continue
        iid, fn = _as_int(im.get("id")), im.get("file_name")
        h, w = _as_int(im.get("height")), _as_int(im.get("width"))
        key = iid if iid is not None else f"#{i}"
        # control characters (NUL cannot name a file; a newline would split the one-line messages) and lone
        # surrogates (not encodable as a file name) mark a corrupt entry, not a file to look for
        fn_ok = isinstance(fn, str) and bool(fn) and not _BAD_NAME_CHARS.search(fn)
        if iid is None or not fn_ok or h is None or w is None or h <= 0 or w <= 0:
            bad = [k for k, ok in (("id", iid is not None), ("file_name", fn_ok),
                                   ("height", h is not None and h > 0), ("width", w is not None and w > 0)) if not ok]
            if iid is not None:
                invalid_ids.add(iid)
            image_problems.setdefault(key, []).append(Problem(
                "error", "bad_image_entry", f"images[{i}] (id {im.get('id')!r}): missing or wrong type: {', '.join(bad)}",
                "every image needs an integer id, a file_name and positive integer width/height",
                image_id=iid, file=fn if fn_ok else None))
            continue
        if path_leaves_folder(fn):
            image_problems.setdefault(key, []).append(Problem(
                "warning" if allow_outside_paths else "error", "path_outside_images",
                f"image {iid}: file_name {fn!r} leaves the image folder (absolute path or '..')",
                "use a path inside the image folder, or set data.allow_outside_paths=true if the files are meant "
                "to be read from there", image_id=iid, file=fn))
            if not allow_outside_paths:
                invalid_ids.add(iid)  # never opened; its annotations go with it
                continue
        if iid in images:
            image_problems.setdefault(f"#{i}", []).append(Problem(
                "error", "duplicate_image_id", f"images[{i}]: image id {iid} ({fn}) appears twice",
                "give every image a unique id", image_id=iid, file=fn))
            continue
        if fn in seen_files:
            image_problems.setdefault(iid, []).append(Problem(
                "warning", "duplicate_file_name", f"image {iid}: file {fn} is also used by image {seen_files[fn]}",
                "remove the duplicate entry", image_id=iid, file=fn))
        seen_files.setdefault(fn, iid)
        images[iid] = {"id": iid, "file_name": fn, "height": h, "width": w}
    return images, invalid_ids, image_problems


def _probe_files(images: dict[int, dict], root: Path, max_pixels: int, decode: bool, workers: int,
                 image_problems: dict[Any, list[Problem]]) -> dict[int, tuple[int, int]]:
    """Read every image header (in threads): the files' true sizes by id; unreadable, missing, too large or
    mis-sized files are reported into `image_problems`."""
    file_sizes: dict[int, tuple[int, int]] = {}
    ids = list(images)
    with ThreadPoolExecutor(max(1, workers)) as ex:
        results = list(ex.map(lambda iid: _probe(root / images[iid]["file_name"], max_pixels, decode), ids))
    for iid, r in zip(ids, results):
        im = images[iid]
        fn = im["file_name"]
        if isinstance(r, ImageFileError):
            fix = {"missing_file": "put the file in the image folder or remove the image entry",
                   "image_too_large": "downscale or tile the image (and its annotations)"}.get(
                r.kind, "re-copy or re-encode the file, or remove the image entry")
            image_problems.setdefault(iid, []).append(Problem(
                "error", r.kind, f"image {iid} ({fn}): {str(r).split(': ', 1)[-1]}", fix, image_id=iid, file=fn))
            continue
        file_sizes[iid] = (r.height, r.width)
        if (r.height, r.width) != (im["height"], im["width"]):
            exif = " (the file's EXIF orientation rotates it)" if (r.raw_height, r.raw_width) != (
                r.height, r.width) else ""
            image_problems.setdefault(iid, []).append(Problem(
                "error", "size_mismatch",
                f"image {iid} ({fn}): stored size {im['width']}x{im['height']} but the file is "
                f"{r.width}x{r.height}{exif}", "fix width/height in the JSON (and check the annotations)",
                image_id=iid, file=fn))
        if min(r.width, r.height) < 4:
            image_problems.setdefault(iid, []).append(Problem(
                "warning", "tiny_image", f"image {iid} ({fn}): only {r.width}x{r.height} pixels",
                "check the file; such images carry no usable objects", image_id=iid, file=fn))
    return file_sizes


def _scan_annotations(entries: list, images: dict[int, dict], invalid_ids: set[int],
                      cats: dict[int, dict]) -> tuple[list[AnnInfo], int]:
    """One AnnInfo per annotation entry (its checked box and segmentation, or its problems) and the crowd count."""
    anns: list[AnnInfo] = []
    seen_ann: set[Any] = set()
    num_crowd = 0
    for i, a in enumerate(entries):
        if not isinstance(a, dict):
            info = AnnInfo(i, None, None, None, False)
            info.problems.append(Problem("error", "bad_annotation_entry",
                                         f"annotations[{i}]: must be an object, got {type(a).__name__}",
                                         "fix the annotations list"))
            anns.append(info)
            continue
        aid, iid, cid = _as_int(a.get("id")), _as_int(a.get("image_id")), _as_int(a.get("category_id"))
        crowd_raw = a.get("iscrowd", 0)
        info = AnnInfo(i, aid if aid is not None else _scalar(a.get("id")),
                       iid if iid is not None else _scalar(a.get("image_id")),
                       cid, bool(crowd_raw) if crowd_raw in (0, 1) else False)
        anns.append(info)
        num_crowd += int(info.iscrowd)
        bad = [k for k, ok in (("id", aid is not None), ("image_id", iid is not None),
                               ("category_id", cid is not None), ("iscrowd", crowd_raw in (0, 1)),
                               ("segmentation", isinstance(a.get("segmentation"), (list, dict)))) if not ok]
        if bad:
            info.problems.append(Problem("error", "bad_annotation_entry",
                                         f"annotations[{i}] (id {a.get('id')!r}): missing or wrong type: {', '.join(bad)}",
                                         "every annotation needs integer id/image_id/category_id, bbox, segmentation "
                                         "and iscrowd 0/1", image_id=iid, ann_id=aid))
            continue
        if aid in seen_ann:
            info.problems.append(Problem("error", "duplicate_annotation_id",
                                         f"annotations[{i}]: annotation id {aid} appears twice",
                                         "give every annotation a unique id", image_id=iid, ann_id=aid))
            continue
        seen_ann.add(aid)
        if iid in invalid_ids and iid not in images:
            continue  # the image entry's own problem covers its annotations
        if iid not in images:
            info.problems.append(Problem("error", "unknown_image",
                                         f"annotation {aid}: image_id {iid} is not in 'images'",
                                         "add the image entry or delete the annotation", image_id=iid, ann_id=aid))
            continue
        if cid not in cats:
            info.problems.append(Problem("error", "unknown_category",
                                         f"annotation {aid} (image {iid}): category_id {cid} is not in 'categories'",
                                         "add the category or fix the annotation", image_id=iid, ann_id=aid))
            continue
        hw = (images[iid]["height"], images[iid]["width"])
        info.box, probs = _check_box(a.get("bbox"), iid, aid, hw)
        info.problems.extend(probs)
        segm = a["segmentation"]
        if isinstance(segm, list):
            info.segm, probs = _check_polygons(segm, iid, aid, hw)
        else:
            info.segm, probs = _check_rle(segm, iid, aid, hw)
        info.problems.extend(probs)
    return anns, num_crowd


class _PickledList:
    """A list of records stored as one numpy byte buffer (shared copy-on-write by DataLoader workers)."""

    def __init__(self, items: Sequence[Any]):
        blobs = [np.frombuffer(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8) for x in items]
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._buf = np.concatenate(blobs) if blobs else np.zeros(0, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> Any:
        start = int(self._ends[i - 1]) if i > 0 else 0
        return pickle.loads(memoryview(self._buf[start:int(self._ends[i])]))


class CocoDataset(torch.utils.data.Dataset):
    """COCO instances JSON + image folder -> (image, target) pairs (see docs/DESIGN.md).

    Extra keyword arguments beyond the design contract: `check_files` reads every image header (and
    JPEG/PNG end markers) up front, so bad files are found before training starts and counted in the
    main process; `max_pixels` is the refuse-above limit of `comask.data.images`;
    `allow_outside_paths` lets `file_name`s leave `image_dir` (refused by default, see `scan_coco`).

    `skipped` counts skipped/dropped entries by reason and `skipped_items` lists (where, reason).
    Files that pass the header check but fail to decode are found while loading: with skip_bad the
    next image stands in (training) or `(None, {image_id, orig_size, skipped})` comes back
    (evaluation: `train=False`), the skip is logged once and the image is flagged in a shared-memory
    tensor, so an image found bad inside a DataLoader worker is counted (once, however often it is
    drawn) in the main process's `skipped` too, and is not decoded again.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        *,
        train: bool,
        min_sizes: Sequence[int] = (800,),
        max_size: int = 1333,
        flip_prob: float = 0.5,
        photometric: bool = False,
        keep_empty: bool = True,
        skip_bad: bool = False,
        check_files: bool = True,
        max_pixels: int = MAX_PIXELS,
        allow_outside_paths: bool = False,
    ):
        self.ann_file, self.image_dir = Path(ann_file), Path(image_dir)
        self.train = train
        self.min_sizes = [int(s) for s in (min_sizes if isinstance(min_sizes, Sequence) else [min_sizes])]
        self.max_size = int(max_size)
        self.flip_prob = float(flip_prob)
        self.photometric = bool(photometric)
        self.keep_empty = keep_empty
        self.skip_bad = skip_bad
        self.max_pixels = max_pixels
        self._scan_skipped: Counter[str] = Counter()
        self._scan_skipped_items: list[tuple[str, str]] = []

        data = load_coco_json(self.ann_file)
        scan = scan_coco(data, self.image_dir, check_files=check_files, max_pixels=max_pixels,
                         allow_outside_paths=allow_outside_paths)
        for p in scan.global_problems:
            self._bad(p, "categories", p.kind)
        self.cat_ids: list[int] = [c["id"] for c in scan.categories]
        self.class_names: list[str] = [c["name"] for c in scan.categories]
        self.cat_id_to_label = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}

        bad_images: set[Any] = set()
        for key, probs in scan.image_problems.items():
            for p in probs:
                if p.level == "error":
                    self._bad(p, f"image {key}" + (f" ({p.file})" if p.file else ""), p.kind)
                    bad_images.add(key)

        per_image: dict[int, list] = {}
        has_crowd: set[int] = set()
        gt_anns: list[dict] = []
        sizes = {im["id"]: (im["height"], im["width"]) for im in scan.images} if not train else {}
        for a in scan.anns:
            if a.image_id in bad_images:
                continue  # skipped (or fatal) with its image
            errors = [p for p in a.problems if p.level == "error" and p.kind not in DEGENERATE_KINDS]
            where = f"annotation {a.ann_id} (image {a.image_id})"
            if errors:
                self._bad(errors[0], where, errors[0].kind)
                continue
            if a.box is None or a.segm is None:
                kind = next((p.kind for p in a.problems if p.kind in DEGENERATE_KINDS), "degenerate")
                self._count(where, kind)
                continue
            if not train:
                gt_anns.append(self._gt_annotation(data["annotations"][a.index], a, sizes[a.image_id]))
            if a.iscrowd:
                has_crowd.add(a.image_id)
                continue
            per_image.setdefault(a.image_id, []).append(
                (self.cat_id_to_label[a.category_id], a.box, a.segm, a.ann_id))

        records = []
        for im in scan.images:
            iid = im["id"]
            if iid in bad_images:
                continue
            objs = per_image.get(iid, [])
            # Images with only crowd regions would teach "crowd = background"; like Detectron2, drop them.
            if train and not objs and (not keep_empty or iid in has_crowd):
                continue
            records.append({**im, "anns": objs})
        if not records:
            raise DataError(f"{self.ann_file}: no usable images (skipped: {dict(self.skipped) or 'none'}); "
                            f"run `comask data check --ann {self.ann_file} --images {self.image_dir}`")
        self.image_ids: list[int] = [r["id"] for r in records]
        # evaluation scores against the checked annotations, never the raw file: pycocotools rasterizes
        # whatever it is given (a NaN or 1e9 coordinate costs gigabytes, a bad RLE string overflows)
        self._gt = None if train else {"images": [dict(im) for im in scan.images], "annotations": gt_anns,
                                       "categories": [dict(c) for c in scan.categories]}
        self._sizes = np.array([(r["height"], r["width"]) for r in records], dtype=np.int64).reshape(-1, 2)
        self._records = _PickledList(records)
        # Per-record code of a file found bad while loading (0 = fine; k = _LAZY_KINDS[k - 1]). Shared
        # memory: DataLoader workers (forked, or spawned through torch's pickler) write the same
        # storage the main process reads, so their skips are not lost with the worker.
        self._lazy_bad = torch.zeros(len(records), dtype=torch.uint8).share_memory_()
        if self.skipped:
            log.warning("%s: skipped %s", self.ann_file, dict(self.skipped))

    @staticmethod
    def _gt_annotation(raw: dict, a: AnnInfo, hw: tuple[int, int]) -> dict:
        """A ground-truth entry for COCOeval: the file's annotation with its checked ids and segmentation
        (far-out polygons clipped) and, when the file's `area` is unusable, the mask's area."""
        gt = {**raw, "id": a.ann_id, "image_id": a.image_id, "category_id": a.category_id,
              "iscrowd": int(a.iscrowd), "segmentation": a.segm}
        area = raw.get("area")
        if not (_is_num(area) and math.isfinite(area) and area >= 0):
            import pycocotools.mask as mask_utils

            h, w = hw
            if isinstance(a.segm, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(a.segm, h, w))
            elif isinstance(a.segm["counts"], list):
                rle = mask_utils.frPyObjects(a.segm, h, w)
            else:
                rle = {"size": [h, w], "counts": a.segm["counts"].encode("ascii")}
            gt["area"] = float(mask_utils.area(rle))
        x0, y0, x1, y1 = a.box
        bbox = raw.get("bbox")
        gt["bbox"] = bbox if isinstance(bbox, list) and len(bbox) == 4 else [x0, y0, x1 - x0, y1 - y0]
        return gt

    @property
    def coco(self) -> Any:
        """The checked ground truth as a pycocotools COCO object (evaluation data sets only, else None)."""
        if self._gt is None:
            return None
        import contextlib
        import io

        from pycocotools.coco import COCO

        coco = COCO()
        coco.dataset = self._gt
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    # -- policy -----------------------------------------------------------------------------------
    def _count(self, where: str, reason: str) -> None:
        self._scan_skipped[reason] += 1
        self._scan_skipped_items.append((where, reason))

    @property
    def skipped(self) -> Counter[str]:
        """Skipped/dropped entries by reason: found at start-up plus images found bad while loading."""
        out = Counter(self._scan_skipped)
        lazy = getattr(self, "_lazy_bad", None)
        if lazy is not None:
            for code in lazy[lazy > 0].tolist():
                out[_LAZY_KINDS[code - 1]] += 1
        return out

    @property
    def skipped_items(self) -> list[tuple[str, str]]:
        items = list(self._scan_skipped_items)
        lazy = getattr(self, "_lazy_bad", None)
        if lazy is not None:
            for j in torch.nonzero(lazy).flatten().tolist():
                r = self._records[j]
                items.append((f"image {r['id']} ({r['file_name']})", _LAZY_KINDS[int(lazy[j]) - 1]))
        return items

    def _bad(self, problem: Problem | str, where: str, reason: str) -> None:
        if not self.skip_bad:
            raise DataError(f"{self.ann_file}: {problem}; run `comask data check --ann {self.ann_file} --images "
                            f"{self.image_dir}` to list every problem, or set data.skip_bad=true to skip bad entries")
        self._count(where, reason)

    # -- access -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._records)

    def get_image_info(self, i: int) -> dict:
        """id, file_name, height, width of item i (no annotations, no pixels)."""
        r = self._records[i]
        return {k: r[k] for k in ("id", "file_name", "height", "width")}

    def aspect_groups(self) -> list[int]:
        """0 for landscape/square (w >= h), 1 for portrait: the batch sampler's grouping key."""
        return [int(w < h) for h, w in self._sizes]

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, dict]:
        # Training: the next readable image stands in for a bad one (the batch keeps its size).
        # Evaluation: never another image's id (it would be scored twice); a bad image comes back as
        # (None, {"image_id", "orig_size", "skipped": kind}) and the evaluator leaves it out.
        for attempt in range(len(self) if self.train else 1):
            j = (i + attempt) % len(self)
            if not self._lazy_bad[j]:  # a file already found bad (here or in a worker) is not decoded again
                try:
                    return self._load(j)
                except ImageFileError as e:
                    r = self._records[j]
                    where = f"image {r['id']} ({r['file_name']})"
                    if not self.skip_bad:
                        self._bad(f"{where}: {e}", where, e.kind)
                    kind = e.kind if e.kind in _LAZY_KINDS else "corrupt_image"
                    self._lazy_bad[j] = _LAZY_KINDS.index(kind) + 1
                    log.warning("skipping %s: %s", where, e)
            if not self.train:
                r = self._records[j]
                return None, {"image_id": int(r["id"]), "orig_size": (r["height"], r["width"]),
                              "skipped": _LAZY_KINDS[int(self._lazy_bad[j]) - 1]}
        raise DataError(f"{self.ann_file}: no readable image left (skipped: {dict(self.skipped)})")

    def sync_skipped(self, reduce_max: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Merge the images found bad while loading on every DDP rank into this rank's counts.

        `reduce_max` is an in-place element-wise max over ranks (`comask.engine.dist.all_reduce_max`);
        a max of per-image codes, not a sum of counts, so an image two ranks both drew counts once.
        """
        merged = self._lazy_bad.to(torch.int32)
        reduce_max(merged)
        self._lazy_bad.copy_(merged.to(torch.uint8))

    def _load(self, i: int) -> tuple[torch.Tensor, dict]:
        r = self._records[i]
        arr = read_image(self.image_dir / r["file_name"], self.max_pixels)
        h, w = r["height"], r["width"]
        if arr.shape[:2] != (h, w):
            raise ImageFileError(f"stored size {w}x{h} but the file is {arr.shape[1]}x{arr.shape[0]}; "
                                 "fix width/height in the JSON", "size_mismatch")
        objs = r["anns"]
        boxes = torch.tensor([o[1] for o in objs], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([o[0] for o in objs], dtype=torch.int64)
        segms = [o[2] for o in objs]
        out_hw = (h, w)
        if self.train:
            short = self.min_sizes[int(torch.randint(len(self.min_sizes), ()))]
            out_hw = T.resize_shape(h, w, short, self.max_size)
            if out_hw != (h, w):
                arr = T.resize_image(torch.from_numpy(arr).permute(2, 0, 1), out_hw).permute(1, 2, 0).numpy()
            # clip: a box on the image's edge can land a float32 rounding past the new edge, and flip below 0
            boxes = T.clip_boxes(T.scale_boxes(boxes, out_hw[1] / w, out_hw[0] / h), *out_hw)
        masks = T.rasterize_np(segms, (h, w), out_hw)
        if self.train and self.flip_prob > 0 and float(torch.rand(())) < self.flip_prob:
            arr, masks = arr[:, ::-1], masks[:, :, ::-1]
            boxes = T.hflip_boxes(boxes, out_hw[1])
        # numpy for the per-pixel work: single-threaded, so it does not fight the model's torch threads
        chw = np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)
        chw *= np.float32(1.0 / 255.0)
        image = torch.from_numpy(chw)
        if self.train and self.photometric:
            image = T.photometric_jitter(image)
        masks = torch.from_numpy(np.ascontiguousarray(masks))
        target = {"boxes": boxes, "labels": labels, "masks": masks, "image_id": int(r["id"]),
                  "orig_size": (h, w)}
        return image, target
