"""The sync-free inference path (issue 22) returns what the per-class / per-detection path returned.

The reference below is the test-time path as it was before: per-class NMS through torchvision's
`batched_nms` after a `torch.where` score filter, the FPN pooler's per-level `torch.where`, and
torchvision's `GeneralizedRCNN.forward` with its postprocess (`paste_masks_in_image`, one detection at a
time). It runs on the same model object, patched for the call, so both paths see the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.ops import batched_nms, remove_small_boxes

from comask.config import load_config
from comask.modeling.build import build_model
from comask.modeling.heads import FPNRoIAlign
from comask.modeling.roi_align import roi_align
from comask.modeling.roi_heads import CoMaskRoIHeads

DEMO = "asset:comask_mnv3_shapes_demo.pth"


def _ref_detect(self, features, proposals, image_shapes):
    logits = self.cls_head(self.cls_pooler(features, proposals, image_shapes))
    probs = F.softmax(logits.float(), dim=-1).split([p.shape[0] for p in proposals])
    out_boxes, out_scores, out_labels = [], [], []
    for props, prob in zip(proposals, probs):
        n, c1 = prob.shape
        scores = prob[:, 1:].reshape(-1)
        labels = torch.arange(1, c1, device=prob.device).repeat(n)
        idx = torch.where(scores > self.score_thresh)[0]
        boxes = props[idx // (c1 - 1)]
        scores, labels = scores[idx], labels[idx]
        keep = remove_small_boxes(boxes, 1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        out_boxes.append(boxes[keep])
        out_scores.append(scores[keep])
        out_labels.append(labels[keep])
    return out_boxes, out_scores, out_labels


def _ref_pool(self, features, boxes, image_shapes):
    feats = [features[k] for k in self.featmap_names]
    scales = self._scales(feats, image_shapes)
    all_boxes = torch.cat(boxes, dim=0)
    batch_idx = torch.cat([torch.full((b.shape[0], 1), i, dtype=all_boxes.dtype) for i, b in enumerate(boxes)])
    rois = torch.cat([batch_idx, all_boxes], dim=1)
    k_min, k_max = round(-math.log2(scales[0])), round(-math.log2(scales[-1]))
    wh = ((all_boxes[:, 2] - all_boxes[:, 0]) * (all_boxes[:, 3] - all_boxes[:, 1])).clamp(min=1e-12)
    lvl = torch.floor(self.canonical_level + torch.log2(wh.sqrt() / self.canonical_scale) + 1e-6)
    lvl = lvl.clamp(k_min, k_max).to(torch.int64) - k_min
    pooled, order = [], []
    for i, (feat, scale) in enumerate(zip(feats, scales)):
        idx = torch.where(lvl == i)[0]
        pooled.append(roi_align(feat, rois[idx], self.output_size, scale, self.sampling_ratio, self.aligned))
        order.append(idx)
    out = torch.cat(pooled, dim=0)
    return out[torch.argsort(torch.cat(order))]


@contextmanager
def _reference_path(model: torch.nn.Module) -> Iterator[None]:
    saved = (CoMaskRoIHeads._detect, FPNRoIAlign.forward)
    CoMaskRoIHeads._detect, FPNRoIAlign.forward = _ref_detect, _ref_pool
    try:
        yield
    finally:
        CoMaskRoIHeads._detect, FPNRoIAlign.forward = saved


def _compare(model: torch.nn.Module, images: list[torch.Tensor], min_dets: int = 1) -> None:
    model.eval()
    with torch.inference_mode():
        new = model(images)
        with _reference_path(model):
            ref = GeneralizedRCNN.forward(model, images)
    for a, b in zip(new, ref):
        assert a["boxes"].shape[0] >= min_dets
        assert torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["scores"], b["scores"])
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-4, rtol=0)
        assert a["masks"].shape == b["masks"].shape and a["masks"].dtype == b["masks"].dtype
        torch.testing.assert_close(a["masks"], b["masks"], atol=3e-7, rtol=0)
        assert torch.equal(a["masks"] > 0.5, b["masks"] > 0.5)


def _shapes_images(n: int, size: int = 128, seed: int = 5) -> list[torch.Tensor]:
    from comask.data import synth

    gen = synth.PRESETS["demo"]
    return [torch.from_numpy(synth.render_image(gen, size, seed, "val", i)[0]).permute(2, 0, 1).float() / 255
            for i in range(n)]


def test_demo_checkpoint_same_detections_and_masks() -> None:
    from comask.engine.predict import load_model

    model = load_model(DEMO).model
    images = _shapes_images(3)
    images.append(F.interpolate(images[0][None], size=(150, 211), mode="bilinear")[0])  # resized and non-square
    _compare(model, images)


@pytest.mark.parametrize("config", ["comask_mnv3_mfpn_shapes", "maskrcnn_mnv3_fpn_shapes"])
def test_random_weights_same_detections_and_masks(config: str) -> None:
    # score threshold 0: every (proposal, class) pair is a candidate, more than the top-k the NMS starts with
    cfg = load_config(config, ["model.test.score_thresh=0.0"])
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False)
    images = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    _compare(model, images, min_dets=20)


def test_top_k_grows_until_exact() -> None:
    """Few survivors among the first k pairs (all boxes the same, so NMS keeps one per class): k grows."""
    from comask.modeling.roi_heads import class_nms

    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[10.0, 10.0, 50.0, 60.0]]).repeat(300, 1)
    boxes[250:] += torch.arange(50, dtype=torch.float32)[:, None] * 100  # 50 disjoint boxes, low scores
    scores = torch.rand(300, 7, generator=g)
    scores[250:] *= 0.01
    keep, s = class_nms(boxes, scores, 0.0, 0.5, max_det=100, top_k=10)
    # reference: per-class NMS over every pair
    flat = scores.reshape(-1)
    labels = torch.arange(7).repeat(300)
    ref = batched_nms(boxes.repeat_interleave(7, 0), flat, labels, 0.5)[:100]
    assert torch.equal(keep, ref) and torch.equal(s, flat[ref])
    assert np.all(np.diff(s.numpy()) <= 0)
