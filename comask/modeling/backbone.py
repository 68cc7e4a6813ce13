"""ResNet + FPN (P2..P6) built from torchvision parts.

State-dict keys match torchvision's `maskrcnn_resnet50_fpn` (`body.*`, `fpn.*`), so checkpoints in
that layout can initialise this backbone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision.models import mobilenetv3, resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from comask.checkpoint_io import read_state_dict
from comask.config import ConfigError
from comask.errors import CheckpointError

_RESNETS: dict[int, Callable[..., resnet.ResNet]] = {
    18: resnet.resnet18,
    34: resnet.resnet34,
    50: resnet.resnet50,
    101: resnet.resnet101,
    152: resnet.resnet152,
}
# auto: frozen_bn over pretrained weights, syncbn from scratch; syncbn is BatchNorm2d that training converts to
# SyncBatchNorm under DDP (one process: plain trainable BN)
NORMS = ("auto", "frozen_bn", "bn", "syncbn", "gn")
# names of the FPN inputs (C2..C5) and, in order, the pyramid levels the FPN returns (P2..P6)
_RETURN_LAYERS = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
LEVEL_NAMES = ("p2", "p3", "p4", "p5", "p6")
# MobileNetV3 `features` blocks whose outputs are C2..C5 (strides 4, 8, 16, 32) and their channels: small CPU
# models (the demo's <= 10 MB checkpoint) keep the same five pyramid levels as the ResNets
_MOBILENETS: dict[str, tuple[Callable[..., mobilenetv3.MobileNetV3], dict[str, str], list[int]]] = {
    "mobilenet_v3_large": (mobilenetv3.mobilenet_v3_large, {"3": "0", "6": "1", "12": "2", "16": "3"}, [24, 40, 112, 960]),
    "mobilenet_v3_small": (mobilenetv3.mobilenet_v3_small, {"1": "0", "3": "1", "8": "2", "12": "3"}, [16, 24, 48, 576]),
}
BACKBONES = ("resnet", *_MOBILENETS)
RESNET_DEPTHS = tuple(_RESNETS)


def gn_groups(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """GroupNorm group count: GN(32) at 256 channels; narrower layers get fewer groups so that each
    group keeps >= `min_group_size` channels (a 1x1 map with one channel per group cannot be normalised)."""
    for g in range(min(max_groups, max(1, channels // min_group_size)), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _norm_layer(norm: str) -> Callable[[int], nn.Module]:
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm in ("bn", "syncbn"):
        return nn.BatchNorm2d
    if norm == "gn":
        return lambda c: nn.GroupNorm(gn_groups(c), c)
    raise ValueError(f"model.backbone.norm must be one of {NORMS}, got {norm!r}")


def resolve_norm(norm: str, frozen_stages: int | str, pretrained: bool) -> tuple[str, int]:
    """`auto` values follow the weights: over pretrained weights FrozenBN with the stem + stage 1 frozen
    (Detectron2's and torchvision's recipe); from scratch a trainable BN (SyncBN under DDP) and nothing frozen,
    because a random body without normalisation blows its activations up (NaN within ~20 iterations at LR 0.02)."""
    if norm not in NORMS:
        raise ConfigError(f"model.backbone.norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if norm == "auto":
        norm = "frozen_bn" if pretrained else "syncbn"
    if frozen_stages == "auto":
        frozen_stages = 1 if pretrained else 0
    if not isinstance(frozen_stages, int):
        raise ConfigError(f"model.backbone.frozen_stages must be auto or an integer 0..4, got {frozen_stages!r}")
    return norm, frozen_stages


def build_resnet(depth: int, norm: str = "frozen_bn") -> resnet.ResNet:
    """A randomly initialised torchvision ResNet with the given normalisation layer."""
    if depth not in _RESNETS:
        raise ValueError(f"model.backbone.depth must be one of {sorted(_RESNETS)}, got {depth!r}")
    return _RESNETS[depth](weights=None, norm_layer=_norm_layer(norm))


def freeze_stages(net: resnet.ResNet, frozen_stages: int) -> None:
    """Stop training the stem and the first `frozen_stages` residual stages (1 = stem + layer1).

    Trainable BatchNorm layers inside frozen stages become FrozenBatchNorm2d (same buffers), so their
    running statistics stay fixed too, whatever train()/eval() mode the model is in.
    """
    if not 0 <= frozen_stages <= 4:
        raise ValueError(f"model.backbone.frozen_stages must be in 0..4, got {frozen_stages!r}")
    if frozen_stages == 0:
        return
    frozen = ["conv1", "bn1"] + [f"layer{i}" for i in range(1, frozen_stages + 1)]
    for name in frozen:
        module = getattr(net, name)
        if isinstance(module, nn.BatchNorm2d):
            setattr(net, name, _to_frozen_bn(module))
        else:
            _freeze(module)


def freeze_mobilenet_stages(features: nn.Sequential, stage_ends: list[int], frozen_stages: int) -> None:
    """Stop training a MobileNetV3's layers up to the end of stage `frozen_stages` (1 = stem through C2,
    the stride-4 output), converting their BatchNorms to FrozenBatchNorm2d as freeze_stages does for a ResNet.

    The early, high-resolution layers are the costliest part of the backward pass; a body that is already
    trained on the data gains little from updating them (docs/BENCHMARKS.md, tuning table: frozen early
    body)."""
    if not 0 <= frozen_stages <= len(stage_ends):
        raise ValueError(f"model.backbone.frozen_stages must be in 0..{len(stage_ends)}, got {frozen_stages!r}")
    if frozen_stages == 0:
        return
    for i in range(stage_ends[frozen_stages - 1] + 1):
        _freeze(features[i])


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
    _replace_bn(module)


def _to_frozen_bn(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    fbn = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    with torch.no_grad():
        fbn.weight.copy_(bn.weight)
        fbn.bias.copy_(bn.bias)
        fbn.running_mean.copy_(bn.running_mean)
        fbn.running_var.copy_(bn.running_var)
    return fbn


def _replace_bn(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, _to_frozen_bn(child))
        else:
            _replace_bn(child)


def load_backbone_weights(net: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Load a torchvision ImageNet state_dict (ResNet `resnet50-*.pth` or MobileNetV3 layout) into the body `net`.

    The classifier (`fc.*`, `classifier.*`) is ignored and MobileNet's `features.` prefix is dropped (the
    body is the `features` Sequential). Returns (missing, unexpected) key lists so callers can report
    them; raises CheckpointError when the file cannot be used at all.
    """
    p = Path(path)
    sd = read_state_dict(p, "model.backbone.weights")
    sd = {k.removeprefix("features."): v for k, v in sd.items() if not k.startswith(("fc.", "classifier."))}
    own = net.state_dict()
    bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise CheckpointError(
            f"model.backbone.weights: {p} does not fit this backbone (shape differs for {bad[0]}); "
            "check model.backbone.name and model.backbone.depth"
        )
    if not any(k in own for k in sd):
        raise CheckpointError(f"model.backbone.weights: no key of {p} matches this backbone's body")
    result = net.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(("fc.", "classifier."))]
    return missing, list(result.unexpected_keys)


