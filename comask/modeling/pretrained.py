"""Initialising a freshly built model from weight files (only `torchvision:` names are ever downloaded).

- `model.backbone.weights`: a torchvision ImageNet state_dict (`resnet50-*.pth` or MobileNetV3 layout), a local
  path or `torchvision:IMAGENET1K_V1` (comask.modeling.imagenet: torch.hub's cache) -> the backbone's body
  (via `backbone.load_backbone_weights`, the backbone's own loader).
- `model.init_from`: a torchvision `maskrcnn_resnet50_fpn` checkpoint (COCO) -> backbone, FPN and RPN
  of either model type; for CoMask also the classification head's two FC layers and, where its shape
  matches (same class count), the class scores; for the Mask R-CNN baseline the whole RoI stage where
  shapes match. The MSFEMs and the collaborative head have no counterpart and keep their fresh init.

Both return a `LoadReport` (what was loaded, what stayed at its initialisation, what in the file was not
used, what had the wrong shape), which `apply_pretrained` logs.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from comask.checkpoint_io import read_state_dict
from comask.errors import CheckpointError
from comask.modeling.backbone import load_backbone_weights
from comask.modeling.imagenet import resolve_weights

log = logging.getLogger("comask.pretrained")

# torchvision keys of checkpoints saved before its RPN head and mask head became Sequentials (the released
# maskrcnn_resnet50_fpn COCO file has these); torchvision renames them in _load_from_state_dict.
_LEGACY_RENAMES = (
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), r"rpn.head.conv.0.0.\1"),
    (re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$"), None),  # index shifts by one
)
# torchvision Mask R-CNN key prefix -> CoMask key prefix (the classification head mirrors TwoMLPHead +
# the class-score layer of FastRCNNPredictor; box regression and the mask branch have no counterpart).
_COMASK_PREFIXES = {
    "roi_heads.box_head.fc6.": "roi_heads.cls_head.fc6.",
    "roi_heads.box_head.fc7.": "roi_heads.cls_head.fc7.",
    "roi_heads.box_predictor.cls_score.": "roi_heads.cls_head.cls_score.",
}
_SHARED_PREFIXES = ("backbone.body.", "backbone.fpn.", "rpn.")


@dataclass
class LoadReport:
    """Keys are our model's names, except `unexpected` (the file's names)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def groups(keys: list[str], depth: int = 2) -> str:
            c = Counter(".".join(k.split(".")[:depth]) for k in keys)
            return ", ".join(f"{p} ({n})" for p, n in sorted(c.items())) or "none"

        parts = [f"{self.source}: loaded {len(self.loaded)} tensors [{groups(self.loaded)}]"]
        parts.append(f"kept initialisation of {len(self.missing)} [{groups(self.missing)}]")
        parts.append(f"unused from the file {len(self.unexpected)} [{groups(self.unexpected)}]")
        if self.shape_mismatch:
            shown = "; ".join(self.shape_mismatch[:4]) + (" ..." if len(self.shape_mismatch) > 4 else "")
            parts.append(f"shape mismatch {len(self.shape_mismatch)} [{shown}]")
        return "; ".join(parts)


def _is_counter(key: str) -> bool:
    # BatchNorm's step counter carries no weights; files and models disagree on it harmlessly.
    return key.endswith("num_batches_tracked")


def upgrade_legacy_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename pre-Sequential torchvision keys (`rpn.head.conv.weight`, `mask_head.mask_fcn1.weight`) to the
    current layout (`rpn.head.conv.0.0.weight`, `mask_head.0.0.weight`)."""
    out = {}
    for k, v in sd.items():
        m = _LEGACY_RENAMES[0][0].match(k)
        if m:
            k = _LEGACY_RENAMES[0][0].sub(_LEGACY_RENAMES[0][1], k)
        else:
            m = _LEGACY_RENAMES[1][0].match(k)
            if m:
                k = f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"
        out[k] = v
    return out


def load_imagenet_backbone(model: nn.Module, path: str | Path) -> LoadReport:
    """`model.backbone.weights`: a torchvision ImageNet ResNet state_dict -> `model.backbone.body`.

    Uses the backbone's own loader (which refuses a file of another depth); only the classifier `fc.*`
    of the file is ignored.
    """
    body = model.backbone.body
    missing, unexpected = load_backbone_weights(body, path)
    own = [k for k in body.state_dict() if not _is_counter(k)]
    missing_set = set(missing)
    return LoadReport(
        source=f"model.backbone.weights={path}",
        loaded=[f"backbone.body.{k}" for k in own if k not in missing_set],
        missing=[f"backbone.body.{k}" for k in missing if not _is_counter(k)],
        unexpected=[k for k in unexpected if not _is_counter(k)],
    )


def _target_key(key: str, own: Mapping[str, torch.Tensor], comask_layout: bool) -> str | None:
    if key.startswith(_SHARED_PREFIXES):
        return key
    if comask_layout:
        for src, dst in _COMASK_PREFIXES.items():
            if key.startswith(src):
                return dst + key[len(src):]
        return None
    return key if key.startswith("roi_heads.") else None


def init_from_torchvision_maskrcnn(model: nn.Module, path: str | Path) -> LoadReport:
    """`model.init_from`: copy the matching tensors of a torchvision Mask R-CNN checkpoint into `model`.

    Raises CheckpointError when nothing at all fits (e.g. a file of another architecture, or FPN widths
    that differ from the checkpoint's 256 channels everywhere).
    """
    sd = upgrade_legacy_keys(read_state_dict(path, "model.init_from"))
    own = model.state_dict()
    comask_layout = any(k.startswith("roi_heads.cls_head.") for k in own)
    report = LoadReport(source=f"model.init_from={path}")
    to_load: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if _is_counter(key):
            continue
        target = _target_key(key, own, comask_layout)
        if target is None or target not in own:
            report.unexpected.append(key)
        elif tuple(own[target].shape) != tuple(value.shape):
            report.shape_mismatch.append(f"{target}: file {tuple(value.shape)} vs model {tuple(own[target].shape)}")
            report.unexpected.append(key)
        else:
            to_load[target] = value
    if not to_load:
        raise CheckpointError(
            f"model.init_from: no tensor of {path} fits this model "
            f"({len(report.shape_mismatch)} shape mismatches, {len(report.unexpected)} unmatched keys); "
            "it must be a torchvision maskrcnn_resnet50_fpn state_dict and model.backbone.depth / model.fpn.channels "
            "must match it (50 / 256)"
        )
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.missing = sorted(k for k in own if k not in to_load and not _is_counter(k))
    return report


def apply_pretrained(model: nn.Module, cfg: Any) -> list[LoadReport]:
    """Load `model.backbone.weights` then `model.init_from` (the latter wins where both cover a tensor),
    logging one summary line per file. Returns the reports (empty when the config names no file)."""
    reports = []
    m = cfg.model
    if m.backbone.get("weights"):
        path = resolve_weights(m.backbone.weights, m.backbone.get("name", "resnet"), m.backbone.depth)
        reports.append(load_imagenet_backbone(model, path))
    if m.get("init_from"):
        reports.append(init_from_torchvision_maskrcnn(model, m.init_from))
    for r in reports:
        log.info("%s", r.summary())
        if r.shape_mismatch:
            log.warning("%s: %d tensors skipped for their shape, e.g. %s", r.source, len(r.shape_mismatch),
                        r.shape_mismatch[0])
    return reports
