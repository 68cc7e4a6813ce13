"""COCO evaluation: score results files (`comask evaluate`) and models on a data set (`comask eval`).

Scoring is pycocotools' COCOeval, always restricted to the ground truth's images. Model evaluation
works with any torchvision-style detection model and any data set yielding `(image, target)` with
`target["image_id"]`, plus `dataset.cat_ids` / `dataset.class_names` and the ground-truth annotations
(`dataset.coco` or `dataset.ann_file`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from comask.data.loader import build_dataset, build_test_loader
from comask.engine import dist
from comask.engine.predict import load_model, resize_problem
from comask.engine.results import MASK_THRESHOLD, output_to_rows
from comask.engine.runtime import check_output_dir, resolve_device
from comask.errors import DataError, UserError
from comask.modeling.static_compile import compile_for_inference

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
_STAT_LABELS = [
    "AP @[IoU=0.50:0.95 | area=all    | maxDets=100]",
    "AP @[IoU=0.50      | area=all    | maxDets=100]",
    "AP @[IoU=0.75      | area=all    | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area=small  | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area=large  | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=all    | maxDets=  1]",
    "AR @[IoU=0.50:0.95 | area=all    | maxDets= 10]",
    "AR @[IoU=0.50:0.95 | area=all    | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=small  | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=large  | maxDets=100]",
]
IOU_TYPES = ("bbox", "segm")


# ---------------------------------------------------------------------------------------------------
# Ground truth and results loading
# ---------------------------------------------------------------------------------------------------


def _read_json(path: str | Path, what: str, expected: str) -> Any:
    """Parse a JSON file; every failure is a one-line DataError naming the file and what was expected."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read {what} ({e})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); {expected}") from None


def load_gt(path: str | Path) -> COCO:
    """A COCO ground-truth file -> COCO object; errors name the file."""
    return gt_from_dict(_read_json(path, "ground-truth file", "give a COCO instances file"), str(path))


def gt_from_dict(data: Any, source: str = "ground truth") -> COCO:
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise DataError(f"{source}: not a COCO instances file (needs lists 'images', 'annotations', 'categories')")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            coco.createIndex()
        except (KeyError, TypeError) as e:
            raise DataError(f"{source}: malformed COCO entry (missing or wrong field {e}); run `comask data check`") from None
    return coco


def _read_rows(path: str | Path) -> list:
    return _read_json(path, "results file", "expected a list of COCO results rows")


def check_rows(rows: Any, coco_gt: COCO, iou_type: str, source: str = "results") -> list[dict]:
    """Validate results rows against the ground truth, before pycocotools' bare asserts can fire."""
    if not isinstance(rows, list):
        raise DataError(
            f"{source}: expected a JSON list of results rows ({{image_id, category_id, bbox|segmentation, score}}), "
            f"got a {type(rows).__name__}"
        )
    if not rows:
        raise DataError(f"{source}: the results list is empty (no detections to score)")
    need = "bbox" if iou_type == "bbox" else "segmentation"
    img_ids, cat_ids = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    bad_img: set = set()
    bad_cat: set = set()
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DataError(f"{source}: row {i} is a {type(r).__name__}, not an object")
        missing = [k for k in ("image_id", "category_id", "score", need) if k not in r]
        if missing:
            raise DataError(f"{source}: row {i} lacks {', '.join(missing)} (needed for --iou-type {iou_type})")
        if r["image_id"] not in img_ids:
            bad_img.add(r["image_id"])
        if r["category_id"] not in cat_ids:
            bad_cat.add(r["category_id"])
        s = r["score"]
        if not isinstance(s, (int, float)) or not math.isfinite(s):
            raise DataError(f"{source}: row {i} has score {s!r}; scores must be finite numbers")
    if bad_img:
        raise DataError(
            f"{source}: {len(bad_img)} image id(s) not in the ground truth (e.g. {_few(bad_img)}); "
            "the results belong to another data set or split"
        )
    if bad_cat:
        raise DataError(
            f"{source}: category id(s) {_few(bad_cat)} not in the ground truth (known: {_few(cat_ids, 10)}); "
            "results must use the original COCO category ids"
        )
    return rows


