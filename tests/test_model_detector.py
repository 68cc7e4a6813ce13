"""CoMask and the Mask R-CNN baseline end to end: losses, outputs, gradients, edge cases, configs."""

from __future__ import annotations

import io

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

from comask.config import Config, ConfigError, load_config
from comask.modeling import build_model
from comask.modeling.comask import CoMask
from comask.modeling.maskrcnn import MaskRCNN

NUM_CLASSES = 3
COMASK_LOSSES = {"loss_cls", "loss_offset", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
MASKRCNN_LOSSES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


def _target(h: int, w: int, boxes: list[list[int]], labels: list[int]) -> dict:
    masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        masks[i, y1:y2, x1:x2] = 1
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": masks,
    }


def _batch(sizes=((96, 96), (80, 112))):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    targets = [
        _target(*sizes[0], [[10, 12, 50, 60], [55, 40, 90, 90]], [1, 3]),
        _target(*sizes[1], [[20, 8, 70, 44]], [2]),
    ][: len(sizes)]
    return images, targets


def _check_detections(out: list[dict], images: list[torch.Tensor], max_det: int) -> None:
    assert len(out) == len(images)
    for det, img in zip(out, images):
        h, w = img.shape[-2:]
        n = det["boxes"].shape[0]
        assert set(det) == {"boxes", "labels", "scores", "masks"}
        assert det["boxes"].shape == (n, 4) and det["boxes"].dtype == torch.float32
        assert det["labels"].shape == (n,) and det["labels"].dtype == torch.int64
        assert det["scores"].shape == (n,) and det["scores"].dtype == torch.float32
        assert det["masks"].shape == (n, 1, h, w) and det["masks"].dtype == torch.float32
        assert n <= max_det
        if n:
            b = det["boxes"]
            assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
            assert (b[:, 2:] >= b[:, :2]).all()
            assert ((det["labels"] >= 1) & (det["labels"] <= NUM_CLASSES)).all()
            assert ((det["scores"] >= 0) & (det["scores"] <= 1)).all()
            assert det["masks"].min() >= 0 and det["masks"].max() <= 1


def _train_step(model, images, targets) -> dict:
    model.train()
    losses = model(images, targets)
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    sum(losses.values()).backward()
    return losses


@pytest.mark.parametrize(
    "kind,branches,extra",
    [
        ("comask", 0, ()),
        ("comask", 1, ()),
        ("comask", 2, ("model.collab_head.collaborative=false",)),
        ("comask", 4, ("model.msfem.residual=false",)),
        ("comask", 2, ("model.collab_head.mask_skip=true",)),
        ("maskrcnn", 0, ()),
        ("maskrcnn", 4, ()),
    ],
)
def test_train_and_eval_outputs(kind, branches, extra, tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config(kind, branches, *extra))
    assert isinstance(model, CoMask if kind == "comask" else MaskRCNN)
    images, targets = _batch()  # two sizes in one batch
    losses = _train_step(model, images, targets)
    assert set(losses) == (COMASK_LOSSES if kind == "comask" else MASKRCNN_LOSSES)
    model.eval()
    eval_images = [torch.rand(3, 96, 96), torch.rand(3, 70, 120)]
    with torch.no_grad():
        out = model(eval_images)
    _check_detections(out, eval_images, max_det=20)
    # an untrained model spreads its class probability (~1/(C+1) > 0.05): detections exist
    assert all(len(d["boxes"]) > 0 for d in out)


def test_r50_frozen_bn_tiny_input(tiny_config):
    torch.manual_seed(0)
    cfg = tiny_config("comask", 4, "model.backbone.depth=50", "model.backbone.norm=frozen_bn",
                   "model.backbone.frozen_stages=1", "input.min_size_test=64", "input.max_size_test=64")
    model = build_model(cfg)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("backbone.body.conv1", "backbone.body.layer1")) for n in frozen)
    images, targets = _batch(((64, 64), (64, 64)))
    targets[0] = _target(64, 64, [[4, 6, 40, 50]], [1])
    _train_step(model, images, targets)
    model.eval()
    with torch.no_grad():
        _check_detections(model(images), images, max_det=20)


