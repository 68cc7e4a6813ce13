"""Model outputs -> COCO results rows (boxes as [x, y, w, h], masks as RLE with string counts).

Models follow torchvision's detection interface (`boxes` xyxy, contiguous `labels` 1..C, `scores`,
`masks` (N, 1, H, W) probabilities); nothing here knows which architecture produced them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F

MASK_THRESHOLD = 0.5


def to_numpy(x: Any) -> np.ndarray:
    """A tensor (any device, with or without grad) or array-like -> numpy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def binarize_masks(masks: Any, size: tuple[int, int] | None = None, thr: float = MASK_THRESHOLD) -> np.ndarray:
    """(N, 1, H, W) or (N, H, W) probabilities or bools -> (N, h, w) bool, resized to `size` if given."""
    if isinstance(masks, torch.Tensor):
        m = masks.detach()
        if m.dim() == 4:
            m = m[:, 0]
        if size is not None and tuple(m.shape[-2:]) != tuple(size) and m.shape[0] > 0:
            # bilinear on probabilities, then threshold: the same rule the model uses when pasting
            m = F.interpolate(m[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
        if m.dtype == torch.bool:
            return m.cpu().numpy()
        return (m > thr).cpu().numpy()
    a = np.asarray(masks)
    if a.ndim == 4:
        a = a[:, 0]
    if size is not None and a.shape[-2:] != tuple(size) and a.shape[0] > 0:
        return binarize_masks(torch.from_numpy(a.astype(np.float32)), size, thr)
    return a.astype(bool) if a.dtype == bool else a > thr


def encode_masks(masks: np.ndarray) -> list[dict]:
    """(N, H, W) bool -> COCO RLEs with `counts` as str (JSON-serialisable)."""
    rles = []
    # one mask at a time: the Fortran-order uint8 copy pycocotools needs is one image's size, not N images'
    for m in masks:
        r = mask_util.encode(np.asfortranarray(m[:, :, None], dtype=np.uint8))[0]
        r["counts"] = r["counts"].decode("ascii")
        rles.append(r)
    return rles


def scale_boxes(boxes: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """Rescale xyxy boxes from an (h, w) frame to another (h, w) frame."""
    sy = to_size[0] / max(from_size[0], 1)
    sx = to_size[1] / max(from_size[1], 1)
    return boxes * np.array([sx, sy, sx, sy], dtype=np.float32)


def coco_rows(
    boxes: np.ndarray,
    scores: np.ndarray,
    category_ids: Sequence[int],
    masks: np.ndarray | None = None,
    *,
    image_id: int | None = None,
    fields: Mapping[str, Sequence[Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
    with_area: bool = False,
) -> list[dict]:
    """N instances -> COCO results rows; the one place rows are built.

    Each row: `image_id` (when given), `category_id`, `bbox` [x, y, w, h] (from xyxy `boxes`, rounded
    to 0.01 px), `score` (5 decimals), `segmentation` (RLE with str counts, when `masks` (N, H, W) bool
    are given), `area` (mask pixels, with `with_area`), then the i-th value of each `fields` entry
    (per-instance extras such as class names) and the `extra` items (the same in every row).
    """
    rles = encode_masks(masks) if masks is not None and len(masks) else []
    areas = masks.reshape(len(masks), -1).sum(axis=1) if with_area and rles else None
    fields = dict(fields or {})
    rows = []
    for i in range(len(scores)):
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        row: dict[str, Any] = {} if image_id is None else {"image_id": int(image_id)}
        row["category_id"] = int(category_ids[i])
        row["bbox"] = [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]
        row["score"] = round(float(scores[i]), 5)
        if rles:
            row["segmentation"] = rles[i]
        if areas is not None:
            row["area"] = int(areas[i])
        row.update({k: v[i] for k, v in fields.items()})
        row.update(extra or {})
        rows.append(row)
    return rows


def output_to_rows(
    output: Mapping[str, Any],
    image_id: int,
    cat_ids: Sequence[int],
    *,
    image_size: tuple[int, int] | None = None,
    orig_size: tuple[int, int] | None = None,
    score_thr: float = 0.0,
    mask_thr: float = MASK_THRESHOLD,
    extra: Mapping[str, Any] | None = None,
) -> list[dict]:
    """One image's model output -> COCO results rows.

    `cat_ids[i]` is the COCO category id of contiguous label i+1. `image_size` is the (h, w) the model
    saw; when `orig_size` differs (an image resized before inference), boxes and masks are mapped back
    so rows are always in the original image's pixels. Mask probabilities above `mask_thr` are the mask
    (`model.test.mask_thresh`). `extra` is copied into every row (e.g. file_name).
    """
    boxes = to_numpy(output["boxes"]).astype(np.float32).reshape(-1, 4)
    scores = to_numpy(output["scores"]).astype(np.float32).reshape(-1)
    labels = to_numpy(output["labels"]).astype(np.int64).reshape(-1)
    keep = scores >= score_thr
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if len(labels) and (labels.min() < 1 or labels.max() > len(cat_ids)):
        raise ValueError(f"model produced label {int(labels.max())} outside 1..{len(cat_ids)} (class count mismatch)")
    if image_size is not None and orig_size is not None and tuple(image_size) != tuple(orig_size):
        boxes = scale_boxes(boxes, image_size, orig_size)
    masks = None
    if "masks" in output:
        m = output["masks"]
        m = m[torch.from_numpy(keep)] if isinstance(m, torch.Tensor) else np.asarray(m)[keep]
        masks = binarize_masks(m, orig_size, mask_thr)
    return coco_rows(boxes, scores, [cat_ids[i - 1] for i in labels], masks, image_id=image_id, extra=extra)