def _few(ids: Iterable, n: int = 5) -> str:
    s = sorted(ids, key=str)
    return ", ".join(str(x) for x in s[:n]) + (", ..." if len(s) > n else "")


def load_results(coco_gt: COCO, rows: list[dict], iou_type: str) -> COCO:
    """Results rows -> a COCO object, also for an empty list (pycocotools' loadRes cannot do that)."""
    if iou_type == "segm":
        # loadRes takes areas from `bbox` when present; segm scoring must use the mask areas
        rows = [{k: v for k, v in r.items() if k != "bbox"} for r in rows]
    if rows:
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                return coco_gt.loadRes(rows)
            except (AssertionError, KeyError, TypeError, ValueError, IndexError) as e:
                raise DataError(f"results rows are malformed for --iou-type {iou_type} ({type(e).__name__}: {e})") from None
    dt = COCO()
    dt.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                  "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


# ---------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------


def run_cocoeval(coco_gt: COCO, coco_dt: COCO, iou_type: str, img_ids: Sequence[int] | None = None,
                 *, verbose: bool = False) -> COCOeval:
    """COCOeval restricted to `img_ids` (default: every ground-truth image), evaluated and summarised."""
    ev = COCOeval(coco_gt, coco_dt, iou_type)
    ev.params.imgIds = sorted(coco_gt.getImgIds() if img_ids is None else img_ids)
    out = sys.stdout if verbose else io.StringIO()
    with contextlib.redirect_stdout(out):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def stats_dict(ev: COCOeval) -> dict[str, float]:
    return {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}


def per_category_ap(ev: COCOeval, names: dict[int, str] | None = None) -> dict[str, float]:
    """AP@[.5:.95] per category (area all, 100 dets); categories without ground truth are left out."""
    prec = ev.eval["precision"]  # [T, R, K, A, M]
    out = {}
    for k, cid in enumerate(ev.params.catIds):
        p = prec[:, :, k, 0, -1]
        p = p[p > -1]
        if p.size:
            out[(names or {}).get(cid, str(cid))] = float(np.mean(p))
    return out


def format_stats(stats: dict[str, float], title: str) -> str:
    lines = [title]
    for label, name in zip(_STAT_LABELS, STAT_NAMES):
        v = stats[name]
        lines.append(f"  {label} = {v:6.3f}" if v >= 0 else f"  {label} =    n/a")
    return "\n".join(lines)


def format_summary(metrics: dict) -> str:
    """The paper's Table 1 columns for bbox and segm, then per-category AP, as aligned text."""
    cols = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"]
    lines = [f"{'':6}" + "".join(f"{c:>8}" for c in cols)]
    for t in IOU_TYPES:
        if t in metrics:
            lines.append(f"{t:6}" + "".join(_cell(metrics[t][c]) for c in cols))
    per = metrics.get("per_category", {})
    names = sorted({n for t in per.values() for n in t})
    if names:
        w = max(12, max(len(n) for n in names) + 2)
        lines.append("")
        lines.append(f"{'category':{w}}" + "".join(f"{t + ' AP':>10}" for t in IOU_TYPES if t in per))
        for n in names:
            lines.append(f"{n:{w}}" + "".join(f"{_cell(per[t].get(n, -1.0)):>10}" for t in IOU_TYPES if t in per))
    return "\n".join(lines)


def _cell(v: float) -> str:
    return f"{v:8.3f}" if v >= 0 else f"{'n/a':>8}"


