"""CoMaskRoIHeads on random FPN features: train / eval contracts, empty cases, gradients, pooling."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import MultiScaleRoIAlign

from comask.config import load_config
from comask.modeling.backbone import gn_groups
from comask.modeling.collab_head import CollaborativeHead
from comask.modeling.heads import FPNRoIAlign
from comask.modeling.roi_heads import CoMaskRoIHeads, build_comask_roi_heads

CH = 16
NUM_CLASSES = 4
SHAPES = [(96, 128), (80, 72)]  # (h, w), padded batch 96 x 128


def _features(batch=2, h=96, w=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(batch, CH, h // s, w // s, generator=g)
        for k, s in zip(["0", "1", "2", "3", "pool"], [4, 8, 16, 32, 64])
    }


def _proposals(shapes=SHAPES, n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in shapes:
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w - 8.0, h - 8.0])
        wh = 4 + torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])
        out.append(torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w, h]))], 1))
    return out


def _targets(shapes=SHAPES):
    out = []
    for i, (h, w) in enumerate(shapes):
        boxes = torch.tensor([[8.0, 10.0, 40.0, 50.0], [30.0, 20.0, 70.0, 60.0]])
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 10:50, 8:40] = 1
        masks[1, 25:60, 30:70] = 1  # not filling its box: the offset and mask losses see a real shape
        out.append({"boxes": boxes, "labels": torch.tensor([1 + i, 3]), "masks": masks})
    return out


def _empty_targets(shapes=SHAPES):
    return [
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, h, w, dtype=torch.uint8),
        }
        for h, w in shapes
    ]


def _heads(**kw):
    args = dict(fc_dim=32, conv_dim=16, num_convs=2, batch_size_per_image=32, max_pos_per_image=8)
    args.update(kw)
    return CoMaskRoIHeads(CH, NUM_CLASSES, **args)


def _with_gt(proposals, targets):
    # positives near the ground truth so the collaborative head trains on something
    return [torch.cat([p, t["boxes"] + 2.0]) for p, t in zip(proposals, targets)]


def test_fpn_roi_align_matches_torchvision_when_not_aligned():
    feats = _features()
    props = _proposals(n=40)
    # include boxes of every FPN level (sqrt(area) from 8 to ~600 px)
    props[0] = torch.cat([props[0], torch.tensor([[0.0, 0.0, 127.0, 95.0], [1.0, 1.0, 9.0, 9.0]])])
    ours = FPNRoIAlign(7, 2, aligned=False)(feats, props, SHAPES)
    ref = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(feats, props, SHAPES)
    assert torch.equal(ours, ref)
    aligned = FPNRoIAlign(7, 2, aligned=True)(feats, props, SHAPES)
    assert aligned.shape == ref.shape and not torch.allclose(aligned, ref)


def test_fpn_roi_align_no_boxes():
    out = FPNRoIAlign(14)(_features(), [torch.zeros(0, 4), torch.zeros(0, 4)], SHAPES)
    assert out.shape == (0, CH, 14, 14)


@pytest.mark.parametrize("mask_skip", [False, True])
def test_class_specific_mask_equals_full_conv(mask_skip):
    torch.manual_seed(0)
    head = CollaborativeHead(CH, NUM_CLASSES, conv_dim=16, num_convs=1, mask_skip=mask_skip)
    torch.nn.init.normal_(head.mask_pred.weight)
    torch.nn.init.normal_(head.mask_pred.bias)
    feat = head.features(torch.randn(6, CH, 14, 14))
    cls = torch.tensor([0, 1, 4, 4, 2, 3])
    full = head.mask_logits(feat)
    assert full.shape == (6, NUM_CLASSES + 1, 28, 28)
    sel = head.mask_logits(feat, cls)
    assert sel.shape == (6, 1, 28, 28)
    assert torch.allclose(sel[:, 0], full[torch.arange(6), cls], atol=1e-4, rtol=1e-4)
    off = head.offsets(feat)
    # distances are exp of a value clamped to [log 1e-3, log 8] RoI units
    assert off.shape == (6, 4, 7, 7) and off.min() >= 1e-3 * (1 - 1e-5) and off.max() <= 8.0 * (1 + 1e-5)
    assert (feat.skip is None) == (not mask_skip)


def test_mask_skip_carries_14x14_detail_to_the_mask():
    """The skip path alone (tower features unchanged) moves the mask most under the 14x14 cells that changed:
    it is wired in at 14x14 and reaches the 28x28 mask through one 2x2 deconv and the 3x3 logits conv."""
    torch.manual_seed(0)
    head = CollaborativeHead(CH, NUM_CLASSES, conv_dim=16, num_convs=1, mask_skip=True).eval()
    torch.nn.init.normal_(head.mask_skip.weight, std=0.3)  # as after training; it starts at zero
    x = torch.randn(1, CH, 14, 14)
    y = x.clone()
    y[:, :, 6:8, 6:8] += 3.0
    cls = torch.tensor([1])
    with torch.no_grad():
        feat = head.features(x)
        base = head.mask_logits(feat, cls)
        skip_only = head.mask_logits(feat._replace(skip=head.mask_skip(y)), cls)
    d = (skip_only - base).abs()[0, 0]
    # GroupNorm's statistics spread a little of the change everywhere; the bulk stays local
    assert d[11:17, 11:17].mean() > 5 * d[:8, :8].mean()


def test_mask_skip_starts_as_methods_head():
    """At initialisation the skip adds nothing: the mask equals the 7x7-tower-only head's, yet the skip's
    weight gets a gradient from the mask loss, so it can grow in."""
    torch.manual_seed(0)
    with_skip = CollaborativeHead(CH, NUM_CLASSES, conv_dim=16, num_convs=1, mask_skip=True)
    without = CollaborativeHead(CH, NUM_CLASSES, conv_dim=16, num_convs=1, mask_skip=False)
    without.load_state_dict({k: v for k, v in with_skip.state_dict().items() if not k.startswith("mask_skip.")})
    x = torch.randn(3, CH, 14, 14)
    cls = torch.tensor([1, 2, 3])
    a = with_skip.mask_logits(with_skip.features(x), cls)
    assert torch.equal(a, without.mask_logits(without.features(x), cls))
    torch.nn.functional.binary_cross_entropy_with_logits(a, (torch.rand_like(a) > 0.5).float()).backward()
    assert with_skip.mask_skip.weight.grad.abs().sum() > 0


def test_gn_groups_divide():
    for c in (8, 16, 40, 42, 64, 96, 128, 256, 7):
        g = gn_groups(c)
        assert c % g == 0 and 1 <= g <= 32
    assert gn_groups(256) == 32 and gn_groups(16) == 4


def test_train_forward_losses_and_gradients():
    torch.manual_seed(0)
    heads = _heads()
    heads.train()
    feats = {k: v.requires_grad_() for k, v in _features().items()}
    tgts = _targets()
    result, losses = heads(feats, _with_gt(_proposals(), tgts), SHAPES, tgts)
    assert result == []
    assert set(losses) == {"loss_cls", "loss_offset", "loss_mask"}
    for v in losses.values():
        assert v.dim() == 0 and torch.isfinite(v) and v.item() > 0
    sum(losses.values()).backward()
    for name, p in heads.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if name == "collab_head.mask_pred.weight":
            # only the classes of the positives (1, 2, 3) get a gradient; background and class 4 do not
            assert p.grad[[1, 2, 3]].abs().sum() > 0 and p.grad[[0, 4]].abs().sum() == 0
        elif name != "collab_head.mask_pred.bias":
            assert p.grad.abs().sum() > 0, name
    # the features get a gradient through both poolers
    assert feats["0"].grad is not None and feats["0"].grad.abs().sum() > 0


def test_train_without_ground_truth():
    torch.manual_seed(0)
    heads = _heads()
    heads.train()
    _, losses = heads(_features(), _proposals(), SHAPES, _empty_targets())
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"] > 0
    assert losses["loss_offset"].item() == 0.0 and losses["loss_mask"].item() == 0.0
    sum(losses.values()).backward()
    # every parameter is still in the graph (DDP without find_unused_parameters)
    for name, p in heads.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_train_mixed_batch_one_image_without_gt():
    torch.manual_seed(0)
    heads = _heads()
    heads.train()
    tgts = [_targets()[0], _empty_targets()[1]]
    _, losses = heads(_features(), _with_gt(_proposals(), tgts), SHAPES, tgts)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_mask"] > 0


def test_train_requires_targets():
    heads = _heads()
    heads.train()
    with pytest.raises(ValueError):
        heads(_features(), _proposals(), SHAPES, None)


def _check_result(r, hw, max_det=100, score_thresh=0.0):
    n = r["boxes"].shape[0]
    assert r["boxes"].shape == (n, 4) and r["boxes"].dtype == torch.float32
    assert r["labels"].shape == (n,) and r["labels"].dtype == torch.int64
    assert r["scores"].shape == (n,) and r["scores"].dtype == torch.float32
    assert r["masks"].shape == (n, 1, 28, 28) and r["masks"].dtype == torch.float32
    assert n <= max_det
    if n:
        b = r["boxes"]
        assert torch.isfinite(b).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert b[:, [0, 1]].min() >= 0 and (b[:, 2] <= hw[1]).all() and (b[:, 3] <= hw[0]).all()
        assert r["masks"].min() >= 0 and r["masks"].max() <= 1
        assert r["labels"].min() >= 1 and r["labels"].max() <= NUM_CLASSES
        assert (r["scores"] > score_thresh).all()
        assert (r["scores"][:-1] >= r["scores"][1:]).all()  # NMS keeps them sorted


@pytest.mark.parametrize("collaborative", [True, False])
def test_eval_forward(collaborative):
    torch.manual_seed(0)
    heads = _heads(collaborative=collaborative, score_thresh=0.05, detections_per_img=25, nms_after_vote=False)
    heads.eval()
    with torch.no_grad():
        results, losses = heads(_features(), _proposals(n=60), SHAPES)
    assert losses == {} and len(results) == 2
    for r, hw in zip(results, SHAPES):
        _check_result(r, hw, max_det=25, score_thresh=0.05)
    assert results[0]["boxes"].shape[0] == 25  # 60 proposals x 4 classes at ~0.2 each: plenty
    heads.nms_after_vote = True
    with torch.no_grad():
        again, _ = heads(_features(), _proposals(n=60), SHAPES)
    for r, r0, hw in zip(again, results, SHAPES):
        _check_result(r, hw, max_det=25, score_thresh=0.05)
        assert 0 < r["boxes"].shape[0] <= r0["boxes"].shape[0]


def test_nms_after_vote_drops_proposals_that_voted_for_the_same_box():
    """Two disjoint proposals (never suppressed by the first NMS) whose votes land on one box: with
    nms_after_vote one detection per class is left, the higher-scored one, and its mask is recomputed on
    the voted box; without, both stay (one would be a false positive at every IoU threshold)."""
    torch.manual_seed(0)
    props = [torch.tensor([[4.0, 4.0, 40.0, 40.0], [60.0, 40.0, 120.0, 90.0]])]
    same = torch.tensor([[20.0, 20.0, 80.0, 70.0]])
    counts = {}
    for after in (False, True):
        heads = _heads(score_thresh=0.0, nms_after_vote=after)
        heads.eval()
        heads._vote = lambda feats, boxes, labels, shapes: [same.expand(b.shape[0], 4).clone() for b in boxes]
        with torch.no_grad():
            (r,), _ = heads(_features(batch=1), props, SHAPES[:1])
            _, (scores,), (labels,) = heads._detect(_features(batch=1), props, SHAPES[:1])
        counts[after] = r["boxes"].shape[0]
        assert r["masks"].shape[0] == r["labels"].shape[0] == r["scores"].shape[0] == counts[after]
        assert (r["boxes"] == same).all()
        if after:
            assert sorted(r["labels"].tolist()) == list(range(1, NUM_CLASSES + 1))
            for lab, sc in zip(r["labels"], r["scores"]):
                assert sc == scores[labels == lab].max()
    assert counts == {False: 2 * NUM_CLASSES, True: NUM_CLASSES}


def test_eval_zero_detections_and_zero_proposals():
    heads = _heads(score_thresh=1.0)  # no softmax score exceeds 1
    heads.eval()
    with torch.no_grad():
        results, _ = heads(_features(), _proposals(), SHAPES)
    for r, hw in zip(results, SHAPES):
        assert r["boxes"].shape == (0, 4) and r["masks"].shape == (0, 1, 28, 28)
        _check_result(r, hw)
    heads.score_thresh = 0.05
    with torch.no_grad():
        results, _ = heads(_features(), [_proposals()[0], torch.zeros(0, 4)], SHAPES)
    assert results[0]["boxes"].shape[0] > 0 and results[1]["boxes"].shape == (0, 4)
    _check_result(results[1], SHAPES[1])


def test_padded_roi_passes_change_no_result():
    # pad_rois (set by the ONNX exporter) adds one dummy RoI per image to the vote and mask passes
    torch.manual_seed(0)
    heads = _heads(score_thresh=0.05).eval()
    props = [_proposals(n=40)[0], torch.zeros(0, 4)]  # the second image has no detection
    with torch.no_grad():
        plain, _ = heads(_features(), props, SHAPES)
        heads.pad_rois = True
        padded, _ = heads(_features(), props, SHAPES)
    assert plain[0]["boxes"].shape[0] > 0 and padded[1]["boxes"].shape == (0, 4)
    for a, b in zip(plain, padded):
        for k in ("boxes", "labels", "scores", "masks"):
            assert a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=1e-5), k


def test_eval_boxes_come_from_the_vote():
    """With every cell predicting (0.5, 0.5, 0.5, 0.5), w/o CL the plain mean of the cell boxes is the RoI
    itself, so the output boxes are the detected proposals; with CL the M_s-weighted mean moves them."""
    torch.manual_seed(0)
    props = _proposals(n=20)
    for collaborative in (False, True):
        heads = _heads(collaborative=collaborative)
        torch.nn.init.zeros_(heads.collab_head.offset_pred.weight)
        # offsets are exp(conv): log(0.5) gives 0.5 on every side
        torch.nn.init.constant_(heads.collab_head.offset_pred.bias, math.log(0.5))
        heads.eval()
        with torch.no_grad():
            results, _ = heads(_features(), props, SHAPES)
        for r, p in zip(results, props):
            d = (r["boxes"][:, None] - p[None]).abs().amax(dim=2).min(dim=1).values
            if not collaborative:
                assert d.max() < 1e-3
            else:
                assert torch.isfinite(r["boxes"]).all() and (d > 1e-3).any()


def test_build_from_config():
    cfg = load_config("comask_r50_mfpn_2x_coco")
    heads = build_comask_roi_heads(cfg, 256)
    assert heads.num_classes == 80
    assert heads.cls_head.fc6.out_features == 1024 and heads.cls_head.cls_score.out_features == 81
    assert heads.collab_head.mask_pred.out_channels == 81
    assert len(heads.collab_head.tower) == 1 + 9
    assert heads.collaborative is True and heads.vote_thresh == 0.5
    assert heads.fg_bg_sampler.batch_size_per_image == 512 and heads.max_pos_per_image == 192
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.05, 0.5, 100)
    assert heads.nms_after_vote is True
    cfg = load_config(
        "comask_r50_mfpn_2x_coco",
        ["model.collab_head.collaborative=false", "model.collab_head.conv_dim=32", "model.num_classes=3"],
    )
    heads = build_comask_roi_heads(cfg, 64)
    assert heads.collaborative is False and heads.collab_head.mask_pred.out_channels == 4
    assert heads.collab_head.offset_pred.in_channels == 32


def test_offset_head_starts_positive():
    head = CollaborativeHead(CH, NUM_CLASSES, conv_dim=16, num_convs=2)
    off = head.offsets(head.features(torch.randn(4, CH, 14, 14)))
    assert (off > 0).all()  # live ReLU gradient from the first step
    assert F.relu(off).equal(off)
