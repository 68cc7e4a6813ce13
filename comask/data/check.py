"""`comask data check`: validate a COCO-format data set and report every problem.

Errors (exit 1) are defects that stop training unless data.skip_bad=true (missing/unreadable files,
unknown or duplicate ids, malformed entries, size mismatches) or that mark corrupt annotations
(NaN coordinates, negative or out-of-image boxes: dropped in training). Warnings (exit 0) are
handled automatically: zero-size boxes and polygons with < 3 points are dropped, boxes partly
outside the image are clipped, tiny (e.g. 1x1) images and duplicate file names are only reported.
Only image headers (plus the end marker of JPEG/PNG files) are read unless `deep=True`.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from comask.data.coco import AnnotationFileError, load_coco_json, scan_coco
from comask.data.images import MAX_PIXELS

_TEXT_LIMIT_PER_KIND = 20  # text output lists this many problems of each kind, then a count


def build_report(ann: str | Path, images: str | Path, *, deep: bool = False, max_pixels: int = MAX_PIXELS,
                 allow_outside_paths: bool = False) -> dict:
    """The data check report as a dict (what `--json` prints)."""
    t0 = time.perf_counter()
    report: dict[str, Any] = {"ann": str(ann), "images_dir": str(images), "images": 0, "annotations": 0,
                              "crowd": 0, "categories": 0, "empty_images": 0, "per_category": {},
                              "errors": [], "warnings": []}
    try:
        data = load_coco_json(ann)
    except AnnotationFileError as e:
        report["errors"].append({"level": "error", "kind": e.kind, "message": str(e),
                                 "fix": "fix or re-export the annotation file", "file": str(ann)})
        return report
    if not Path(images).is_dir():
        report["errors"].append({"level": "error", "kind": "missing_image_dir",
                                 "message": f"{images}: image folder not found", "fix": "check --images",
                                 "file": str(images)})
    scan = scan_coco(data, images, check_files=Path(images).is_dir(), decode=deep, max_pixels=max_pixels,
                     allow_outside_paths=allow_outside_paths)
    report.update(images=scan.num_images, annotations=scan.num_annotations, crowd=scan.num_crowd,
                  categories=len(data["categories"]))

    names = {c["id"]: c["name"] for c in scan.categories}
    inst: Counter[int] = Counter()
    crowd: Counter[int] = Counter()
    imgs: defaultdict[int, set] = defaultdict(set)
    annotated: set[Any] = set()
    for a in scan.anns:
        if a.category_id in names and not any(p.level == "error" for p in a.problems):
            (crowd if a.iscrowd else inst)[a.category_id] += 1
            imgs[a.category_id].add(a.image_id)
        annotated.add(a.image_id)
    report["per_category"] = {
        names[c]: {"id": c, "instances": inst[c], "crowd": crowd[c], "images": len(imgs[c])} for c in names
    }
    report["empty_images"] = sum(1 for im in scan.images if im["id"] not in annotated)
    for p in scan.problems:
        report["errors" if p.level == "error" else "warnings"].append(p.to_dict())
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def _print_text(r: dict) -> None:
    out = sys.stdout
    print(f"data check: {r['ann']} + {r['images_dir']}", file=out)
    print(f"  images: {r['images']} ({r['empty_images']} without annotations)", file=out)
    print(f"  annotations: {r['annotations']} ({r['crowd']} crowd)", file=out)
    used = sum(1 for v in r["per_category"].values() if v["instances"] + v["crowd"] > 0)
    print(f"  categories: {r['categories']} ({used} used)", file=out)
    for name, v in sorted(r["per_category"].items(), key=lambda kv: -kv[1]["instances"]):
        crowd = f", {v['crowd']} crowd" if v["crowd"] else ""
        print(f"    {v['id']:>4} {name:<24} {v['instances']:>7} instances in {v['images']} images{crowd}", file=out)
    for level in ("errors", "warnings"):
        items = r[level]
        print(f"  {level}: {len(items)}", file=out)
        shown: Counter[str] = Counter()
        for p in items:
            shown[p["kind"]] += 1
            if shown[p["kind"]] <= _TEXT_LIMIT_PER_KIND:
                fix = f" -> {p['fix']}" if p.get("fix") else ""
                print(f"    {level[:-1].upper()} [{p['kind']}] {p['message']}{fix}", file=out)
        for kind, n in shown.items():
            if n > _TEXT_LIMIT_PER_KIND:
                print(f"    ... and {n - _TEXT_LIMIT_PER_KIND} more [{kind}] (use --json for all)", file=out)
    verdict = "FAILED" if r["errors"] else "OK"
    print(f"{verdict}: {len(r['errors'])} error(s), {len(r['warnings'])} warning(s)", file=out)


def run_check(ann: str | Path, images: str | Path, as_json: bool = False, deep: bool = False,
              allow_outside_paths: bool = False) -> int:
    """Print the report (text or one JSON object); 0 when there are no errors, 1 otherwise."""
    r = build_report(ann, images, deep=deep, allow_outside_paths=allow_outside_paths)
    if as_json:
        print(json.dumps(r, default=str))
    else:
        _print_text(r)
    return 1 if r["errors"] else 0
