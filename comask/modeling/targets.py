"""Training targets of CoMask's RoI stage (docs/DESIGN.md, "Model").

- Classification: proposals (+ the ground-truth boxes) matched to ground truth by IoU and sampled
  with torchvision's `Matcher` / `BalancedPositiveNegativeSampler`; label 0 = background.
- Collaborative head: the sampled positives, at most `max_pos` per image, each jittered by up to
  +-`jitter` of its width/height per side; offset targets on the 7x7 grid of the jittered box; 28x28
  mask targets by RoIAlign of the matched ground-truth mask onto the jittered box, thresholded at 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher
from torchvision.ops import box_iou, roi_align

from comask.modeling.voting import clamp_boxes, encode_offsets


@dataclass
class ClsTargets:
    proposals: list[Tensor]  # per image (K_i, 4): the sampled RoIs
    labels: Tensor  # (sum K_i,) int64 in 0..C
    matched_gt: list[Tensor]  # per image (K_i,) index of the matched ground truth (0 where none)


@dataclass
class CollabTargets:
    rois: list[Tensor]  # per image (P_i, 4): jittered positive boxes
    labels: Tensor  # (sum P_i,) int64 in 1..C
    offsets: Tensor  # (sum P_i, 4, 7, 7)
    masks: Tensor  # (sum P_i, 1, 28, 28) binary (0./1.) targets


def sample_proposals(
    proposals: list[Tensor],
    targets: list[dict[str, Tensor]],
    matcher: Matcher,
    sampler: BalancedPositiveNegativeSampler,
) -> ClsTargets:
    """Match proposals (with the ground-truth boxes appended) to ground truth and sample them."""
    labels_per_image, matched_per_image = [], []
    for props, tgt in zip(proposals, targets):
        gt_boxes, gt_labels = tgt["boxes"], tgt["labels"]
        if gt_boxes.numel() == 0:
            matched = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
            labels = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
        else:
            m = matcher(box_iou(gt_boxes, props))
            matched = m.clamp(min=0)
            labels = gt_labels[matched].to(torch.int64)
            labels[m == Matcher.BELOW_LOW_THRESHOLD] = 0
            labels[m == Matcher.BETWEEN_THRESHOLDS] = -1  # ignored by the sampler
        labels_per_image.append(labels)
        matched_per_image.append(matched)
    pos_masks, neg_masks = sampler(labels_per_image)
    out_props, out_labels, out_matched = [], [], []
    for props, labels, matched, pos, neg in zip(
        proposals, labels_per_image, matched_per_image, pos_masks, neg_masks
    ):
        keep = torch.where(pos | neg)[0]
        out_props.append(props[keep])
        out_labels.append(labels[keep])
        out_matched.append(matched[keep])
    return ClsTargets(out_props, torch.cat(out_labels), out_matched)


def add_gt_proposals(proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> list[Tensor]:
    return [torch.cat([p, t["boxes"].to(p.dtype)]) for p, t in zip(proposals, targets)]


def jitter_boxes(boxes: Tensor, amplitude: float, image_hw: tuple[int, int]) -> Tensor:
    """Move each side by U(-amplitude, amplitude) x the box's width/height; clip to the image."""
    if amplitude <= 0 or boxes.numel() == 0:
        jittered = boxes
    else:
        wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
        noise = (torch.rand_like(boxes) * 2 - 1) * amplitude
        jittered = boxes + noise * wh
    hw = torch.tensor(image_hw, device=boxes.device).expand(boxes.shape[0], 2)
    return clamp_boxes(jittered, hw)


def mask_targets(gt_masks: Tensor, gt_index: Tensor, rois: Tensor, size: int = 28) -> Tensor:
    """Matched ground-truth masks resampled onto `rois` -> (P, 1, size, size) of 0. / 1.

    RoIAlign (aligned, like the features) then a 0.5 threshold, as the authors' mmdetection lineage does:
    bilinear sampling alone would blur every object's border into the target.
    """
    if rois.shape[0] == 0:
        return rois.new_zeros((0, 1, size, size))
    # Only the masks that are matched get converted to float, which matters for crowded full-size images.
    used, inverse = torch.unique(gt_index, return_inverse=True)
    masks = gt_masks[used][:, None].to(rois.dtype)
    boxes = torch.cat([inverse[:, None].to(rois.dtype), rois], dim=1)
    soft = roi_align(masks, boxes, (size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return (soft >= 0.5).to(rois.dtype)


def collab_targets(
    cls_targets: ClsTargets,
    targets: list[dict[str, Tensor]],
    image_shapes: list[tuple[int, int]],
    jitter: float,
    max_pos: int,
    grid: int = 7,
    mask_size: int = 28,
) -> CollabTargets:
    """Targets of the collaborative head from the sampled positives of `cls_targets`."""
    labels_flat = cls_targets.labels.split([p.shape[0] for p in cls_targets.proposals])
    rois, labels, offsets, masks = [], [], [], []
    for props, lab, matched, tgt, hw in zip(
        cls_targets.proposals, labels_flat, cls_targets.matched_gt, targets, image_shapes
    ):
        pos = torch.where(lab > 0)[0]
        if pos.numel() > max_pos:
            pos = pos[torch.randperm(pos.numel(), device=pos.device)[:max_pos]]
        gt_idx = matched[pos]
        boxes = jitter_boxes(props[pos], jitter, hw)
        gt_boxes = tgt["boxes"][gt_idx].to(boxes.dtype)
        rois.append(boxes)
        labels.append(lab[pos])
        offsets.append(encode_offsets(boxes, gt_boxes, grid))
        masks.append(mask_targets(tgt["masks"], gt_idx, boxes, mask_size))
    return CollabTargets(rois, torch.cat(labels), torch.cat(offsets), torch.cat(masks))
