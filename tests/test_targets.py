"""Training targets and losses of the CoMask RoI stage."""

import math

import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher

from comask.modeling.losses import classification_loss, mask_loss, offset_iou, offset_loss
from comask.modeling.targets import (
    add_gt_proposals,
    collab_targets,
    jitter_boxes,
    mask_targets,
    sample_proposals,
)
from comask.modeling.voting import decode_offsets


def _target(h=64, w=64):
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 8:40, 4:36] = 1  # box (4, 8, 36, 40)
    masks[1, 30:60, 30:50] = 1  # box (30, 30, 50, 60)
    return {
        "boxes": torch.tensor([[4.0, 8.0, 36.0, 40.0], [30.0, 30.0, 50.0, 60.0]]),
        "labels": torch.tensor([2, 5]),
        "masks": masks,
    }


def _empty_target(h=64, w=64):
    return {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, h, w, dtype=torch.uint8),
    }


def _random_proposals(n, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * (size - 10)
    return torch.cat([xy, xy + 4 + torch.rand(n, 2, generator=g) * (size - 4 - xy)], 1).clamp(max=size)


def _matcher_sampler(batch=32, frac=0.25):
    return Matcher(0.5, 0.5, False), BalancedPositiveNegativeSampler(batch, frac)


def test_sampling_labels_and_gt_as_proposals():
    torch.manual_seed(0)
    tgt = _target()
    props = add_gt_proposals([_random_proposals(40)], [tgt])
    assert props[0].shape == (42, 4)
    cls_t = sample_proposals(props, [tgt], *_matcher_sampler(batch=16, frac=0.25))
    assert cls_t.labels.dtype == torch.int64
    assert cls_t.proposals[0].shape[0] == cls_t.labels.shape[0] <= 16
    pos = cls_t.labels > 0
    assert 2 <= pos.sum() <= 4  # the two gt boxes are positives; at most 25% of 16
    assert set(cls_t.labels[pos].tolist()) <= {2, 5}
    # every positive overlaps its matched ground truth by >= 0.5, with that box's label
    from torchvision.ops import box_iou

    gt = tgt["boxes"][cls_t.matched_gt[0][pos]]
    ious = box_iou(cls_t.proposals[0][pos], gt).diagonal()
    assert (ious >= 0.5).all()
    assert torch.equal(cls_t.labels[pos], tgt["labels"][cls_t.matched_gt[0][pos]])


def test_zero_gt_image_targets():
    torch.manual_seed(0)
    empty = _empty_target()
    props = add_gt_proposals([_random_proposals(30)], [empty])
    cls_t = sample_proposals(props, [empty], *_matcher_sampler())
    assert cls_t.labels.numel() > 0 and (cls_t.labels == 0).all()
    col_t = collab_targets(cls_t, [empty], [(64, 64)], jitter=0.15, max_pos=8)
    assert col_t.rois[0].shape == (0, 4)
    assert col_t.labels.shape == (0,)
    assert col_t.offsets.shape == (0, 4, 7, 7)
    assert col_t.masks.shape == (0, 1, 28, 28)


def test_mixed_batch_positive_and_empty_image():
    torch.manual_seed(0)
    tgts = [_target(), _empty_target(48, 40)]
    props = add_gt_proposals([_random_proposals(30), _random_proposals(30, 40, seed=1)], tgts)
    cls_t = sample_proposals(props, tgts, *_matcher_sampler())
    col_t = collab_targets(cls_t, tgts, [(64, 64), (48, 40)], jitter=0.15, max_pos=100)
    assert col_t.rois[0].shape[0] >= 2 and col_t.rois[1].shape[0] == 0
    assert col_t.offsets.shape[0] == col_t.masks.shape[0] == col_t.labels.shape[0] == col_t.rois[0].shape[0]


def test_jitter_bounds_and_clipping():
    torch.manual_seed(0)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0]]).repeat(500, 1)
    out = jitter_boxes(boxes, 0.15, (100, 100))
    moved = (out - boxes).abs()
    assert (moved[:, [0, 2]] <= 0.15 * 40 + 1e-5).all() and (moved[:, [1, 3]] <= 0.15 * 20 + 1e-5).all()
    assert moved.max() > 0.1 * 20  # it really moves
    assert not torch.equal(out[0], out[1])
    edge = jitter_boxes(torch.tensor([[0.0, 0.0, 100.0, 100.0]]).repeat(100, 1), 0.15, (100, 100))
    assert edge.min() >= 0 and edge.max() <= 100
    assert torch.equal(jitter_boxes(boxes[:1], 0.0, (100, 100)), boxes[:1])


def test_max_positives_per_image_and_offset_targets():
    torch.manual_seed(0)
    tgt = _target()
    # 20 copies of each ground-truth box are all positives
    props = [tgt["boxes"].repeat(20, 1)]
    cls_t = sample_proposals(props, [tgt], *_matcher_sampler(batch=64, frac=1.0))
    assert (cls_t.labels > 0).sum() == 40
    col_t = collab_targets(cls_t, [tgt], [(64, 64)], jitter=0.0, max_pos=7)
    assert col_t.rois[0].shape[0] == 7
    # without jitter the RoI is its own ground truth box: the offsets decode back to it
    gt_for_roi = col_t.rois[0]
    assert torch.allclose(
        decode_offsets(col_t.rois[0], col_t.offsets), gt_for_roi[:, None].expand(7, 49, 4), atol=1e-4
    )
    # centre cell of the RoI: distances 0.5 to every side
    assert torch.allclose(col_t.offsets[:, :, 3, 3], torch.full((7, 4), 0.5), atol=1e-6)
    # the box is the mask's tight box, so the mask target is all ones
    assert torch.equal(col_t.masks, torch.ones_like(col_t.masks))


