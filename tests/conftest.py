"""Shared test fixtures.

- `coco128`: paths of the real COCO subset in ../shared/data/coco128 (read in place, never copied).
- `tiny_config(kind="comask", branches=2, *overrides)`: the R50 COCO config of either model shrunk to a
  ResNet-18 body with small heads (seconds per CPU step), for the model and export tests.
- `make_tiny_coco(root)`: writes a tiny COCO data set (4 images, polygons, compressed and uncompressed
  RLE, a crowd region, an empty image, non-contiguous category ids) and returns a `TinyCoco`;
  `tiny_coco` is the same under tmp_path. Tests mutate `tc.data` and call `tc.write()`.
"""

from __future__ import annotations

import copy
import faulthandler
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# No test may reach the network: `torchvision:` weight names resolve only from torch.hub's cache, here an empty
# private folder (tests that need a file put a generated one there). Set before any test runs, so subprocesses
# (the CLI tests) inherit it.
os.environ["COMASK_OFFLINE"] = "1"
if "COMASK_TEST_TORCH_HOME" not in os.environ:
    import tempfile

    os.environ["COMASK_TEST_TORCH_HOME"] = tempfile.mkdtemp(prefix="comask-torch-home-")
os.environ["TORCH_HOME"] = os.environ["COMASK_TEST_TORCH_HOME"]


def pytest_configure(config: pytest.Config) -> None:
    # On a crash, print only the crashing thread's stack (pytest's own handler, switched off in pyproject,
    # prints every thread, and the CI log's tail held idle server threads instead of the frames that matter).
    # A copy of the real stderr: pytest points fd 2 at its capture file while a test runs.
    faulthandler.enable(file=os.dup(sys.stderr.fileno()), all_threads=False)
    # pycocotools' decode triggers a numpy-2 DeprecationWarning on every call; it says nothing about our code
    config.addinivalue_line(
        "filterwarnings", "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    )


def pytest_runtest_logstart(nodeid: str, location: tuple) -> None:
    # The Makefile prints this file when pytest dies from a signal, which leaves no summary behind.
    Path(".pytest-running").write_text(nodeid + "\n")


TINY_MODEL = [
    "model.backbone.weights=null", "model.backbone.depth=18", "model.backbone.norm=bn",
    "model.backbone.frozen_stages=0", "model.fpn.channels=32", "model.rpn.anchor_sizes=[8,16,32,64,128]",
    "model.rpn.pre_nms_top_n_train=200", "model.rpn.post_nms_top_n_train=100",
    "model.rpn.pre_nms_top_n_test=100", "model.rpn.post_nms_top_n_test=50",
    "model.roi.batch_size_per_image=64", "model.box_head.fc_dim=64", "model.collab_head.conv_dim=16",
    "model.collab_head.max_pos_per_image=16", "model.mask_head.conv_dim=16", "model.test.detections_per_img=20",
]


def _tiny_config(kind: str = "comask", branches: int = 2, *overrides: str):
    from comask.config import load_config

    name = "comask_r50_mfpn_2x_coco" if kind == "comask" else "maskrcnn_r50_fpn_2x_coco"
    return load_config(name, [*TINY_MODEL, f"model.msfem.branches={branches}", "model.num_classes=3",
                              "input.min_size_test=96", "input.max_size_test=128", *overrides])


@pytest.fixture(scope="session")
def tiny_config():
    return _tiny_config


@dataclass
class Coco128:
    ann: Path
    images: Path


@pytest.fixture(scope="session")
def coco128() -> Coco128:
    root = SHARED / "data" / "coco128"
    assert (root / "annotations.json").is_file(), f"real test data missing: {root} (see ../shared/data/README.md)"
    return Coco128(ann=root / "annotations.json", images=root / "images")


@dataclass
class TinyCoco:
    root: Path
    ann: Path
    images: Path
    data: dict

    def write(self, data: dict | None = None) -> Path:
        """Write `data` (default: the current `self.data`) to the annotation file."""
        if data is not None:
            self.data = data
        self.ann.write_text(json.dumps(self.data))
        return self.ann

    def copy_data(self) -> dict:
        return copy.deepcopy(self.data)

    def image_path(self, image_id: int) -> Path:
        fn = next(im["file_name"] for im in self.data["images"] if im["id"] == image_id)
        return self.images / fn


# (id, file_name, width, height)
TINY_IMAGES = [(1, "a.png", 64, 48), (2, "b.jpg", 40, 56), (3, "c.png", 48, 32), (4, "d.png", 60, 44)]
TINY_CATEGORIES = [{"id": 12, "name": "square"}, {"id": 3, "name": "triangle"}, {"id": 7, "name": "blob"}]


def make_tiny_coco(root: Path) -> TinyCoco:
    """Image 1: polygon (cat 7) + compressed RLE (cat 12); image 2 (portrait JPEG): triangle (cat 3);
    image 3: no annotations; image 4: crowd uncompressed RLE (cat 3) + polygon (cat 12)."""
    root = Path(root)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for iid, fn, w, h in TINY_IMAGES:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img_dir / fn)
        images.append({"id": iid, "file_name": fn, "width": w, "height": h})

    def rle_of(mask: np.ndarray) -> dict:
        r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": list(r["size"]), "counts": r["counts"].decode("ascii")}

    def uncompressed(mask: np.ndarray) -> dict:
        flat = mask.astype(np.uint8).flatten(order="F")
        counts, cur, run = [], 0, 0
        for v in flat:
            if v != cur:
                counts.append(run)
                cur, run = v, 0
            run += 1
        counts.append(run)
        return {"size": list(mask.shape), "counts": [int(c) for c in counts]}

    m1 = np.zeros((48, 64), np.uint8)
    m1[30:44, 40:60] = 1
    crowd = np.zeros((44, 60), np.uint8)
    crowd[2:20, 5:30] = 1
    anns = [
        {"id": 10, "image_id": 1, "category_id": 7, "iscrowd": 0, "bbox": [5.0, 4.0, 20.0, 16.0],
         "area": 200.0, "segmentation": [[5.0, 4.0, 25.0, 4.0, 25.0, 20.0, 5.0, 20.0]]},
        {"id": 11, "image_id": 1, "category_id": 12, "iscrowd": 0, "bbox": [40.0, 30.0, 20.0, 14.0],
         "area": 280.0, "segmentation": rle_of(m1)},
        {"id": 20, "image_id": 2, "category_id": 3, "iscrowd": 0, "bbox": [8.0, 10.0, 24.0, 30.0],
         "area": 360.0, "segmentation": [[8.0, 40.0, 32.0, 40.0, 20.0, 10.0]]},
        {"id": 40, "image_id": 4, "category_id": 3, "iscrowd": 1, "bbox": [5.0, 2.0, 25.0, 18.0],
         "area": 450.0, "segmentation": uncompressed(crowd)},
        {"id": 41, "image_id": 4, "category_id": 12, "iscrowd": 0, "bbox": [30.0, 25.0, 20.0, 12.0],
         "area": 240.0, "segmentation": [[30.0, 25.0, 50.0, 25.0, 50.0, 37.0, 30.0, 37.0]]},
    ]
    data = {"info": {"description": "tiny"}, "images": images, "annotations": anns,
            "categories": copy.deepcopy(TINY_CATEGORIES)}
    tc = TinyCoco(root=root, ann=root / "annotations.json", images=img_dir, data=data)
    tc.write()
    return tc


@pytest.fixture
def tiny_coco(tmp_path: Path) -> TinyCoco:
    return make_tiny_coco(tmp_path / "tiny")
