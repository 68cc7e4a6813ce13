"""COCO evaluation: reference numbers, results rows, and the whole model -> metrics path."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from comask.cli import main as cli_main
from comask.engine.evaluate import STAT_NAMES, evaluate_files, evaluate_model
from comask.engine.results import output_to_rows
from comask.errors import DataError

REF = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-eval-reference"
if not REF.is_dir():
    REF = Path("/work/shared/data/coco-eval-reference")


def _reference_stats() -> dict[str, list[float]]:
    """The 12 numbers per iou type printed in val2014_fake_eval_res.txt."""
    out: dict[str, list[float]] = {}
    current = None
    for line in (REF / "val2014_fake_eval_res.txt").read_text().splitlines():
        m = re.match(r"type=(\w+)", line.strip())
        if m:
            current = m.group(1)
            out[current] = []
        elif current and "] = " in line:
            out[current].append(float(line.rsplit("=", 1)[1]))
    return out


@pytest.mark.skipif(not REF.is_dir(), reason="shared reference data not present")
@pytest.mark.parametrize("iou_type,dt", [("segm", "fakesegm"), ("bbox", "fakebbox")])
def test_reference_numbers(iou_type, dt, capsys):
    ref = _reference_stats()[iou_type]
    assert len(ref) == 12
    rc = evaluate_files(REF / "instances_val2014_100.json", REF / f"instances_val2014_{dt}100_results.json",
                        iou_type=iou_type, as_json=True)
    assert rc == 0
    got = json.loads(capsys.readouterr().out)
    assert got["iou_type"] == iou_type
    assert len(got["stats"]) == 12
    assert [round(v, 3) for v in got["stats"]] == pytest.approx(ref, abs=1e-9)


@pytest.mark.skipif(not REF.is_dir(), reason="shared reference data not present")
def test_cli_evaluate_table(capsys):
    rc = cli_main(["evaluate", "--gt", str(REF / "instances_val2014_100.json"),
                   "--dt", str(REF / "instances_val2014_fakebbox100_results.json"), "--iou-type", "bbox"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "0.505" in out and "0.564" in out  # first and last of the 12 bbox numbers


def _tiny_gt(tmp_path: Path) -> Path:
    gt = {
        "images": [{"id": 10, "file_name": "a.png", "height": 40, "width": 50},
                   {"id": 20, "file_name": "b.png", "height": 40, "width": 50}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [{"id": 1, "image_id": 10, "category_id": 3, "bbox": [5, 5, 10, 10], "area": 100,
                         "iscrowd": 0, "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]}],
    }
    p = tmp_path / "gt.json"
    p.write_text(json.dumps(gt))
    return p


@pytest.mark.parametrize("rows,msg", [
    ({"image_id": 10}, "JSON list"),
    ([], "empty"),
    ([{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}], "not in the ground truth"),
    ([{"image_id": 10, "category_id": 5, "bbox": [0, 0, 1, 1], "score": 1.0}], "category id"),
    ([{"image_id": 10, "category_id": 3, "score": 1.0}], "lacks bbox"),
])
def test_bad_results_are_explained(tmp_path, rows, msg):
    dt = tmp_path / "dt.json"
    dt.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=msg):
        evaluate_files(_tiny_gt(tmp_path), dt, iou_type="bbox")


def test_not_json_results(tmp_path, capsys):
    dt = tmp_path / "dt.json"
    dt.write_text("{not json")
    rc = cli_main(["evaluate", "--gt", str(_tiny_gt(tmp_path)), "--dt", str(dt)])
    assert rc == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_output_to_rows_maps_categories_and_encodes_masks():
    h, w = 30, 40
    masks = torch.zeros(2, 1, h, w)
    masks[0, 0, 2:10, 3:20] = 0.9
    masks[1, 0, 15:28, 30:39] = 0.7
    masks[1, 0, 0, 0] = 0.4  # below the 0.5 threshold: not part of the mask
    out = {"boxes": torch.tensor([[3.0, 2.0, 20.0, 10.0], [30.0, 15.0, 39.0, 28.0]]),
           "labels": torch.tensor([2, 1]), "scores": torch.tensor([0.9, 0.3]), "masks": masks}
    rows = output_to_rows(out, 42, [11, 25])
    assert [r["category_id"] for r in rows] == [25, 11]
    assert rows[0]["bbox"] == [3.0, 2.0, 17.0, 8.0]
    assert all(r["image_id"] == 42 for r in rows)
    assert isinstance(rows[0]["segmentation"]["counts"], str)
    for r, m in zip(rows, masks[:, 0] > 0.5):
        dec = mask_util.decode({"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()})
        assert dec.shape == (h, w)
        assert np.array_equal(dec.astype(bool), m.numpy())
    json.dumps(rows)  # serialisable as is
    # a score threshold drops rows; resizing maps boxes and masks to the original frame
    assert len(output_to_rows(out, 42, [11, 25], score_thr=0.5)) == 1
    big = output_to_rows(out, 1, [11, 25], image_size=(h, w), orig_size=(2 * h, 2 * w))
    assert big[0]["bbox"] == [6.0, 4.0, 34.0, 16.0]
    assert big[0]["segmentation"]["size"] == [2 * h, 2 * w]
    with pytest.raises(ValueError, match="outside"):
        output_to_rows({**out, "labels": torch.tensor([3, 1])}, 1, [11, 25])


# ---------------------------------------------------------------------------------------------------
# evaluate_model on a tiny real COCO data set
# ---------------------------------------------------------------------------------------------------


def _write_coco(root: Path) -> Path:
    """Three 48x64 images, categories with non-contiguous ids, one image without objects."""
    rng = np.random.default_rng(0)
    images, anns = [], []
    objs = {
        1: [(7, [[4, 4, 30, 4, 30, 20, 4, 20]]), (3, [[35, 10, 60, 12, 50, 40]])],
        2: [(3, [[10, 30, 20, 5, 30, 30]])],
        3: [],
    }
    aid = 1
    for iid, items in objs.items():
        name = f"im{iid}.png"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / name)
        images.append({"id": iid, "file_name": name, "height": 48, "width": 64})
        for cat, poly in items:
            rle = mask_util.merge(mask_util.frPyObjects(poly, 48, 64))
            anns.append({"id": aid, "image_id": iid, "category_id": cat, "segmentation": poly,
                         "bbox": [float(v) for v in mask_util.toBbox(rle)], "area": float(mask_util.area(rle)),
                         "iscrowd": 0})
            aid += 1
    ann = root / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": 3, "name": "tri"}, {"id": 7, "name": "box"}]}))
    return ann


class _OracleModel(torch.nn.Module):
    """Returns each image's ground truth (looked up by pixel content) as detections."""

    def __init__(self, dataset, empty: bool = False):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.empty = empty
        self.table = {}
        for i in range(len(dataset)):
            img, tgt = dataset[i]
            self.table[self._key(img)] = tgt

    @staticmethod
    def _key(img: torch.Tensor) -> str:
        return hashlib.sha1(img.numpy().tobytes()).hexdigest()

    def forward(self, images):
        outs = []
        for im in images:
            t = self.table[self._key(im)]
            n = 0 if self.empty else len(t["labels"])
            outs.append({"boxes": t["boxes"][:n], "labels": t["labels"][:n], "scores": torch.linspace(1, 0.5, n),
                         "masks": t["masks"][:n, None].float()})
        return outs


