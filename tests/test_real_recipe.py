"""The COCO recipe's building blocks: normalisation and freezing that follow the weights, ImageNet weights by
torchvision name through torch.hub's cache, an offset branch whose gradient survives its clamp, fp16 overflow
steps skipped and counted."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet18
from torchvision.ops import FrozenBatchNorm2d

from comask.config import ConfigError, load_config
from comask.errors import CheckpointError
from comask.modeling.backbone import resolve_norm
from comask.modeling.build import backbone_norm, build_model, check_frozen_bn
from comask.modeling.collab_head import CollaborativeHead
from comask.modeling.imagenet import hub_file, resolve_weights
from comask.modeling.losses import offset_loss

# ResNet-18 and narrow heads: the R50 COCO config's logic at a size that builds in a second
SMALL = [
    "model.backbone.depth=18", "model.fpn.channels=16", "model.num_classes=3", "model.msfem.branches=1",
    "model.collab_head.conv_dim=16", "model.collab_head.num_convs=1", "model.mask_head.conv_dim=16",
    "model.box_head.fc_dim=32",
]


def test_norm_and_freezing_follow_the_weights():
    assert resolve_norm("auto", "auto", pretrained=True) == ("frozen_bn", 1)
    assert resolve_norm("auto", "auto", pretrained=False) == ("syncbn", 0)
    assert resolve_norm("gn", 2, pretrained=False) == ("gn", 2)
    with pytest.raises(ConfigError, match="model.backbone.norm"):
        resolve_norm("ln", 0, pretrained=False)
    with pytest.raises(ConfigError, match="frozen_stages"):
        resolve_norm("bn", "some", pretrained=False)


def test_from_scratch_the_coco_config_trains_every_bn(caplog):
    cfg = load_config("comask_r50_mfpn_2x_coco", [*SMALL, "model.backbone.weights=null"])
    assert backbone_norm(cfg) == ("syncbn", 0)
    with caplog.at_level(logging.INFO, logger="comask.build"):
        model = build_model(cfg)
    body = model.backbone.body
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    assert isinstance(body.bn1, nn.BatchNorm2d) and all(p.requires_grad for p in body.parameters())
    assert any("norm syncbn, nothing frozen" in r.message for r in caplog.records)


def _cache_file(tmp_path, monkeypatch, factory, spec: str, name: str, depth: int) -> dict:
    """A generated state_dict in torchvision's layout where torch.hub keeps `spec`'s file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(3)
    sd = factory().state_dict()
    _, path = hub_file(spec, name, depth)
    path.parent.mkdir(parents=True)
    torch.save(sd, path)
    return sd


def test_imagenet_weights_by_torchvision_name_come_from_the_hub_cache(tmp_path, monkeypatch, caplog):
    src = _cache_file(tmp_path, monkeypatch, resnet18, "torchvision:IMAGENET1K_V1", "resnet", 18)
    cfg = load_config("comask_r50_mfpn_2x_coco", SMALL)  # weights: torchvision:IMAGENET1K_V1 by default
    assert backbone_norm(cfg) == ("frozen_bn", 1)
    with caplog.at_level(logging.INFO, logger="comask.pretrained"):
        model = build_model(cfg)
    own = model.backbone.body.state_dict()
    for k in ("conv1.weight", "bn1.running_var", "layer3.1.conv2.weight", "layer4.0.downsample.1.running_mean"):
        assert torch.equal(own[k], src[k]), k
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad
    assert model.backbone.body.layer2[0].conv1.weight.requires_grad
    assert any("resnet18-f37072fd.pth" in r.message for r in caplog.records)


def test_mobilenet_weights_by_name_drop_the_features_prefix(tmp_path, monkeypatch):
    src = _cache_file(tmp_path, monkeypatch, mobilenet_v3_large, "torchvision:IMAGENET1K_V1",
                      "mobilenet_v3_large", 18)
    cfg = load_config("comask_mnv3_mfpn_demo", ["model.backbone.weights=torchvision:IMAGENET1K_V1"])
    model = build_model(cfg)
    own = model.backbone.body.state_dict()
    assert torch.equal(own["0.0.weight"], src["features.0.0.weight"])
    assert torch.equal(own["16.1.running_var"], src["features.16.1.running_var"])


def test_offline_without_the_file_is_one_line_naming_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(CheckpointError) as e:
        resolve_weights("torchvision:IMAGENET1K_V1", "resnet", 50)
    msg = str(e.value)
    assert "\n" not in msg and "resnet50-0676ba61.pth" in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    assert "model.backbone.weights=null" in msg
    with pytest.raises(CheckpointError, match="IMAGENET1K_V2"):  # the names the enum has
        resolve_weights("torchvision:IMAGENET9K", "resnet", 50)