def evaluate_files(gt: str | Path, dt: str | Path, iou_type: str = "segm", as_json: bool = False) -> int:
    """`comask evaluate`: score a results file against ground truth; print the 12 stats (or JSON)."""
    if iou_type not in IOU_TYPES:
        raise DataError(f"--iou-type must be one of {', '.join(IOU_TYPES)}, got {iou_type!r}")
    coco_gt = load_gt(gt)
    rows = check_rows(_read_rows(dt), coco_gt, iou_type, str(dt))
    ev = run_cocoeval(coco_gt, load_results(coco_gt, rows, iou_type), iou_type)
    stats = [float(v) for v in ev.stats]
    if as_json:
        print(json.dumps({"stats": stats, "iou_type": iou_type, "num_images": len(ev.params.imgIds),
                          "num_results": len(rows)}))
    else:
        print(format_stats(dict(zip(STAT_NAMES, stats)),
                           f"{iou_type}: {len(rows)} results on {len(ev.params.imgIds)} images ({gt})"))
    return 0


# ---------------------------------------------------------------------------------------------------
# Model evaluation
# ---------------------------------------------------------------------------------------------------


def _gt_coco(dataset: Any) -> COCO:
    coco = getattr(dataset, "coco", None)
    if isinstance(coco, COCO):
        return coco
    ann = getattr(dataset, "ann_file", None)
    if ann is None:
        raise DataError("data set has neither a `coco` (pycocotools COCO) nor an `ann_file` attribute to score against")
    return load_gt(ann)


@torch.no_grad()
def _detect(model: torch.nn.Module, images: list[torch.Tensor], mask_thr: float) -> list[dict]:
    """The model's outputs; a model with comask's `predict` pastes bool masks (a quarter of the memory of
    probabilities, the same pixels as thresholding them at `mask_thr`)."""
    predict = getattr(model, "predict", None)
    with torch.inference_mode():
        return predict(images, mask_thr=mask_thr) if callable(predict) else model(images)


def run_inference(model: torch.nn.Module, dataset: Any, *, device: torch.device | str, batch_size: int = 2,
                  distributed: bool = False, num_workers: int = 0,
                  progress: bool = True, mask_thr: float = MASK_THRESHOLD,
                  cat_ids: Sequence[int] | None = None) -> tuple[list[dict], list[int]]:
    """Run `model` over `dataset` (this rank's shard with `distributed`) -> (COCO results rows, image ids seen).

    Label i+1 becomes COCO category `cat_ids[i]` (the model's own ids; default `dataset.cat_ids`).
    Rows use the original image size (`target["orig_size"]` when present). Images the data set
    returns as None (found unreadable with data.skip_bad) are neither run nor listed as seen.
    Only RLEs are kept per image, so memory does not grow with the masks' pixels.
    """
    device = torch.device(device)
    loader = build_test_loader(dataset, batch_size, distributed=distributed, num_workers=num_workers)
    cat_ids = list(dataset.cat_ids if cat_ids is None else cat_ids)
    model.eval()
    rows: list[dict] = []
    img_ids: list[int] = []
    total = len(loader.sampler)
    t0, done = time.perf_counter(), 0
    for images, targets in loader:
        # an image the data set found unreadable (data.skip_bad) comes as None: counted there, not scored
        kept = [(im, tgt) for im, tgt in zip(images, targets) if im is not None]
        images, targets = [k[0] for k in kept], [k[1] for k in kept]
        for im, tgt in kept:
            why = resize_problem(model, int(im.shape[-2]), int(im.shape[-1]))
            if why:  # a one-line error instead of torch's interpolate crash deep in the model
                raise DataError(f"image {tgt['image_id']}: {why}; or remove it from the evaluation set")
        outputs = _detect(model, [im.to(device) for im in images], mask_thr) if images else []
        for im, tgt, out in zip(images, targets, outputs):
            image_id = int(tgt["image_id"])
            size = tuple(int(s) for s in im.shape[-2:])
            orig = tuple(int(s) for s in tgt.get("orig_size", size))
            rows.extend(output_to_rows(out, image_id, cat_ids, image_size=size, orig_size=orig, mask_thr=mask_thr))
            img_ids.append(image_id)
        done += len(images)
        if progress and sys.stderr.isatty():
            rate = done / max(time.perf_counter() - t0, 1e-9)
            print(f"\reval {done}/{total} images ({rate:.2f} img/s)", end="", file=sys.stderr, flush=True)
    if progress:
        dt = time.perf_counter() - t0
        end = "\r" if sys.stderr.isatty() else ""
        print(f"{end}eval {done} images in {dt:.1f}s: {done / max(dt, 1e-9):.2f} img/s at batch size {batch_size}",
              file=sys.stderr, flush=True)
    return rows, img_ids