def test_mask_targets_roi_align_of_gt_masks():
    tgt = _target()
    # RoI twice as wide as the first object, object in its left half
    rois = torch.tensor([[4.0, 8.0, 68.0, 40.0], [30.0, 30.0, 50.0, 60.0]])
    mt = mask_targets(tgt["masks"], torch.tensor([0, 1]), rois)
    assert mt.shape == (2, 1, 28, 28)
    # 0/1 targets: columns 0-13 cover x in [4, 36), the object, the rest is background
    assert torch.equal(mt[0, 0, :, :14], torch.ones(28, 14)) and torch.equal(
        mt[0, 0, :, 14:], torch.zeros(28, 14)
    )
    assert torch.equal(mt[1], torch.ones(1, 28, 28))
    # only the matched masks are used: the same result when index 1 is matched twice
    mt2 = mask_targets(tgt["masks"], torch.tensor([1, 1]), rois[[1, 1]])
    assert torch.equal(mt2[0], mt[1]) and torch.equal(mt2[1], mt[1])


# ---------------------------------------------------------------- losses


def test_offset_iou_hand_example():
    pred = torch.tensor([1.0, 1.0, 1.0, 1.0])  # 2x2 box around the point
    target = torch.tensor([1.0, 1.0, 2.0, 2.0])  # 3x3 box containing it
    assert math.isclose(offset_iou(pred, target).item(), 4 / 9, rel_tol=1e-6)
    # disjoint boxes: IoU 0, and a target whose point lies outside its box stays finite
    assert offset_iou(torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([-2.0, 0.0, 3.0, 1.0])).item() == 0.0


def test_offset_loss_hand_example_weights_each_cell():
    pred = torch.ones(1, 4, 7, 7)
    target = torch.ones(1, 4, 7, 7) * 3.0  # IoU 4/36 everywhere else, but those cells carry no weight
    target[0, :, 0, 0] = torch.tensor([1.0, 1.0, 2.0, 2.0])  # IoU 4/9
    target[0, :, 1, 1] = 1.0  # IoU 1
    masks = torch.zeros(1, 1, 28, 28)
    masks[0, 0, 0:4, 0:4] = 0.8  # cell (0,0): weight 0.8
    masks[0, 0, 4:8, 4:8] = 1.0  # cell (1,1): weight 1.0
    masks[0, 0, 0:4, 4:8] = 0.4  # cell (0,1): 0.4 <= 0.5, excluded
    loss = offset_loss(pred, target, masks)
    expect = (0.8 * -math.log(4 / 9) + 1.0 * 0.0) / 1.8
    assert math.isclose(loss.item(), expect, rel_tol=1e-5)
    # a second RoI with a different weight changes the result per cell (no per-RoI broadcasting)
    pred2 = torch.cat([pred, pred])
    target2 = torch.cat([target, torch.ones(1, 4, 7, 7) * 2.0])  # IoU 4/16 everywhere
    masks2 = torch.cat([masks, torch.full((1, 1, 28, 28), 0.6)])
    loss2 = offset_loss(pred2, target2, masks2)
    expect2 = (0.8 * -math.log(4 / 9) + 49 * 0.6 * -math.log(4 / 16)) / (1.8 + 49 * 0.6)
    assert math.isclose(loss2.item(), expect2, rel_tol=1e-5)


def test_losses_on_empty_inputs_are_zero_and_attached():
    w = torch.ones(1, requires_grad=True)
    pred = torch.zeros(0, 4, 7, 7) * w
    logits = torch.zeros(0, 1, 28, 28) * w
    lo = offset_loss(pred, torch.zeros(0, 4, 7, 7), torch.zeros(0, 1, 28, 28))
    lm = mask_loss(logits, torch.zeros(0, 1, 28, 28))
    lc = classification_loss(torch.zeros(0, 3) * w, torch.zeros(0, dtype=torch.int64))
    for loss in (lo, lm, lc):
        assert loss.item() == 0.0 and loss.requires_grad
    (lo + lm + lc).backward()
    assert w.grad is not None and w.grad.item() == 0.0


def test_offset_loss_zero_when_no_cell_passes_but_attached():
    pred = torch.ones(2, 4, 7, 7, requires_grad=True)
    loss = offset_loss(pred, torch.full((2, 4, 7, 7), 2.0), torch.full((2, 1, 28, 28), 0.5))
    assert loss.item() == 0.0
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


def test_mask_loss_is_bce_of_soft_targets():
    logits = torch.tensor([0.0, 2.0, -1.0]).reshape(1, 1, 1, 3)
    target = torch.tensor([0.5, 1.0, 0.25]).reshape(1, 1, 1, 3)

    def bce(z, t):
        return -(t * math.log(1 / (1 + math.exp(-z))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-z))))

    expect = (bce(0.0, 0.5) + bce(2.0, 1.0) + bce(-1.0, 0.25)) / 3
    assert math.isclose(mask_loss(logits, target).item(), expect, rel_tol=1e-5)
