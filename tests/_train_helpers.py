"""Shared by the engine tests and their subprocess workers: a tiny data set, config and detector.

The detector is torchvision's Mask R-CNN around a ResNet-18 with a 32-channel FPN, so the engine
is exercised on a model it knows nothing about (the engine must not depend on CoMask).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from comask.config import Config, load_config

NUM_CLASSES = 3


def write_tiny_coco(root: Path, num_train: int = 8, num_val: int = 4, size: int = 64) -> Path:
    """The synthetic generator's images, with only the first NUM_CLASSES categories kept."""
    import json

    from comask.data.synth import write_dataset

    write_dataset(root, num_train=num_train, num_val=num_val, size=size, seed=0, workers=1, verbose=False)
    for split in ("train", "val"):
        p = root / "annotations" / f"{split}.json"
        data = json.loads(p.read_text())
        keep = {c["id"] for c in data["categories"][:NUM_CLASSES]}
        data["categories"] = [c for c in data["categories"] if c["id"] in keep]
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] in keep]
        p.write_text(json.dumps(data))
    return root


def tiny_cfg(data_root: Path, *overrides: str) -> Config:
    base = [
        "model.backbone.weights=null",
        f"data.train={{ann: {data_root}/annotations/train.json, images: {data_root}/train}}",
        f"data.val={{ann: {data_root}/annotations/val.json, images: {data_root}/val}}",
        "data.num_workers=0",
        "data.flip_prob=0.5",
        f"model.num_classes={NUM_CLASSES}",
        "input.min_size_train=[64]",
        "input.max_size_train=64",
        "input.min_size_test=64",
        "input.max_size_test=64",
        "schedule.ims_per_batch=2",
        "schedule.base_batch=2",
        "schedule.base_lr=0.01",
        "schedule.max_iter=6",
        "schedule.steps=[4]",
        "schedule.warmup_iters=2",
        "schedule.warmup_factor=0.1",
        "runtime.threads=1",
        "runtime.log_period=1",
        "runtime.checkpoint_period=3",
        "runtime.keep_last=2",
        "runtime.final_eval=false",
        "runtime.tensorboard=false",
        "runtime.progress=false",
        "runtime.min_free_mb=1",
    ]
    return load_config("maskrcnn_r50_fpn_2x_coco", base + list(overrides))


def tiny_maskrcnn(cfg: Config) -> nn.Module:
    from torchvision.models import resnet18
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    c = 32
    n = int(cfg.model.num_classes) + 1
    body = resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = BackboneWithFPN(
        body, return_layers={"layer1": "0", "layer2": "1", "layer3": "2"}, in_channels_list=[64, 128, 256],
        out_channels=c, extra_blocks=LastLevelMaxPool(),
    )
    # layer4 is not returned, so it is not even built into the backbone: ~2.8M parameters in all.
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,), (64,)), aspect_ratios=((0.5, 1.0, 2.0),) * 4)
    size = int(cfg.input.max_size_train)
    return MaskRCNN(
        backbone, num_classes=None, min_size=size, max_size=size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
        rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=25, rpn_batch_size_per_image=32,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], 7, 2),
        box_head=TwoMLPHead(c * 49, 64), box_predictor=FastRCNNPredictor(64, n),
        box_batch_size_per_image=16, box_detections_per_img=10,
        mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], 14, 2),
        mask_head=MaskRCNNHeads(c, [c, c], 1), mask_predictor=MaskRCNNPredictor(c, c, n),
    )


class NaNAt(nn.Module):
    """Wraps a detector; the `at`-th training forward (1-based) returns a NaN loss_mask."""

    def __init__(self, inner: nn.Module, at: int):
        super().__init__()
        self.inner = inner
        self.at = at
        self.calls = 0

    def forward(self, images, targets=None):
        out = self.inner(images, targets)
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                out = dict(out)
                out["loss_mask"] = self.poison(out["loss_mask"])
        return out

    @staticmethod
    def poison(loss):
        return loss * float("nan")


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class NaNGradAt(NaNAt):
    """The `at`-th training forward returns finite losses whose loss_mask gradient is NaN (an overflow in
    backward, as oneDNN's bf16 convolution produced on one-pixel-wide maps)."""

    @staticmethod
    def poison(loss):
        return _NaNGrad.apply(loss)


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names of tensors that differ (empty = bit-identical)."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]