def check_categories(model_cats: Sequence[tuple[int, str]], dataset: Any, source: str = "validation set") -> None:
    """Refuse a data set whose categories (id -> name) are not the model's, naming the first mismatch.

    The evaluator writes the model's own category ids (label i+1 -> id i), so a data set that lists the
    same categories in another order scores right; a different numbering or naming would score wrong.
    """
    model_map = {int(c): str(n) for c, n in model_cats}
    data_map = {int(c): str(n) for c, n in zip(dataset.cat_ids, dataset.class_names)}
    fix = "evaluate on a set with the training set's category ids and names (data.val)"
    for cid, name in model_map.items():
        if cid not in data_map:
            raise DataError(f"{source}: the model's category id {cid} ({name!r}) is not in its categories "
                            f"(it has {_few(data_map, 10)}); {fix}")
        if data_map[cid] != name:
            raise DataError(f"{source}: category id {cid} is {data_map[cid]!r} there but {name!r} for the model; "
                            f"{fix}")
    extra = sorted(set(data_map) - set(model_map))
    if extra:
        raise DataError(f"{source}: category id {extra[0]} ({data_map[extra[0]]!r}) is unknown to the model "
                        f"(it has {_few(model_map, 10)}); {fix}")


def score_rows(coco_gt: COCO, rows: list[dict], img_ids: Sequence[int],
               class_names: dict[int, str] | None = None) -> dict:
    """bbox and segm metrics (12 stats each) plus per-category AP for rows on `img_ids`."""
    if class_names is None:
        class_names = {c["id"]: c["name"] for c in coco_gt.loadCats(coco_gt.getCatIds())}
    metrics: dict[str, Any] = {"per_category": {}}
    for t in IOU_TYPES:
        trows = [r for r in rows if ("segmentation" if t == "segm" else "bbox") in r]
        if t == "segm" and rows and not trows:
            continue  # a box-only model: no mask metrics to report
        ev = run_cocoeval(coco_gt, load_results(coco_gt, trows, t), t, img_ids)
        metrics[t] = stats_dict(ev)
        metrics["per_category"][t] = per_category_ap(ev, class_names)
    metrics["num_images"] = len(img_ids)
    metrics["num_detections"] = len(rows)
    return metrics


def evaluate_model(model: torch.nn.Module, dataset: Any, *, device: torch.device | str = "cpu",
                   batch_size: int = 2, distributed: bool = False, out_dir: str | Path | None = None,
                   num_workers: int = 0, verbose: bool = True, mask_thr: float = MASK_THRESHOLD,
                   cat_ids: Sequence[int] | None = None) -> dict:
    """Evaluate a detection model on a COCO data set; every rank returns the same metrics dict.

    Mask probabilities above `mask_thr` (the config's `model.test.mask_thresh`) are the scored masks.
    `cat_ids`: the model's COCO category ids (label i+1 -> `cat_ids[i]`; default `dataset.cat_ids`;
    check them first with `check_categories`). Images the data set skipped are counted in
    `metrics["skipped_data"]` (merged over ranks) and not scored.

    With `distributed`, each rank runs a strided shard and rank 0 gathers the rows and scores them.
    Rank 0 writes `metrics.json` and `results.json` (bbox + segm rows) into `out_dir` when given.
    """
    rank, world = 0, 1
    if distributed:
        rank, world = dist.get_rank(), dist.get_world_size()
    was_training = model.training
    rows, img_ids = run_inference(model, dataset, device=device, batch_size=batch_size, distributed=world > 1,
                                  num_workers=num_workers, progress=verbose and rank == 0, mask_thr=mask_thr,
                                  cat_ids=cat_ids)
    model.train(was_training)
    if world > 1:
        gathered = dist.all_gather_object((rows, img_ids))
        rows = [r for part in gathered for r in part[0]]
        img_ids = [i for part in gathered for i in part[1]]
        if hasattr(dataset, "sync_skipped"):
            dataset.sync_skipped(dist.all_reduce_max)  # images another rank found bad count here too
    metrics: dict = {}
    if rank == 0:
        img_ids = sorted(set(img_ids))
        coco_gt = _gt_coco(dataset)
        names = dict(zip(dataset.cat_ids, dataset.class_names)) if hasattr(dataset, "class_names") else None
        metrics = score_rows(coco_gt, rows, img_ids, names)
        skipped = dict(getattr(dataset, "skipped", None) or {})
        if skipped:
            metrics["skipped_data"] = skipped
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            _write_json(out / "results.json", rows)
            _write_json(out / "metrics.json", metrics, indent=2)
            metrics["files"] = {"metrics": str(out / "metrics.json"), "results": str(out / "results.json")}
        if verbose:
            print(format_summary(metrics))
    if world > 1:
        metrics = dist.broadcast_object(metrics, src=0)
    return metrics


