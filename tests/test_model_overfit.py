"""The whole pipeline learns: a tiny model overfits four synthetic images to mask AP >= 0.8 on those
images (COCOeval on RLE masks) within a few minutes on 2 CPU cores."""

from __future__ import annotations

import contextlib
import io
import time

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from comask.config import load_config
from comask.modeling import build_model

SIZE = 96
CLASSES = ("square", "disk", "triangle")
# (class index 1..3, x1, y1, extent) per object; objects do not overlap
SCENES = [
    [(1, 8, 10, 30), (2, 50, 44, 36)],
    [(3, 10, 50, 38), (2, 56, 8, 28)],
    [(1, 52, 52, 34), (3, 6, 6, 34), (2, 58, 6, 24)],
    [(2, 14, 20, 40), (1, 62, 60, 26)],
]


def _draw(scene, seed: int) -> tuple[torch.Tensor, dict]:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.uniform(90, 140, (SIZE, SIZE, 3))).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    masks, boxes, labels = [], [], []
    for cls, x, y, s in scene:
        m = Image.new("L", (SIZE, SIZE), 0)
        md = ImageDraw.Draw(m)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if cls == 1:
            shape = [x, y, x + s - 1, y + s - 1]
            md.rectangle(shape, fill=1)
            draw.rectangle(shape, fill=colour)
        elif cls == 2:
            shape = [x, y, x + s - 1, y + s - 1]
            md.ellipse(shape, fill=1)
            draw.ellipse(shape, fill=colour)
        else:
            shape = [(x, y + s - 1), (x + s - 1, y + s - 1), (x + s // 2, y)]
            md.polygon(shape, fill=1)
            draw.polygon(shape, fill=colour)
        mask = np.asarray(m, dtype=np.uint8)
        ys, xs = np.nonzero(mask)
        masks.append(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        labels.append(cls)
    image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks)),
    }
    return image, target


def _rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def mask_ap(images, targets, outputs) -> float:
    gt = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    dt = []
    for i, (img, t, o) in enumerate(zip(images, targets, outputs), start=1):
        gt["images"].append({"id": i, "height": img.shape[1], "width": img.shape[2]})
        for m, lab in zip(t["masks"].numpy(), t["labels"].tolist()):
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "image_id": i, "category_id": lab, "iscrowd": 0,
                "segmentation": _rle(m), "area": float(m.sum()), "bbox": list(mask_utils.toBbox(_rle(m))),
            })
        for m, lab, s in zip(o["masks"][:, 0].numpy() > 0.5, o["labels"].tolist(), o["scores"].tolist()):
            dt.append({"image_id": i, "category_id": lab, "score": s, "segmentation": _rle(m)})
    if not dt:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dt), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def overfit(
    kind: str = "comask", iters: int = 150, seed: int = 0, lr: float = 0.02, clip: float | None = 35.0,
    log: bool = False, extra: tuple[str, ...] = (),
) -> tuple[float, float]:
    torch.manual_seed(seed)
    cfg = load_config(f"{kind}_r50_{'mfpn' if kind == 'comask' else 'fpn'}_2x_coco", [
        "model.backbone.weights=null", "model.backbone.depth=18", "model.backbone.norm=bn",
        "model.backbone.frozen_stages=0", "model.fpn.channels=64", f"model.num_classes={len(CLASSES)}",
        "model.rpn.anchor_sizes=[8,16,32,64,128]",
        "model.rpn.pre_nms_top_n_train=300", "model.rpn.post_nms_top_n_train=150",
        "model.rpn.pre_nms_top_n_test=150", "model.rpn.post_nms_top_n_test=100",
        "model.roi.batch_size_per_image=64", "model.box_head.fc_dim=256",
        "model.collab_head.conv_dim=64", "model.collab_head.num_convs=4", "model.collab_head.max_pos_per_image=32",
        "model.mask_head.conv_dim=64",
        "model.test.detections_per_img=20", f"input.min_size_test={SIZE}", f"input.max_size_test={SIZE}",
        *extra,
    ])
    model = build_model(cfg)
    images, targets = zip(*(_draw(s, i) for i, s in enumerate(SCENES)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    warmup = 20
    step = int(iters * 0.8)  # x0.1 for the last fifth, as the real schedules do, to settle the fit
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, 0.05 + 0.95 * i / warmup) * (0.1 if i >= step else 1.0)
    )
    model.train()
    t0 = time.perf_counter()
    for it in range(iters):
        losses = model(list(images), list(targets))
        loss = sum(losses.values())
        assert torch.isfinite(loss), losses
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            # the authors' recipe (mmdetection D2Det configs) clips at 35: the IoU loss of the dense offsets
            # spikes early in training from scratch
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        if log and it % 5 == 0:
            print(it, f"{time.perf_counter() - t0:.1f}s", {k: round(v.item(), 3) for k, v in losses.items()}, flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        outputs = model(list(images))
    return mask_ap(images, targets, outputs), train_s


@pytest.mark.slow
def test_maskrcnn_overfits_four_images():
    """The shared harness (backbone, FPN, RPN, transform, eval path) learns with the baseline heads."""
    ap, seconds = overfit("maskrcnn", iters=120)
    # measured 0.77-0.79 after 80-120 iterations: 28x28 masks of 24-40 px shapes cap AP at the high IoU
    # thresholds (0.9, 0.95); 0.7 still fails if any stage (RPN, sampling, mask paste, eval) is broken
    assert ap >= 0.7, f"mask AP {ap:.3f} after {seconds:.0f} s of training"


@pytest.mark.slow
def test_comask_overfits_four_images():
    """Issue 3's bar. With the 1x1 skip of the 14x14 RoI features into the mask branch (`mask_skip`, on in the
    CPU configs) seeds 0-3 reach 0.87/0.84/0.89/0.84 after 240 iterations (seed 0: 0.88 with the skip zero-initialised, as
    now); without it 0.78/0.76 (seeds 0/1) (the 28x28 mask was
    decoded from the 7x7 tower alone and learned ~3x slower: final BCE 0.17 vs 0.06). A broken vote, mask
    paste or target encoding stays below 0.3 (session 1 measured 0.0-0.25 for such bugs)."""
    ap, seconds = overfit("comask", iters=240, extra=("model.collab_head.mask_skip=true",))
    assert ap >= 0.8, f"mask AP {ap:.3f} after {seconds:.0f} s of training"


if __name__ == "__main__":
    import sys

    # python tests/test_model_overfit.py [comask|maskrcnn] [iters] [lr] [clip] [config overrides ...]
    kind = sys.argv[1] if len(sys.argv) > 1 else "comask"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 150
    lr = float(sys.argv[3]) if len(sys.argv) > 3 else 0.02
    clip = float(sys.argv[4]) if len(sys.argv) > 4 else 35.0
    print(overfit(kind, n, lr=lr, clip=clip or None, log=True, extra=tuple(sys.argv[5:])))
