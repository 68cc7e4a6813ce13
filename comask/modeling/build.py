"""`build_model(cfg)`: CoMask or the Mask R-CNN baseline from one config, sharing every builder
except the RoI heads. The model keeps no reference to the config (its state_dict is tensors only)."""

from __future__ import annotations

import logging

from torch import nn
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from comask.config import ConfigError, register_validator
from comask.modeling.anchors import CachedAnchorGenerator
from comask.modeling.backbone import (
    BACKBONES,
    LEVEL_NAMES,
    NORMS,
    RESNET_DEPTHS,
    build_backbone_fpn,
    resolve_norm,
)
from comask.modeling.comask import CoMask
from comask.modeling.maskrcnn import MaskRCNN, build_maskrcnn_roi_heads
from comask.modeling.msfem import MFPN, PLACEMENTS, check_msfem_config, msfem_in_fpn
from comask.modeling.pretrained import apply_pretrained
from comask.modeling.roi_heads import build_comask_roi_heads
from comask.modeling.static_compile import check_compile_mode

log = logging.getLogger("comask.build")

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


MODEL_TYPES = ("comask", "maskrcnn")


@register_validator
def check_model_config(cfg, source: str = "config") -> None:
    """ConfigError for `model` keys outside the vocabulary of the modules that read them; runs when a config
    is loaded (registered with comask.config) and again in build_model."""
    m = cfg.model
    if m.type not in MODEL_TYPES:
        raise ConfigError(f"{source}: model.type must be one of {', '.join(MODEL_TYPES)}, got {m.type!r}")
    name = m.backbone.get("name", "resnet")
    if name not in BACKBONES:
        raise ConfigError(f"{source}: model.backbone.name must be one of {', '.join(BACKBONES)}, got {name!r}")
    if m.backbone.depth not in RESNET_DEPTHS:
        raise ConfigError(f"{source}: model.backbone.depth must be one of {'/'.join(map(str, RESNET_DEPTHS))}, "
                          f"got {m.backbone.depth!r}")
    if m.backbone.get("norm", "auto") not in NORMS:
        raise ConfigError(f"{source}: model.backbone.norm must be one of {', '.join(NORMS)}, got {m.backbone.norm!r}")
    check_msfem_config(m.msfem, source)
    check_compile_mode(m.test.get("compile", "eager"), source)


def backbone_norm(cfg) -> tuple[str, int]:
    """(norm, frozen_stages) with `auto` resolved: pretrained means `model.backbone.weights` or
    `model.init_from` is set (the config alone decides, so a checkpoint rebuilds the layout it trained with)."""
    m = cfg.model
    pretrained = bool(m.backbone.get("weights") or m.get("init_from"))
    return resolve_norm(m.backbone.norm, m.backbone.frozen_stages, pretrained)


def check_frozen_bn(cfg) -> None:
    """Refuse FrozenBN over a body that nothing initialises: without normalisation a random ResNet's
    activations grow layer by layer and training goes non-finite within a few dozen iterations.

    The body counts as initialised by `model.backbone.weights`, `model.init_from`, or `runtime.load_from`
    (unless `runtime.load_only` leaves the body out); `model.backbone.force_frozen_bn: true` overrides."""
    m, rt = cfg.model, cfg.runtime
    norm, _ = backbone_norm(cfg)
    if norm != "frozen_bn" or m.backbone.get("force_frozen_bn"):
        return
    only = tuple(rt.get("load_only") or ())
    body_loaded = bool(rt.get("load_from")) and (not only or any("backbone.body.".startswith(p) for p in only))
    if m.backbone.get("weights") or m.get("init_from") or body_loaded:
        return
    raise ConfigError(
        "model.backbone.norm=frozen_bn over a randomly initialised body diverges: set model.backbone.weights "
        "(e.g. torchvision:IMAGENET1K_V1), or model.backbone.norm=auto to train from scratch with trainable BN "
        "(model.backbone.force_frozen_bn=true to insist)"
    )


