"""CocoDataset and the COCO scanner on real (coco128) and tiny synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from comask.data.coco import CocoDataset, load_coco_json
from comask.data.transforms import rasterize
from comask.errors import DataError


def test_coco128_every_instance_matches_pycocotools(coco128) -> None:
    coco = COCO(str(coco128.ann))
    n = crowd = 0
    for ann in coco.dataset["annotations"]:
        im = coco.imgs[ann["image_id"]]
        ours = rasterize([ann["segmentation"]], (im["height"], im["width"]))[0].numpy()
        ref = coco.annToMask(ann)
        assert ours.shape == ref.shape
        assert np.array_equal(ours, ref), f"annotation {ann['id']} differs"
        n += 1
        crowd += ann["iscrowd"]
    assert (n, crowd) == (939, 10)


def test_coco128_dataset_eval_targets(coco128) -> None:
    ds = CocoDataset(coco128.ann, coco128.images, train=False)
    assert len(ds) == 128 and not ds.skipped
    assert len(ds.cat_ids) == 80 and ds.cat_ids == sorted(ds.cat_ids) and ds.class_names[0] == "person"
    coco = COCO(str(coco128.ann))
    i = ds.image_ids.index(9)
    image, t = ds[i]
    assert image.dtype == torch.float32 and image.shape == (3, 480, 640)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    anns = [a for a in coco.imgToAnns[9] if not a["iscrowd"]]
    assert t["masks"].shape == (len(anns), 480, 640) and t["orig_size"] == (480, 640) and t["image_id"] == 9
    for k, a in enumerate(anns):
        assert np.array_equal(t["masks"][k].numpy(), coco.annToMask(a))
        assert ds.cat_ids[int(t["labels"][k]) - 1] == a["category_id"]
        x, y, w, h = a["bbox"]
        assert torch.allclose(t["boxes"][k], torch.tensor([x, y, x + w, y + h]))


def test_category_mapping_non_contiguous(tiny_coco) -> None:
    ds = CocoDataset(tiny_coco.ann, tiny_coco.images, train=False)
    assert ds.cat_ids == [3, 7, 12]
    assert ds.class_names == ["triangle", "blob", "square"]
    _, t = ds[ds.image_ids.index(1)]
    # annotation 10 is category 7 -> label 2, annotation 11 is category 12 -> label 3
    assert t["labels"].tolist() == [2, 3]


def test_polygon_and_rle_masks_and_box_layout(tiny_coco) -> None:
    ds = CocoDataset(tiny_coco.ann, tiny_coco.images, train=False)
    _, t = ds[ds.image_ids.index(1)]
    m = t["masks"]
    assert m.dtype == torch.uint8 and m.shape == (2, 48, 64)
    ys, xs = np.nonzero(m[1].numpy())
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (30, 43, 40, 59)  # the compressed RLE rectangle
    assert t["boxes"].tolist() == [[5.0, 4.0, 25.0, 20.0], [40.0, 30.0, 60.0, 44.0]]


def test_crowd_excluded_from_targets(tiny_coco) -> None:
    ds = CocoDataset(tiny_coco.ann, tiny_coco.images, train=False)
    _, t = ds[ds.image_ids.index(4)]
    assert t["labels"].tolist() == [3]  # only the polygon (cat 12); the crowd RLE (cat 3) is gone
    # an image whose only annotation is crowd is not used for training
    data = tiny_coco.copy_data()
    data["annotations"] = [a for a in data["annotations"] if a["id"] != 41]
    tiny_coco.write(data)
    assert 4 not in CocoDataset(tiny_coco.ann, tiny_coco.images, train=True).image_ids
    assert 4 in CocoDataset(tiny_coco.ann, tiny_coco.images, train=False).image_ids


def test_empty_images_kept_as_negatives_or_dropped(tiny_coco) -> None:
    keep = CocoDataset(tiny_coco.ann, tiny_coco.images, train=True, min_sizes=(32,), max_size=64)
    assert 3 in keep.image_ids
    _, t = keep[keep.image_ids.index(3)]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["masks"].shape[0] == 0
    assert t["masks"].shape[1:] == (32, 48)
    drop = CocoDataset(tiny_coco.ann, tiny_coco.images, train=True, keep_empty=False)
    assert 3 not in drop.image_ids and len(drop) == len(keep) - 1


def test_train_mode_resizes_boxes_and_masks_together(tiny_coco) -> None:
    torch.manual_seed(0)
    ds = CocoDataset(tiny_coco.ann, tiny_coco.images, train=True, min_sizes=(96,), max_size=1000, flip_prob=0.0)
    img, t = ds[ds.image_ids.index(1)]  # 64x48 -> 128x96
    assert img.shape == (3, 96, 128) and t["masks"].shape == (2, 96, 128)
    assert t["boxes"].tolist() == [[10.0, 8.0, 50.0, 40.0], [80.0, 60.0, 120.0, 88.0]]
    for box, m in zip(t["boxes"], t["masks"]):
        ys, xs = np.nonzero(m.numpy())
        assert abs(xs.min() - box[0]) <= 1 and abs(xs.max() + 1 - box[2]) <= 1
        assert abs(ys.min() - box[1]) <= 1 and abs(ys.max() + 1 - box[3]) <= 1


def test_flip_mirrors_image_boxes_masks(tiny_coco) -> None:
    kw = dict(train=True, min_sizes=(48,), max_size=1000)
    plain = CocoDataset(tiny_coco.ann, tiny_coco.images, flip_prob=0.0, **kw)
    flipped = CocoDataset(tiny_coco.ann, tiny_coco.images, flip_prob=1.0, **kw)
    i = plain.image_ids.index(2)
    a_img, a = plain[i]
    b_img, b = flipped[i]
    w = a_img.shape[-1]
    assert torch.equal(b_img, a_img.flip(-1)) and torch.equal(b["masks"], a["masks"].flip(-1))
    assert torch.allclose(b["boxes"][:, [0, 2]], w - a["boxes"][:, [2, 0]])
    assert torch.equal(b["boxes"][:, [1, 3]], a["boxes"][:, [1, 3]])


def test_photometric_changes_pixels_not_targets(tiny_coco) -> None:
    kw = dict(train=True, min_sizes=(48,), max_size=1000, flip_prob=0.0)
    torch.manual_seed(1)
    a_img, a = CocoDataset(tiny_coco.ann, tiny_coco.images, **kw)[0]
    torch.manual_seed(1)
    b_img, b = CocoDataset(tiny_coco.ann, tiny_coco.images, photometric=True, **kw)[0]
    assert not torch.equal(a_img, b_img) and 0 <= float(b_img.min()) and float(b_img.max()) <= 1
    assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["boxes"], b["boxes"])


def test_grayscale_and_palette_images_load_as_rgb(tiny_coco) -> None:
    Image.open(tiny_coco.image_path(1)).convert("L").save(tiny_coco.image_path(1))
    Image.open(tiny_coco.image_path(3)).convert("P").save(tiny_coco.image_path(3))
    ds = CocoDataset(tiny_coco.ann, tiny_coco.images, train=False)
    for iid in (1, 3):
        img, _ = ds[ds.image_ids.index(iid)]
        assert img.shape[0] == 3


def test_degenerate_annotations_dropped_and_counted(tiny_coco) -> None:
    data = tiny_coco.copy_data()
    a = data["annotations"]
    a[0]["bbox"] = [5.0, 4.0, 0.0, 16.0]  # zero width
    a[2]["segmentation"] = [[8.0, 40.0, 32.0, 40.0]]  # 2 points
    a[4]["segmentation"] = [[30.0, float("nan"), 50.0, 25.0, 50.0, 37.0]]
    tiny_coco.write(data)
    ds = CocoDataset(tiny_coco.ann, tiny_coco.images, train=True, skip_bad=False)  # never fatal
    assert ds.skipped == {"zero_size_box": 1, "degenerate_polygon": 1, "nan_coordinates": 1}
    assert {w for w, _ in ds.skipped_items} == {"annotation 10 (image 1)", "annotation 20 (image 2)",
                                                "annotation 41 (image 4)"}
    _, t = ds[ds.image_ids.index(1)]
    assert t["labels"].tolist() == [3]


def test_skip_bad_counts_and_continues(tiny_coco) -> None:
    data = tiny_coco.copy_data()
    data["annotations"].append({"id": 99, "image_id": 777, "category_id": 3, "iscrowd": 0,
                                "bbox": [1, 1, 2, 2], "segmentation": [[1, 1, 3, 1, 3, 3]]})
    data["annotations"].append({"id": 98, "image_id": 1, "category_id": 5, "iscrowd": 0,
                                "bbox": [1, 1, 2, 2], "segmentation": [[1, 1, 3, 1, 3, 3]]})
    tiny_coco.write(data)
    tiny_coco.image_path(3).unlink()
    jpeg = tiny_coco.image_path(2).read_bytes()
    tiny_coco.image_path(2).write_bytes(jpeg[: len(jpeg) * 2 // 3])  # truncated JPEG
    with pytest.raises(DataError) as ei:
        CocoDataset(tiny_coco.ann, tiny_coco.images, train=True)
    msg = str(ei.value)
    assert "comask data check" in msg and "data.skip_bad=true" in msg and "\n" not in msg
    ds = CocoDataset(tiny_coco.ann, tiny_coco.images, train=True, skip_bad=True, min_sizes=(32,), max_size=64)
    assert ds.skipped == {"missing_file": 1, "truncated_image": 1, "unknown_image": 1, "unknown_category": 1}
    assert sorted(ds.image_ids) == [1, 4]
    assert any("c.png" in w for w, _ in ds.skipped_items)
    for i in range(len(ds)):
        img, t = ds[i]
        assert img.shape[0] == 3 and len(t["labels"]) >= 1


def test_bad_file_found_only_when_reading_is_skipped_lazily(tiny_coco) -> None:
    tiny_coco.image_path(1).write_text("not an image")
    ds = CocoDataset(tiny_coco.ann, tiny_coco.images, train=False, skip_bad=True, check_files=False)
    assert len(ds) == 4
    img, t = ds[ds.image_ids.index(1)]
    assert img is None and t["image_id"] == 1 and t["skipped"] == "not_an_image"  # evaluation: no stand-in
    assert ds.skipped == {"not_an_image": 1}
    train_ds = CocoDataset(tiny_coco.ann, tiny_coco.images, train=True, skip_bad=True, check_files=False)
    _, t = train_ds[train_ds.image_ids.index(1)]
    assert t["image_id"] == 2  # training: the next readable image stands in
    strict = CocoDataset(tiny_coco.ann, tiny_coco.images, train=False, check_files=False)
    with pytest.raises(DataError, match=r"image 1 \(a.png\).*skip_bad"):
        strict[strict.image_ids.index(1)]


def test_stored_size_mismatch(tiny_coco) -> None:
    data = tiny_coco.copy_data()
    data["images"][0]["width"] = 100
    tiny_coco.write(data)
    with pytest.raises(DataError, match="image 1 .*stored size 100x48 but the file is 64x48"):
        CocoDataset(tiny_coco.ann, tiny_coco.images, train=True)
    ds = CocoDataset(tiny_coco.ann, tiny_coco.images, train=True, skip_bad=True)
    assert ds.skipped == {"size_mismatch": 1} and 1 not in ds.image_ids


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "top level must be a JSON object"),
        (json.dumps({"images": [], "annotations": []}), "missing key(s) categories"),
        (json.dumps({"images": {}, "annotations": [], "categories": []}), "'images' must be a list"),
    ],
)
def test_json_validation_errors(tmp_path, content: str, needle: str) -> None:
    p = tmp_path / "ann.json"
    p.write_text(content)
    with pytest.raises(DataError) as ei:
        load_coco_json(p)
    assert needle in str(ei.value) and str(p) in str(ei.value)
    with pytest.raises(DataError):
        CocoDataset(p, tmp_path, train=True)


def test_wrong_entry_types_are_named(tiny_coco) -> None:
    data = tiny_coco.copy_data()
    data["images"][1]["width"] = "forty"
    tiny_coco.write(data)
    with pytest.raises(DataError, match=r"images\[1\].*width"):
        CocoDataset(tiny_coco.ann, tiny_coco.images, train=True)
    ds = CocoDataset(tiny_coco.ann, tiny_coco.images, train=True, skip_bad=True)
    assert ds.skipped == {"bad_image_entry": 1} and 2 not in ds.image_ids


def test_records_survive_pickling_for_workers(tiny_coco) -> None:
    import pickle

    ds = CocoDataset(tiny_coco.ann, tiny_coco.images, train=False)
    ds2 = pickle.loads(pickle.dumps(ds))
    a, b = ds[0], ds2[0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["masks"], b[1]["masks"])
    assert ds.aspect_groups() == [0, 1, 0, 0]