def test_download_when_online_and_a_clear_error_when_it_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("COMASK_OFFLINE", "0")
    calls = []

    def fake_download(url, dst, progress=True):
        calls.append((url, progress))
        torch.save(resnet18().state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    path = resolve_weights("torchvision:IMAGENET1K_V1", "resnet", 18)
    assert path.is_file() and calls == [(hub_file("torchvision:IMAGENET1K_V1", "resnet", 18)[0], True)]
    assert resolve_weights("torchvision:IMAGENET1K_V1", "resnet", 18) == path and len(calls) == 1  # cached

    def no_network(url, dst, progress=True):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(CheckpointError, match=r"could not be downloaded \(OSError\).*resnet34"):
        resolve_weights("torchvision:IMAGENET1K_V1", "resnet", 34)


def test_local_paths_still_work(tmp_path):
    assert resolve_weights(tmp_path / "r.pth", "resnet", 50) == tmp_path / "r.pth"


def test_frozen_bn_over_a_random_body_is_refused_unless_forced_or_loaded():
    base = [*SMALL, "model.backbone.weights=null", "model.backbone.norm=frozen_bn"]
    with pytest.raises(ConfigError, match="frozen_bn over a randomly initialised body"):
        check_frozen_bn(load_config("comask_r50_mfpn_2x_coco", base))
    check_frozen_bn(load_config("comask_r50_mfpn_2x_coco", [*base, "model.backbone.force_frozen_bn=true"]))
    check_frozen_bn(load_config("comask_r50_mfpn_2x_coco", [*base, "runtime.load_from=x.pth"]))
    with pytest.raises(ConfigError):  # load_only that leaves the body out does not count
        check_frozen_bn(load_config("comask_r50_mfpn_2x_coco", [*base, "runtime.load_from=x.pth",
                                                                  "runtime.load_only=[rpn.]"]))
    for name in ("comask_mnv3_mfpn_shapes", "maskrcnn_mnv3_fpn_shapes", "comask_r50_mfpn_2x_coco"):
        check_frozen_bn(load_config(name))  # the shipped configs pass


@pytest.mark.parametrize("bias,clamped,sign", [(math.log(8.0) + 3.0, 8.0, 1.0), (math.log(1e-3) - 30.0, 1e-3, -1.0)])
def test_saturated_offsets_still_get_a_gradient(bias, clamped, sign):
    """Offsets past either clamp (8 RoI units; 1e-3, a collapsed box whose IoU is ~1e-7) must still be pulled
    back by the loss: a plain clamp, or -log of an IoU clamped at an epsilon, gave them no gradient at all."""
    torch.manual_seed(0)
    head = CollaborativeHead(8, 3, conv_dim=8, num_convs=1)
    with torch.no_grad():
        head.offset_pred.bias.fill_(bias)
    feat = head.features(torch.randn(2, 8, 14, 14))
    pred = head.offsets(feat)
    assert torch.allclose(pred, torch.full_like(pred, clamped))
    loss = offset_loss(pred, torch.full_like(pred, 0.5), torch.ones(2, 1, 28, 28))
    loss.backward()
    g = head.offset_pred.bias.grad
    assert torch.isfinite(g).all() and (g * sign > 0.1).all()  # a step moves the distances towards 0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_offsets_are_float32_under_autocast(dtype):
    head = CollaborativeHead(8, 3, conv_dim=8, num_convs=1)
    with torch.autocast("cpu", dtype=dtype):
        off, _ = head(torch.randn(3, 8, 14, 14), torch.tensor([1, 2, 0]))
    assert off.dtype == torch.float32


def test_syncbn_converts_under_ddp_on_cuda_only():
    """`norm: syncbn` (what `auto` gives from scratch) becomes SyncBatchNorm when training runs under DDP on
    CUDA; FrozenBN is left alone, and on the CPU (gloo; SyncBatchNorm needs CUDA) the model is unchanged."""
    from comask.engine.train import _sync_batchnorm

    model = build_model(load_config("comask_r50_mfpn_2x_coco", [*SMALL, "model.backbone.weights=null"]))
    assert _sync_batchnorm(model, torch.device("cpu"), is_main=True) is model
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    params = {id(p) for p in model.parameters()}
    converted = _sync_batchnorm(model, torch.device("cuda"), is_main=True)  # conversion itself needs no GPU
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert {id(p) for p in converted.parameters()} == params  # the optimizer built before still holds them