def build_backbone(cfg) -> nn.Module:
    """ResNet-FPN (P2..P6) with MSFEMs when model.msfem.branches > 0, placed per model.msfem.placement:
    `in_fpn` (in place of the FPN's 3x3 output convs on P2..P5) or `after_fpn` (after every level P2..P6).

    A config without `placement` (checkpoints saved before the key existed) means `after_fpn`, the
    layout those checkpoints were trained with.
    """
    m = cfg.model
    norm, frozen_stages = backbone_norm(cfg)
    fpn = build_backbone_fpn(
        m.backbone.get("name", "resnet"),
        m.backbone.depth,
        out_channels=m.fpn.channels,
        norm=norm,
        frozen_stages=frozen_stages,
    )
    if m.msfem.branches == 0:
        return fpn
    placement = m.msfem.placement
    args = (m.msfem.branches, m.msfem.residual, m.msfem.attention_reduction, m.msfem.fusion_init)
    if placement == "in_fpn":
        return msfem_in_fpn(fpn, *args)
    if placement == "after_fpn":
        return MFPN(fpn, *args)
    raise ConfigError(f"model.msfem.placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")


def build_rpn(cfg, in_channels: int) -> RegionProposalNetwork:
    """torchvision's RPN: one anchor size per level P2..P6, the configured aspect ratios."""
    r = cfg.model.rpn
    sizes = tuple((int(s),) for s in r.anchor_sizes)
    if len(sizes) != len(LEVEL_NAMES):
        raise ConfigError(
            f"model.rpn.anchor_sizes needs one size per pyramid level P2..P6 ({len(LEVEL_NAMES)}), got {len(sizes)}"
        )
    ratios = (tuple(float(a) for a in r.aspect_ratios),) * len(sizes)
    anchors = CachedAnchorGenerator(sizes=sizes, aspect_ratios=ratios)
    head = RPNHead(in_channels, anchors.num_anchors_per_location()[0])
    return RegionProposalNetwork(
        anchors,
        head,
        fg_iou_thresh=r.fg_iou_thresh,
        bg_iou_thresh=r.bg_iou_thresh,
        batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction,
        pre_nms_top_n={"training": r.pre_nms_top_n_train, "testing": r.pre_nms_top_n_test},
        post_nms_top_n={"training": r.post_nms_top_n_train, "testing": r.post_nms_top_n_test},
        nms_thresh=r.nms_thresh,
    )


def build_transform(cfg) -> GeneralizedRCNNTransform:
    """Normalisation and test-time resize. Training images arrive resized (and padded to a common
    size here), so the training-time resize is skipped."""
    inp = cfg.input
    return GeneralizedRCNNTransform(
        min_size=inp.min_size_test,
        max_size=inp.max_size_test,
        image_mean=list(inp.get("pixel_mean", IMAGENET_MEAN)),
        image_std=list(inp.get("pixel_std", IMAGENET_STD)),
        _skip_resize=True,
    )


def build_model(cfg, *, pretrained: bool = True) -> nn.Module:
    """CoMask (`model.type: comask`) or the Mask R-CNN baseline (`maskrcnn`).

    pretrained: load `model.backbone.weights` / `model.init_from` (comask.modeling.pretrained), logging
    what was loaded. Code that loads a full checkpoint right after passes False, so a config that names
    such files still builds where they are absent.
    """
    check_model_config(cfg)
    kind = cfg.model.type
    backbone = build_backbone(cfg)
    rpn = build_rpn(cfg, backbone.out_channels)
    transform = build_transform(cfg)
    # check_model_config above has refused any other model.type
    if kind == "comask":
        model = CoMask(backbone, rpn, build_comask_roi_heads(cfg, backbone.out_channels), transform)
    else:
        model = MaskRCNN(backbone, rpn, build_maskrcnn_roi_heads(cfg, backbone.out_channels), transform)
    if pretrained:
        norm, frozen = backbone_norm(cfg)
        log.info("backbone: %s %s, norm %s, %s frozen (model.backbone.norm=%s, frozen_stages=%s, weights=%s)",
                 cfg.model.backbone.get("name", "resnet"), cfg.model.backbone.depth, norm,
                 f"stem + {frozen} stage(s)" if frozen else "nothing", cfg.model.backbone.norm,
                 cfg.model.backbone.frozen_stages, cfg.model.backbone.get("weights"))
        apply_pretrained(model, cfg)
    return model