def _write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, path)


def evaluate_checkpoint(weights: str | Path, config: str | Path | None = None, opts: list[str] | None = None,
                        out_dir: str | Path | None = None, device: str = "auto", batch_size: int = 2) -> dict:
    """`comask eval`: the checkpoint's model on its config's validation set (cfg.data.val).

    Under torchrun (torch.distributed initialised) each rank evaluates a shard and rank 0 scores.
    `out_dir` defaults to `eval_<checkpoint stem>/` next to the checkpoint.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    info = dist.init_distributed(str(device))
    try:
        dev = resolve_device(device, local_rank=info.local_rank if info.world_size > 1 else None)
        return _evaluate_checkpoint(weights, config, opts, out_dir, dev, info.world_size > 1, batch_size)
    finally:
        dist.cleanup(info)


def _evaluate_checkpoint(weights: str | Path, config: str | Path | None, opts: list[str] | None,
                         out_dir: str | Path | None, dev: torch.device, distributed: bool,
                         batch_size: int = 2) -> dict:
    if out_dir is None:
        out_dir = Path(weights).resolve().parent / f"eval_{Path(weights).stem}"
    if dist.is_main_process():
        check_output_dir(out_dir, 0)  # before the model and the data: an unusable --out costs nothing
    lm = load_model(weights, config, opts, device=dev)
    cfg = lm.cfg
    compile_for_inference(lm.model, cfg)  # model.test.compile; eager by default
    if cfg.data.get("synth"):
        from comask.data.synth import ensure_synth

        if dist.is_main_process():  # one writer; the other ranks wait for the files
            ensure_synth(cfg.data.synth.preset, cfg.data.synth.root)
        dist.barrier()
    # the data path training's evaluation takes: the config's file checks and pixel limit apply alike
    dataset = build_dataset(cfg, "val")
    if len(lm.cat_ids) != len(dataset.cat_ids) or (lm.from_meta and list(lm.cat_ids) != list(dataset.cat_ids)):
        raise DataError(
            f"{cfg.data.val.ann}: category ids {_few(dataset.cat_ids, 10)} differ from the model's "
            f"{_few(lm.cat_ids, 10)}; evaluate on the data set the model was trained for (or pass its --config)"
        )
    metrics = evaluate_model(lm.model, dataset, device=dev, batch_size=batch_size, distributed=distributed,
                             out_dir=out_dir, num_workers=int(cfg.data.get("num_workers", 0) or 0),
                             mask_thr=float(cfg.model.test.mask_thresh),
                             cat_ids=lm.cat_ids if lm.from_meta else None)
    skipped = metrics.get("skipped_data")
    if skipped and dist.is_main_process():
        # data.skip_bad: the scores cover only the images that could be used; say which could not
        named = "; ".join(f"{where}: {why}" for where, why in dataset.skipped_items[:10])
        more = len(dataset.skipped_items) - 10
        print(f"comask eval: skipped bad validation data (data.skip_bad): {skipped} ({named}"
              f"{f'; and {more} more' if more > 0 else ''})", file=sys.stderr)
    return metrics
