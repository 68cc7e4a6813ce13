"""Losses of CoMask's RoI stage (docs/DESIGN.md, "Model").

All losses stay attached to the graph (value 0) when there is nothing to learn from, e.g. a batch of
negative images: DDP without `find_unused_parameters` needs every parameter in every backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-6
_TINY = 1e-30  # float32 log floor: only an empty intersection (a cell outside its box) reaches it


def _inter_union(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    pl, pt, pr, pb = pred.unbind(-1)
    tl, tt, tr, tb = target.unbind(-1)
    iw = (torch.minimum(pl, tl) + torch.minimum(pr, tr)).clamp(min=0)
    ih = (torch.minimum(pt, tt) + torch.minimum(pb, tb)).clamp(min=0)
    inter = iw * ih
    area_p = (pl + pr).clamp(min=0) * (pt + pb).clamp(min=0)
    area_t = (tl + tr).clamp(min=0) * (tt + tb).clamp(min=0)
    return inter, area_p + area_t - inter


def offset_iou(pred: Tensor, target: Tensor) -> Tensor:
    """IoU of the boxes that (l, t, r, b) distances from a common point describe; (..., 4) -> (...).

    Written for general boxes (intersection clipped at 0, target area clipped at 0), so a target whose
    point lies outside its box (negative distances) gives a finite value instead of a negative area.
    """
    inter, union = _inter_union(pred, target)
    return inter / union.clamp(min=_EPS)


def offset_loss(pred: Tensor, target: Tensor, mask_targets: Tensor, thresh: float = 0.5) -> Tensor:
    """-log IoU of the per-cell boxes, averaged over cells where the pooled ground-truth mask > thresh,
    weighted by that pooled value.

    pred, target: (N, 4, S, S) distances in RoI units (IoU does not change under per-axis scaling, so
    RoI units give the same IoU as pixels); mask_targets: (N, 1, M, M) with M a multiple of S.
    """
    grid = pred.shape[-1]
    w = F.adaptive_avg_pool2d(mask_targets.float(), grid).reshape(-1)
    w = w * (w > thresh)
    # float32 even under autocast: the IoU of thin boxes and its log are not safe in half precision
    p = pred.float().permute(0, 2, 3, 1).reshape(-1, 4)
    t = target.float().permute(0, 2, 3, 1).reshape(-1, 4)
    # -log IoU as log(union) - log(inter): clamping the IoU at an epsilon instead gave predictions that had
    # collapsed (IoU < 1e-6) a constant loss and no gradient back; the floor here is far below any real overlap
    inter, union = _inter_union(p, t)
    loss = torch.log(union.clamp(min=_TINY)) - torch.log(inter.clamp(min=_TINY))
    # Per cell, not broadcast per RoI: each cell's loss is multiplied by its own weight.
    return (loss * w).sum() / w.sum().clamp(min=_EPS)


def mask_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Per-pixel BCE of the ground-truth class's mask logits (N, 1, M, M) against soft targets."""
    if logits.numel() == 0:
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over C+1 classes (label 0 = background)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels)
