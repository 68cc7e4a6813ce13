"""Fold batch norms into the convolutions before them, for inference.

At inference a `FrozenBatchNorm2d`, or a `BatchNorm2d` using its running statistics, is a fixed per-channel
affine map, so conv -> norm equals one conv with scaled weights and a bias. Folding removes the norm's
kernels (seven elementwise ones per FrozenBN; 53 norms in ResNet-50, about 30% of CoMask-R50's operators per
image) and, under fp16/bf16 autocast, the float32 activations a FrozenBN's float32 buffers promote every conv
output to. The result differs from the unfolded model only by float rounding. Only for models that will not
be trained again: the folded model has no norm left to train.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d


def _foldable(m: nn.Module) -> bool:
    if isinstance(m, FrozenBatchNorm2d):
        return True
    # a BatchNorm2d is a fixed map only where it normalises with running statistics
    return isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None


def _fold_pair(conv: nn.Conv2d, bn: nn.Module) -> None:
    """conv := bn(conv(.)), computed in float64 so the fold adds no rounding of its own beyond the final cast."""
    var, mean = bn.running_var.detach().double(), bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    w = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter((w * scale.reshape(-1, 1, 1, 1)).to(dtype), requires_grad=False)
    conv.bias = nn.Parameter(((bias - mean) * scale + beta).to(dtype), requires_grad=False)


def _pairs(module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(parent, conv attribute, norm attribute) for every conv directly followed by a foldable norm."""
    found: list[tuple[nn.Module, str, str]] = []
    for parent in module.modules():
        # children run in order: Conv2dNormActivation, ResNet's downsample, the ResNet stem in a layer getter
        if isinstance(parent, (nn.Sequential, IntermediateLayerGetter)):
            names = list(parent._modules)
            for a, b in zip(names, names[1:]):
                if isinstance(parent._modules[a], nn.Conv2d) and _foldable(parent._modules[b]):
                    found.append((parent, a, b))
        elif isinstance(parent, (ResNet, Bottleneck, BasicBlock)):  # convK is always followed by bnK there
            for k in range(1, 4):
                conv, bn = getattr(parent, f"conv{k}", None), getattr(parent, f"bn{k}", None)
                if isinstance(conv, nn.Conv2d) and bn is not None and _foldable(bn):
                    found.append((parent, f"conv{k}", f"bn{k}"))
    return found


def fold_batch_norms(model: nn.Module) -> int:
    """Fold, in place, every frozen or running-statistics BN that directly follows a conv (torchvision's
    ResNet and MobileNetV3 layouts) into that conv and replace it by `nn.Identity`; returns how many. For
    inference only: the folded convs' parameters do not require grad."""
    pairs = _pairs(model)
    for parent, conv_name, bn_name in pairs:
        _fold_pair(getattr(parent, conv_name), getattr(parent, bn_name))
        setattr(parent, bn_name, nn.Identity())
    return len(pairs)


def fold_for_inference(model: nn.Module, cfg) -> int:
    """Fold `model`'s norms when the config asks for it (`model.test.fold_bn`); how many were folded."""
    return fold_batch_norms(model) if cfg.model.test.fold_bn else 0
