"""Pretrained weights from local files, in the exact layouts of torchvision's checkpoints.

The files are made here from torchvision's own constructors (same keys and shapes as the released
`resnet50-*.pth` and `maskrcnn_resnet50_fpn_coco-*.pth`), so the tests need no download; the released
Mask R-CNN file predates torchvision's Sequential RPN / mask heads, and `legacy_maskrcnn_file` rebuilds
that older key layout too.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torchvision.models import resnet50
from torchvision.models.detection import maskrcnn_resnet50_fpn

from comask.config import load_config
from comask.errors import CheckpointError
from comask.modeling.build import build_model
from comask.modeling.pretrained import (
    init_from_torchvision_maskrcnn,
    load_imagenet_backbone,
    read_state_dict,
    upgrade_legacy_keys,
)

# Everything after the FPN shrunk (the FPN must stay 256 wide to take torchvision's FPN weights).
SMALL_HEADS = [
    "model.backbone.weights=null",  # tests that load ImageNet weights name their file after this list
    "model.rpn.pre_nms_top_n_test=50", "model.rpn.post_nms_top_n_test=20", "model.collab_head.conv_dim=16",
    "model.collab_head.num_convs=1", "model.msfem.branches=1", "model.mask_head.conv_dim=16",
    # after_fpn keeps torchvision's FPN output convs, which these tests follow; the in_fpn default (whose
    # MSFEMs replace them) is tested in tests/test_model_msfem.py
    "model.msfem.placement=after_fpn",
]


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
    torch.manual_seed(1)
    sd = resnet50().state_dict()  # torchvision's ImageNet layout, fc and num_batches_tracked included
    path = tmp_path_factory.mktemp("pre") / "resnet50.pth"
    torch.save(sd, path)
    return path, sd


@pytest.fixture(scope="module")
def maskrcnn_file(tmp_path_factory):
    torch.manual_seed(2)
    sd = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    path = tmp_path_factory.mktemp("pre") / "maskrcnn_resnet50_fpn.pth"
    torch.save(sd, path)
    return path, sd


def legacy_layout(sd: dict) -> dict:
    """The released COCO file's layout: FrozenBatchNorm (no step counters), `rpn.head.conv.*`,
    `roi_heads.mask_head.mask_fcnK.*`."""
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for i in range(4):
            k = k.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
        out[k] = v
    return out


def test_imagenet_resnet50_lands_in_the_backbone(imagenet_file, caplog):
    path, src = imagenet_file
    cfg = load_config("comask_r50_mfpn_2x_coco", [*SMALL_HEADS, f"model.backbone.weights={path}",
                                                   "model.fpn.channels=32", "model.num_classes=3"])
    with caplog.at_level(logging.INFO, logger="comask.pretrained"):
        model = build_model(cfg)
    own = model.state_dict()
    for name in ("conv1.weight", "bn1.running_var", "layer1.0.bn1.weight", "layer3.4.conv2.weight",
                 "layer4.2.bn3.running_mean", "layer4.0.downsample.0.weight"):
        assert torch.equal(own[f"backbone.body.{name}"], src[name]), name
    assert not torch.equal(own["backbone.fpn.inner_blocks.0.0.weight"][:, :1], torch.zeros(32, 1, 1, 1))
    report = load_imagenet_backbone(model, path)
    n_body = sum(1 for k in model.backbone.body.state_dict() if "num_batches_tracked" not in k)
    assert len(report.loaded) == n_body and report.missing == [] and report.unexpected == []
    assert any("model.backbone.weights" in r.message and "loaded 265 tensors" in r.message for r in caplog.records)


def test_imagenet_file_of_another_depth_is_refused(imagenet_file):
    path, _ = imagenet_file
    cfg = load_config("comask_r50_mfpn_2x_coco", [
        *SMALL_HEADS, f"model.backbone.weights={path}", "model.backbone.depth=18", "model.backbone.norm=bn",
        "model.fpn.channels=16", "model.num_classes=3"])
    with pytest.raises(CheckpointError, match="model.backbone.weights.*depth"):
        build_model(cfg)


def test_init_from_maskrcnn_fills_backbone_fpn_rpn_and_classifier(maskrcnn_file, caplog):
    path, src = maskrcnn_file
    # 90 classes + background = torchvision's 91 COCO outputs, so the class-score layer fits too
    cfg = load_config("comask_r50_mfpn_2x_coco", [f"model.init_from={path}", "model.num_classes=90", *SMALL_HEADS])
    with caplog.at_level(logging.INFO, logger="comask.pretrained"):
        model = build_model(cfg)
    own = model.state_dict()
    same = {
        "backbone.body.layer2.1.conv1.weight": "backbone.body.layer2.1.conv1.weight",
        "backbone.body.bn1.running_mean": "backbone.body.bn1.running_mean",
        "backbone.fpn.inner_blocks.3.0.weight": "backbone.fpn.inner_blocks.3.0.weight",
        "backbone.fpn.layer_blocks.0.0.bias": "backbone.fpn.layer_blocks.0.0.bias",
        "rpn.head.conv.0.0.weight": "rpn.head.conv.0.0.weight",
        "rpn.head.bbox_pred.weight": "rpn.head.bbox_pred.weight",
        "roi_heads.cls_head.fc6.weight": "roi_heads.box_head.fc6.weight",
        "roi_heads.cls_head.fc7.bias": "roi_heads.box_head.fc7.bias",
        "roi_heads.cls_head.cls_score.weight": "roi_heads.box_predictor.cls_score.weight",
    }
    for ours, theirs in same.items():
        assert torch.equal(own[ours], src[theirs]), ours
    report = init_from_torchvision_maskrcnn(model, path)
    assert report.shape_mismatch == []
    # No counterpart in CoMask: box regression and the Mask R-CNN mask branch are reported as unused ...
    assert "roi_heads.box_predictor.bbox_pred.weight" in report.unexpected
    assert "roi_heads.mask_head.0.0.weight" in report.unexpected
    assert not any(k.startswith(("backbone.", "rpn.")) for k in report.unexpected)
    # ... and the MSFEMs and the collaborative head keep their initialisation.
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in report.missing} == {"backbone.msfem", "roi_heads.collab_head"}
    assert any("model.init_from" in r.message for r in caplog.records)


def test_init_from_reports_a_class_count_mismatch(maskrcnn_file, caplog):
    path, src = maskrcnn_file
    cfg = load_config("comask_r50_mfpn_2x_coco", [f"model.init_from={path}", "model.num_classes=3", *SMALL_HEADS])
    with caplog.at_level(logging.WARNING, logger="comask.pretrained"):
        model = build_model(cfg)
    report = init_from_torchvision_maskrcnn(model, path)
    assert sorted(report.shape_mismatch) == [
        "roi_heads.cls_head.cls_score.bias: file (91,) vs model (4,)",
        "roi_heads.cls_head.cls_score.weight: file (91, 1024) vs model (4, 1024)",
    ]
    assert "roi_heads.cls_head.cls_score.weight" in report.missing
    assert torch.equal(model.state_dict()["roi_heads.cls_head.fc7.weight"], src["roi_heads.box_head.fc7.weight"])
    assert any("shape" in r.message and "cls_score" in r.message for r in caplog.records)


def test_legacy_released_layout_loads_into_the_maskrcnn_baseline(maskrcnn_file, tmp_path):
    _, src = maskrcnn_file
    legacy = legacy_layout(src)
    assert "rpn.head.conv.weight" in legacy and "roi_heads.mask_head.mask_fcn4.bias" in legacy
    path = tmp_path / "legacy.pth"
    torch.save({"model": legacy, "epoch": 26}, path)  # torchvision's reference scripts nest it under 'model'
    assert upgrade_legacy_keys(legacy).keys() == {k for k in src if "num_batches_tracked" not in k}
    cfg = load_config("maskrcnn_r50_fpn_2x_coco", [f"model.init_from={path}", "model.num_classes=90", *SMALL_HEADS,
                                                   "model.mask_head.conv_dim=256", "model.msfem.branches=0"])
    model = build_model(cfg)
    own = model.state_dict()
    for name in ("rpn.head.conv.0.0.weight", "roi_heads.mask_head.0.0.weight", "roi_heads.mask_head.3.0.bias",
                 "roi_heads.mask_predictor.mask_fcn_logits.weight", "roi_heads.box_predictor.bbox_pred.weight"):
        assert torch.equal(own[name], src[name]), name
    report = init_from_torchvision_maskrcnn(model, path)
    assert report.unexpected == [] and report.shape_mismatch == [] and report.missing == []


def test_unusable_files_are_clear_errors(tmp_path):
    cfg = load_config("comask_r50_mfpn_2x_coco", ["model.backbone.depth=18", "model.backbone.norm=bn",
                                                   "model.fpn.channels=16", "model.num_classes=3", *SMALL_HEADS])
    model = build_model(cfg)
    with pytest.raises(CheckpointError, match="model.init_from: .*not found"):
        init_from_torchvision_maskrcnn(model, tmp_path / "nope.pth")
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="no tensor of .* fits this model"):
        init_from_torchvision_maskrcnn(model, other)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="model.init_from: .*junk.pth: "):
        read_state_dict(junk, "model.init_from")


def test_checkpoint_loading_does_not_need_the_pretrained_files(tmp_path):
    cfg = load_config("comask_r50_mfpn_2x_coco", [
        *SMALL_HEADS, f"model.backbone.weights={tmp_path / 'gone.pth'}", f"model.init_from={tmp_path / 'gone2.pth'}",
        "model.backbone.depth=18", "model.backbone.norm=bn", "model.fpn.channels=16", "model.num_classes=3"])
    with pytest.raises(CheckpointError, match="model.backbone.weights"):
        build_model(cfg)
    model = build_model(cfg, pretrained=False)  # the files are not read: the model is the config's
    assert model.backbone.out_channels == 16 and len(model.backbone.body.layer4) == 2  # ResNet-18's stage 5


def test_read_state_dict_takes_assets_and_state_dict_layouts(tmp_path):
    """One reader for every weights path: `asset:NAME` works for model.backbone.weights / model.init_from
    too, and a training script's {'state_dict': ...} layout (mmdetection, Lightning) with a 'module.' prefix."""
    sd = read_state_dict("asset:comask_mnv3_shapes_stage1.pth", "model.init_from")
    assert "backbone.body.0.0.weight" in sd and all(isinstance(v, torch.Tensor) for v in sd.values())
    path = tmp_path / "mmdet_style.pth"
    torch.save({"state_dict": {"module.a.weight": torch.ones(2)}, "meta": {"epoch": 3}}, path)
    assert list(read_state_dict(path, "model.init_from")) == ["a.weight"]
    with pytest.raises(CheckpointError, match="model.backbone.weights: .*comask_nope.pth: checkpoint file not found"):
        read_state_dict("asset:comask_nope.pth", "model.backbone.weights")
