"""Shared by the exporters: the traceable inference module, input sizes, metadata.

Both exporters trace one module: one float (3, H, W) image in [0, 1] -> (boxes (N, 4) xyxy, labels (N,)
int64, scores (N,), masks (N, 1, H, W) probabilities), all in the input image's pixels. It is the
detector itself (normalisation, test-time resize, RPN, RoI heads, the collaborative head's second
pass, mask pasting) with the list-of-dicts interface unpacked, so an exported graph needs no Python
pre- or post-processing beyond what `comask.engine.predict` does for the PyTorch model too.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor, nn

from comask.modeling.roi_heads import CoMaskRoIHeads

OUTPUT_NAMES = ("boxes", "labels", "scores", "masks")
INPUT_NAME = "image"


class InferenceModule(nn.Module):
    """A torchvision-style detection model with a tensor-in, tuple-out signature (tracing needs one)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # The wrapper too: exporters restore the mode they found, and a module in training mode would
        # switch the detector back to computing losses.
        self.eval()

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out = self.model([image])[0]
        return out["boxes"], out["labels"], out["scores"], out["masks"]


def onnx_friendly(model: nn.Module) -> nn.Module:
    """Set the CoMask RoI stage of `model` (in place) to pad its inference passes, so that images without
    detections run in ONNX Runtime (`CoMaskRoIHeads.pad_rois`). Mask R-CNN's heads need nothing."""
    heads = getattr(model, "roi_heads", None)
    if isinstance(heads, CoMaskRoIHeads):
        heads.pad_rois = True
    return model


def default_size(cfg: Any) -> tuple[int, int]:
    """The config's test size: shorter side `input.min_size_test`, longer side `input.max_size_test`,
    as a landscape HxW (what the model's own resize produces for a wide image)."""
    lo, hi = int(cfg.input.min_size_test), int(cfg.input.max_size_test)
    return min(lo, hi), max(lo, hi)


def example_image(size: tuple[int, int], seed: int = 0) -> Tensor:
    """A deterministic textured image to trace with (values only steer which branches print warnings;
    the traced graph does not depend on them, data-dependent sizes stay dynamic)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    return torch.rand(3, h, w, generator=g)


def metadata(classes: list[str], cat_ids: list[int], cfg: Any, size: tuple[int, int] | None,
             weights: str) -> dict[str, str]:
    """String key/values stored in the exported file: what the runtime backend needs to label outputs."""
    return {
        "comask.classes": json.dumps(list(classes)),
        "comask.cat_ids": json.dumps([int(c) for c in cat_ids]),
        "comask.model_type": str(cfg.model.type),
        "comask.input": "dynamic" if size is None else f"{size[0]}x{size[1]}",
        "comask.weights": str(weights),
        "comask.score_thresh": str(float(cfg.model.test.score_thresh)),
        "comask.mask_thresh": str(float(cfg.model.test.mask_thresh)),
    }