def build_resnet_fpn(depth: int, out_channels: int = 256, norm: str = "frozen_bn", frozen_stages: int = 1,
                     weights: str | Path | None = None) -> BackboneWithFPN:
    """ResNet C2..C5 -> FPN P2..P5 (3x3 output convs) + P6 (max-pool of P5), `out_channels` wide.

    The returned module maps an image batch to an OrderedDict `{"0": P2, ..., "3": P5, "pool": P6}`
    and has `.out_channels`.
    """
    net = build_resnet(depth, norm)
    if weights:
        load_backbone_weights(net, weights)
    freeze_stages(net, frozen_stages)
    c5 = net.inplanes  # channels of layer4's output (512 for 18/34, 2048 for 50+)
    in_channels = [c5 // 8, c5 // 4, c5 // 2, c5]
    return BackboneWithFPN(
        net, return_layers=_RETURN_LAYERS, in_channels_list=in_channels, out_channels=out_channels,
        extra_blocks=LastLevelMaxPool(),
    )


def build_backbone_fpn(name: str, depth: int, out_channels: int = 256, norm: str = "frozen_bn",
                       frozen_stages: int = 1, weights: str | Path | None = None) -> BackboneWithFPN:
    """`model.backbone.name`: a ResNet of `depth` (build_resnet_fpn) or a torchvision MobileNetV3, each with
    FPN P2..P5 + P6 of `out_channels` and the same output keys."""
    if name == "resnet":
        return build_resnet_fpn(depth, out_channels, norm, frozen_stages, weights)
    if name not in _MOBILENETS:
        raise ConfigError(f"model.backbone.name must be one of {', '.join(BACKBONES)}, got {name!r}")
    factory, return_layers, in_channels = _MOBILENETS[name]
    features = factory(weights=None, norm_layer=_norm_layer(norm)).features
    if weights:
        load_backbone_weights(features, weights)
    freeze_mobilenet_stages(features, [int(k) for k in return_layers], frozen_stages)
    return BackboneWithFPN(
        features, return_layers=return_layers, in_channels_list=in_channels, out_channels=out_channels,
        extra_blocks=LastLevelMaxPool(),
    )