@pytest.fixture()
def tiny_dataset(tmp_path):
    from comask.data.coco import CocoDataset

    ann = _write_coco(tmp_path)
    return CocoDataset(ann, tmp_path, train=False)


def test_evaluate_model_oracle_scores_one(tiny_dataset, tmp_path, capsys):
    model = _OracleModel(tiny_dataset)
    m = evaluate_model(model, tiny_dataset, device="cpu", batch_size=2, out_dir=tmp_path / "ev")
    assert m["bbox"]["AP"] == pytest.approx(1.0)
    assert m["segm"]["AP"] == pytest.approx(1.0)
    assert m["segm"]["AP75"] == pytest.approx(1.0)
    assert set(m["bbox"]) == set(STAT_NAMES)
    assert m["per_category"]["segm"] == {"tri": pytest.approx(1.0), "box": pytest.approx(1.0)}
    assert m["num_images"] == 3 and m["num_detections"] == 3
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["segm"]["AP"] == pytest.approx(1.0)
    rows = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert {r["category_id"] for r in rows} == {3, 7}  # original COCO ids, not labels 1..2
    assert all("segmentation" in r and "bbox" in r for r in rows)
    out = capsys.readouterr().out
    assert "segm" in out and "tri" in out
    # the written results score the same through the file path
    assert evaluate_files(tiny_dataset.ann_file, tmp_path / "ev" / "results.json", "segm", as_json=True) == 0
    assert json.loads(capsys.readouterr().out)["stats"][0] == pytest.approx(1.0)


def test_evaluate_model_without_detections(tiny_dataset, tmp_path):
    m = evaluate_model(_OracleModel(tiny_dataset, empty=True), tiny_dataset, device="cpu", out_dir=tmp_path)
    assert m["bbox"]["AP"] == 0.0 and m["segm"]["AP"] == 0.0
    assert m["num_detections"] == 0
    assert json.loads((tmp_path / "results.json").read_text()) == []


def test_evaluate_model_wrong_class_is_penalised(tiny_dataset):
    class Swapped(_OracleModel):
        def forward(self, images):
            outs = super().forward(images)
            for o in outs:
                o["labels"] = 3 - o["labels"]  # 1 <-> 2
            return outs

    m = evaluate_model(Swapped(tiny_dataset), tiny_dataset, device="cpu", verbose=False)
    assert m["segm"]["AP"] == pytest.approx(0.0)


_DIST_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from comask.engine import dist
from comask.data.coco import CocoDataset
from comask.engine.evaluate import evaluate_model
from test_evaluate import _OracleModel, _write_coco
info = dist.init_distributed("cpu")
root = Path({root!r}) / f"r{{info.rank}}"
root.mkdir()
ds = CocoDataset(_write_coco(root), root, train=False)
m = evaluate_model(_OracleModel(ds), ds, distributed=True, out_dir=Path({root!r}) / "out", verbose=False)
# one file per rank: two processes printing to the same pipe can interleave their lines
(root / "result.txt").write_text(f"rank={{info.rank}} images={{m['num_images']}} ap={{m['segm']['AP']:.3f}}")
dist.cleanup(info)
"""


@pytest.mark.slow
def test_evaluate_model_gathers_across_two_ranks(tmp_path):
    """2 gloo processes each score a shard; rank 0 sees all 3 images and every rank gets the metrics."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(_DIST_SCRIPT.format(tests=str(Path(__file__).parent), root=str(tmp_path)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [(tmp_path / f"r{r}" / "result.txt").read_text() for r in (0, 1)]
    assert results == ["rank=0 images=3 ap=1.000", "rank=1 images=3 ap=1.000"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["num_images"] == 3
