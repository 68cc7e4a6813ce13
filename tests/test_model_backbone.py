"""ResNet-FPN backbone: norms, frozen stages, pyramid strides, local ImageNet weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.ops import FrozenBatchNorm2d

from comask.config import ConfigError
from comask.errors import CheckpointError
from comask.modeling.backbone import (
    build_backbone_fpn,
    build_resnet,
    build_resnet_fpn,
    freeze_stages,
    load_backbone_weights,
)


@pytest.mark.parametrize("norm,cls", [("frozen_bn", FrozenBatchNorm2d), ("bn", nn.BatchNorm2d), ("gn", nn.GroupNorm)])
def test_norm_choice(norm, cls):
    net = build_resnet(18, norm)
    assert isinstance(net.bn1, cls) and isinstance(net.layer4[1].bn2, cls)


def test_unknown_norm_and_depth():
    with pytest.raises(ValueError, match="norm"):
        build_resnet(18, "ln")
    with pytest.raises(ValueError, match="depth"):
        build_resnet(20, "bn")
    with pytest.raises(ValueError, match="frozen_stages"):
        freeze_stages(build_resnet(18, "bn"), 5)


def test_frozen_stages_bn_stays_fixed_in_train_mode():
    torch.manual_seed(0)
    fpn = build_resnet_fpn(18, out_channels=16, norm="bn", frozen_stages=2)
    body = fpn.body
    frozen = [body.conv1, body.bn1, body.layer1, body.layer2]
    for m in frozen:
        assert all(not p.requires_grad for p in m.parameters())
        assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    assert all(p.requires_grad for p in body.layer3.parameters())
    assert isinstance(body.layer3[0].bn1, nn.BatchNorm2d)
    before = body.layer1[0].bn1.running_mean.clone()
    live_before = body.layer3[0].bn1.running_mean.clone()
    fpn.train()(torch.randn(2, 3, 64, 64))
    assert torch.equal(body.layer1[0].bn1.running_mean, before)
    assert not torch.equal(body.layer3[0].bn1.running_mean, live_before)


def test_nothing_frozen_at_zero():
    fpn = build_resnet_fpn(18, out_channels=16, norm="bn", frozen_stages=0)
    assert all(p.requires_grad for p in fpn.parameters())


@pytest.mark.parametrize("depth,c5", [(18, 512), (50, 2048)])
def test_pyramid_strides_and_width(depth, c5):
    fpn = build_resnet_fpn(depth, out_channels=24, norm="frozen_bn", frozen_stages=1).eval()
    assert fpn.out_channels == 24
    assert fpn.fpn.inner_blocks[3][0].in_channels == c5
    with torch.no_grad():
        out = fpn(torch.randn(1, 3, 128, 192))
    assert [tuple(v.shape) for v in out.values()] == [
        (1, 24, 32, 48), (1, 24, 16, 24), (1, 24, 8, 12), (1, 24, 4, 6), (1, 24, 2, 3)
    ]


def test_load_imagenet_weights_land_in_place(tmp_path):
    torch.manual_seed(1)
    src = resnet18(weights=None)  # torchvision's ImageNet layout (incl. fc and num_batches_tracked)
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)
    fpn = build_resnet_fpn(18, out_channels=16, norm="frozen_bn", frozen_stages=1, weights=path)
    assert torch.equal(fpn.body.conv1.weight, src.conv1.weight)
    assert torch.equal(fpn.body.layer3[1].conv2.weight, src.layer3[1].conv2.weight)
    assert torch.equal(fpn.body.layer4[0].bn1.running_var, src.layer4[0].bn1.running_var)
    net = build_resnet(18, "bn")
    missing, unexpected = load_backbone_weights(net, path)
    assert missing == [] and unexpected == []
    assert torch.equal(net.layer2[0].downsample[1].weight, src.layer2[0].downsample[1].weight)


def test_load_weights_errors(tmp_path):
    with pytest.raises(CheckpointError, match="model.backbone.weights: .*none.pth: checkpoint file not found"):
        load_backbone_weights(build_resnet(18, "bn"), tmp_path / "none.pth")
    wrong = tmp_path / "r50.pth"
    torch.save(build_resnet(50, "bn").state_dict(), wrong)
    with pytest.raises(CheckpointError, match="model.backbone.depth"):
        load_backbone_weights(build_resnet(18, "bn"), wrong)
    junk = tmp_path / "junk.pth"
    torch.save({"a": torch.zeros(1)}, junk)
    with pytest.raises(CheckpointError, match="no key"):
        load_backbone_weights(build_resnet(18, "bn"), junk)


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "mobilenet_v3_small"])
def test_mobilenet_pyramid_strides_and_width(name):
    """The small CPU bodies give the same five levels (strides 4..64) as the ResNets."""
    fpn = build_backbone_fpn(name, 18, out_channels=32, norm="bn", frozen_stages=0).eval()
    with torch.no_grad():
        out = fpn(torch.zeros(1, 3, 128, 192))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert [tuple(v.shape) for v in out.values()] == [
        (1, 32, 128 // s, 192 // s) for s in (4, 8, 16, 32)
    ] + [(1, 32, 2, 3)]


def test_backbone_name_errors():
    with pytest.raises(ConfigError, match="model.backbone.name"):
        build_backbone_fpn("vgg16", 18)
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        build_backbone_fpn("mobilenet_v3_small", 18, frozen_stages=0, weights="resnet18.pth")
    with pytest.raises(ValueError, match="frozen_stages"):
        build_backbone_fpn("mobilenet_v3_large", 18, frozen_stages=5)


def test_mobilenet_frozen_stages():
    """frozen_stages=1 stops the stem through C2 (features 0..3) and fixes their BN statistics; C3 on trains."""
    from torchvision.ops import FrozenBatchNorm2d

    body = build_backbone_fpn("mobilenet_v3_large", 18, out_channels=16, norm="bn", frozen_stages=1).body
    frozen = [m for i, m in enumerate(body.children()) if i <= 3]
    trained = [m for i, m in enumerate(body.children()) if i > 3]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in trained for p in m.parameters())
    assert not any(isinstance(b, torch.nn.BatchNorm2d) for m in frozen for b in m.modules())
    assert any(isinstance(b, FrozenBatchNorm2d) for m in frozen for b in m.modules())
    assert any(isinstance(b, torch.nn.BatchNorm2d) for m in trained for b in m.modules())


def test_demo_model_fits_ten_megabytes():
    """Issue 8's pretrained route: the demo's checkpoint must stay <= 10 MB with its floats in fp16."""
    import io

    from comask.config import load_config
    from comask.modeling import build_model

    model = build_model(load_config("comask_mnv3_mfpn_shapes_demo_pretrain"))
    buf = io.BytesIO()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, buf)
    assert len(buf.getvalue()) < 9.5e6  # leaves room for the config and metadata in the file
