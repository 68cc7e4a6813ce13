"""COCO results rows: one builder (`comask.engine.results.coco_rows`) behind evaluation
(`output_to_rows`), `comask predict` (`instances_to_rows`) and `comask serve` (`instances_to_json`)."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from comask.engine.predict import Predictor, instances_to_rows
from comask.engine.results import coco_rows, output_to_rows
from comask.serve.app import instances_to_json

H, W = 24, 32


class _FixedModel(torch.nn.Module):
    """Returns the same detections for any image: the model's side of every row builder."""

    def __init__(self, output: dict[str, torch.Tensor]):
        super().__init__()
        self.output = output

    def forward(self, images):
        return [dict(self.output) for _ in images]


def _output() -> dict[str, torch.Tensor]:
    masks = torch.zeros(3, 1, H, W)
    masks[0, 0, 2:10, 3:12] = 0.9
    masks[1, 0, 12:20, 15:30] = 0.8
    masks[2, 0, 0:5, 0:5] = 0.7
    return {"boxes": torch.tensor([[3.0, 2.0, 12.0, 10.0], [15.0, 12.0, 30.0, 20.0], [0.0, 0.0, 5.0, 5.0]]),
            "scores": torch.tensor([0.6, 0.9, 0.2]), "labels": torch.tensor([2, 1, 1]), "masks": masks}


def test_coco_rows_fields() -> None:
    masks = np.zeros((2, H, W), bool)
    masks[0, 1:3, 1:4] = True
    rows = coco_rows(np.array([[1.0, 2.0, 4.0, 6.5], [0, 0, 1, 1]]), np.array([0.123456, 1.0]), [7, 9], masks,
                     image_id=5, fields={"name": ["a", "b"]}, extra={"file_name": "x.png"}, with_area=True)
    assert rows[0]["bbox"] == [1.0, 2.0, 3.0, 4.5] and rows[0]["score"] == 0.12346
    assert {k: rows[1][k] for k in ("image_id", "category_id", "name", "file_name")} == \
        {"image_id": 5, "category_id": 9, "name": "b", "file_name": "x.png"}
    assert rows[0]["area"] == 6 and rows[1]["area"] == 0
    rle = rows[0]["segmentation"]
    assert isinstance(rle["counts"], str)
    assert np.array_equal(mask_util.decode({**rle, "counts": rle["counts"].encode()}).astype(bool), masks[0])
    bare = coco_rows(np.zeros((1, 4)), np.ones(1), [3])
    assert bare == [{"category_id": 3, "bbox": [0.0, 0.0, 0.0, 0.0], "score": 1.0}], "no image_id/segmentation"


def test_eval_predict_and_serve_rows_agree() -> None:
    """The same detections through the three callers: the same COCO fields, each caller's own extras."""
    out = _output()
    cat_ids, classes = [11, 25], ["circle", "star"]
    image = np.zeros((H, W, 3), np.uint8)
    predictor = Predictor(backend=_FixedModel(out), classes=classes, cat_ids=cat_ids, score_thr=0.5)
    inst = predictor(image)

    ev = output_to_rows(out, 4, cat_ids, image_size=(H, W), orig_size=(H, W), score_thr=0.5)
    pr = instances_to_rows(inst, 4, {"file_name": "a.png"})
    sv = instances_to_json(inst, score_thr=0.5, max_det=10)
    core = ("category_id", "bbox", "score", "segmentation")
    assert len(ev) == len(pr) == 2
    assert [{k: r[k] for k in core} for r in ev] == [{k: r[k] for k in core} for r in pr]
    # serve: best score first, no image_id, its own fields
    assert [{k: r[k] for k in core} for r in sv] == [{k: r[k] for k in core} for r in reversed(pr)]
    assert [r["category_id"] for r in ev] == [25, 11]
    assert [r["category_name"] for r in pr] == ["star", "circle"] and pr[0]["file_name"] == "a.png"
    assert [(r["id"], r["label"], r["class_name"]) for r in sv] == [(0, 1, "circle"), (1, 2, "star")]
    assert sv[0]["area"] == int(inst["masks"][1].sum()) > 0 and "image_id" not in sv[0]
    with pytest.raises(ValueError, match="outside 1..2"):
        output_to_rows({**out, "labels": torch.tensor([3, 1, 1])}, 1, cat_ids)


def test_mask_threshold_reaches_eval_rows() -> None:
    """output_to_rows (what `comask eval` scores) binarises at `mask_thr` (model.test.mask_thresh)."""
    ramp = torch.linspace(0.0, 1.0, W).reshape(1, 1, 1, W).expand(1, 1, H, W)
    out = {"boxes": torch.tensor([[0.0, 0.0, W, H]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.9]),
           "masks": ramp.clone()}
    areas = [mask_util.area(output_to_rows(out, 1, [5], mask_thr=t)[0]["segmentation"]) for t in (0.3, 0.5, 0.8)]
    assert areas[0] > areas[1] > areas[2] > 0
    assert areas[1] == H * int((torch.linspace(0.0, 1.0, W) > 0.5).sum())