def _expected_unused_msfem_params(model, image_hw) -> set[str]:
    """Chain convs that never run because their input already is 1x1 (METHOD.md sec. 2)."""
    unused = set()
    h, w = image_hw
    for level, stride in zip(["p2", "p3", "p4", "p5", "p6"], [4, 8, 16, 32, 64]):
        fh, fw = -(-h // stride), -(-w // stride)
        for i, _ in enumerate(model.backbone.msfem[level].down):
            if fh == 1 and fw == 1:
                unused |= {f"backbone.msfem.{level}.down.{i}.{n}"
                           for n, _ in model.backbone.msfem[level].down[i].named_parameters()}
            fh, fw = -(-fh // 2), -(-fw // 2)
    return unused


@pytest.mark.parametrize("kind,branches", [("comask", 4), ("maskrcnn", 0)])
def test_every_trainable_parameter_gets_a_finite_gradient(kind, branches, tiny_config):
    torch.manual_seed(0)
    # after_fpn: the MFPN layout that _expected_unused_msfem_params walks (in_fpn: tests/test_model_msfem.py)
    # mask_skip on: its 1x1 conv must get a gradient too (the CPU configs use it)
    model = build_model(tiny_config(kind, branches, "model.msfem.placement=after_fpn", "model.collab_head.mask_skip=true"))
    if kind == "comask":
        assert model.roi_heads.collab_head.mask_skip is not None
    images, targets = _batch(((128, 128), (128, 128)))
    # the big box matches P6's 128 px anchors, so P6 (and its MSFEM) gets an RPN gradient
    targets[1] = _target(128, 128, [[20, 8, 70, 44], [2, 4, 126, 124]], [2, 1])
    _train_step(model, images, targets)
    unused = _expected_unused_msfem_params(model, (128, 128)) if branches else set()
    if branches == 4:  # at 128 px: P5 4->2->1 stops before its 3rd conv, P6 2->1 before its 2nd
        assert {n.rsplit(".", 3)[0] for n in unused} == {"backbone.msfem.p5.down", "backbone.msfem.p6.down"}
    params = dict(model.named_parameters())
    missing = {n for n, p in params.items() if p.requires_grad and p.grad is None}
    assert missing == unused
    for n, p in params.items():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), n
            assert p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("kind", ["comask", "maskrcnn"])
def test_training_images_without_ground_truth(kind, tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config(kind, 1))
    images, _ = _batch()
    empty = [_target(96, 96, [], []), _target(80, 112, [], [])]
    losses = _train_step(model, images, empty)
    assert losses["loss_objectness"] > 0  # background anchors still train the RPN
    images, targets = _batch()
    targets[1] = _target(80, 112, [], [])  # one empty image beside a normal one
    _train_step(model, images, targets)


@pytest.mark.parametrize("kind", ["comask", "maskrcnn"])
def test_eval_with_zero_detections(kind, tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config(kind, 2, "model.test.score_thresh=1.0")).eval()
    images = [torch.rand(3, 96, 96), torch.rand(3, 64, 100)]
    with torch.no_grad():
        out = model(images)
    _check_detections(out, images, max_det=20)
    assert all(d["boxes"].shape == (0, 4) and d["masks"].shape[0] == 0 for d in out)


def test_model_keeps_no_config_and_state_dict_is_tensors(tiny_config):
    model = build_model(tiny_config("comask", 2, "model.msfem.placement=after_fpn"))
    for mod in model.modules():
        assert not any(isinstance(v, Config) for v in vars(mod).values()), type(mod).__name__
    sd = model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=True)
    fresh = build_model(tiny_config("comask", 2, "model.msfem.placement=after_fpn"))
    fresh.load_state_dict(again)
    assert torch.equal(fresh.backbone.msfem["p3"].fuse.weight, model.backbone.msfem["p3"].fuse.weight)


def test_unknown_model_type(tiny_config):
    cfg = tiny_config("comask", 0)
    cfg.model.type = "yolo"
    with pytest.raises(ConfigError, match="model.type"):
        build_model(cfg)
    cfg = tiny_config("comask", 0, "model.rpn.anchor_sizes=[32,64]")
    with pytest.raises(ConfigError, match="anchor_sizes"):
        build_model(cfg)


def test_baseline_is_torchvision_mask_rcnn_layout():
    """maskrcnn_r50_fpn_2x_coco has torchvision's maskrcnn_resnet50_fpn architecture: same keys and
    shapes (so its COCO checkpoints fit), same RPN/RoI knobs."""
    torch.manual_seed(0)
    # random weights in the layout of torchvision's COCO checkpoints (FrozenBN)
    random_frozen = ["model.backbone.weights=null", "model.backbone.norm=frozen_bn", "model.backbone.frozen_stages=1"]
    ours = build_model(load_config("maskrcnn_r50_fpn_2x_coco", random_frozen))
    ref = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81)
    a, b = ours.state_dict(), ref.state_dict()
    # without backbone weights torchvision builds trainable BN; its COCO checkpoints use frozen BN
    # (no num_batches_tracked), as we do
    b = {k: v for k, v in b.items() if not k.endswith("num_batches_tracked")}
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    assert ours.rpn._pre_nms_top_n == ref.rpn._pre_nms_top_n
    assert ours.rpn._post_nms_top_n == ref.rpn._post_nms_top_n
    assert ours.roi_heads.detections_per_img == ref.roi_heads.detections_per_img == 100
    assert ours.roi_heads.nms_thresh == ref.roi_heads.nms_thresh == 0.5
    assert ours.transform._skip_resize and ours.transform.min_size == (800,)
    comask = build_model(load_config("comask_r50_mfpn_2x_coco", random_frozen))
    # in_fpn (the default): MSFEMs replace the FPN's 3x3 output convs (fpn.layer_blocks), the rest is shared
    shared = [k for k in a if k.startswith(("backbone.body.", "backbone.fpn.inner_blocks.", "rpn."))]
    cs = comask.state_dict()
    assert all(cs[k].shape == a[k].shape for k in shared)
    blocks = comask.backbone.fpn.layer_blocks
    assert len(blocks) == 4 and all(len(b.down) == 3 for b in blocks)


def test_shapes_bench_pair_differs_only_in_method():
    from comask.data.synth import PRESETS

    a = load_config("comask_r18_mfpn_shapes").to_dict()
    b = load_config("maskrcnn_r18_fpn_shapes").to_dict()
    assert a["model"]["num_classes"] == len(PRESETS["shapes-bench"]["classes"])
    assert (a["model"]["type"], b["model"]["type"]) == ("comask", "maskrcnn")
    assert (a["model"]["msfem"]["branches"], b["model"]["msfem"]["branches"]) == (4, 0)
    for cfg in (a, b):
        cfg["model"].pop("type")
        cfg["model"]["msfem"].pop("branches")
        cfg.pop("name")
    assert a == b  # backbone, FPN, RPN, sampling, heads' widths, test knobs, data, schedule, runtime
    assert a["model"]["backbone"] == {
        "name": "resnet", "depth": 18, "norm": "bn", "frozen_stages": 0, "weights": None, "force_frozen_bn": False
    }
    assert a["schedule"]["ims_per_batch"] == 8
