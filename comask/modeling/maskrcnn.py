"""Mask R-CNN baseline: the same backbone/FPN/RPN/transform as CoMask, torchvision's RoIHeads."""

from __future__ import annotations

from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads

from comask.modeling.comask import TwoStageDetector
from comask.modeling.heads import FPNRoIAlign


class MaskRCNN(TwoStageDetector):
    """Mask R-CNN (He et al. 2017) in the CoMask harness: comparisons differ only in the RoI heads
    (and the MSFEMs, when the config enables them for both)."""

    model_type = "maskrcnn"


class MaskRCNNRoIHeads(RoIHeads):
    """torchvision's RoIHeads on float32 proposals, as CoMask's RoI stage: under autocast the RPN decodes in
    bfloat16/float16, where a small proposal's width can round to 0 and its regression target to inf
    (measured: loss_box_reg NaN at iteration 15 of the bf16 COCO recipe on the CPU)."""

    def forward(self, features, proposals, image_shapes, targets=None):
        return super().forward(features, [p.float() for p in proposals], image_shapes, targets)


def build_maskrcnn_roi_heads(cfg, in_channels: int) -> RoIHeads:
    """torchvision RoIHeads: 7x7 RoIAlign -> 2 FC -> C+1 classes and box deltas; 14x14 RoIAlign ->
    convs -> deconv -> C+1 class-specific 28x28 masks. Sampling and test knobs from `cfg.model`."""
    m = cfg.model
    num_classes = m.num_classes + 1  # + background
    fc_dim = m.box_head.fc_dim
    conv_dim = m.mask_head.conv_dim
    # CoMask's pooler on P2..P5 with aligned=False computes what torchvision's MultiScaleRoIAlign does (same
    # level rule) and adds the fast CPU backward, so both models train with the same RoIAlign cost
    box_pool = FPNRoIAlign(7, sampling_ratio=2, aligned=False)
    mask_pool = FPNRoIAlign(14, sampling_ratio=2, aligned=False)
    return MaskRCNNRoIHeads(
        box_roi_pool=box_pool,
        box_head=TwoMLPHead(in_channels * 7 * 7, fc_dim),
        box_predictor=FastRCNNPredictor(fc_dim, num_classes),
        fg_iou_thresh=m.roi.fg_iou_thresh,
        bg_iou_thresh=m.roi.bg_iou_thresh,
        batch_size_per_image=m.roi.batch_size_per_image,
        positive_fraction=m.roi.positive_fraction,
        bbox_reg_weights=None,
        score_thresh=m.test.score_thresh,
        nms_thresh=m.test.nms_thresh,
        detections_per_img=m.test.detections_per_img,
        mask_roi_pool=mask_pool,
        mask_head=MaskRCNNHeads(in_channels, [conv_dim] * m.mask_head.num_convs, dilation=1),
        mask_predictor=MaskRCNNPredictor(conv_dim, conv_dim, num_classes),
    )
