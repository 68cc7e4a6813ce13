"""The CoMask detector: (M)FPN backbone -> RPN -> classification + collaborative RoI heads.

The class only composes parts; `comask.modeling.build.build_model` makes them from a config, and
tests inject their own. Interface as torchvision's detection models (see docs/DESIGN.md):
`model(images, targets)` -> dict of losses in train mode, `model(images)` -> list of
`{boxes, labels, scores, masks (N,1,H,W)}` in the input images' pixels in eval mode.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from comask.modeling.paste import paste_masks


class TwoStageDetector(GeneralizedRCNN):
    """transform -> backbone -> rpn -> roi_heads -> transform.postprocess (torchvision's flow).

    `backbone` maps a padded image batch to an OrderedDict of feature maps and has `.out_channels`;
    `rpn` is a torchvision RegionProposalNetwork (or anything with its signature); `roi_heads` has
    torchvision RoIHeads' forward signature and returns per-image dicts with 28x28 mask
    probabilities aligned to the boxes, which `predict` pastes into the image (comask.modeling.paste).
    """

    model_type = "two_stage"

    def __init__(
        self,
        backbone: nn.Module,
        rpn: nn.Module,
        roi_heads: nn.Module,
        transform: GeneralizedRCNNTransform,
    ):
        super().__init__(backbone, rpn, roi_heads, transform)
        # working memory of the mask paste beyond its output (None: the device's default, paste.DEFAULT_BUDGET_MB)
        self.paste_budget_mb: float | None = None

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if self.training:
            return super().forward(images, targets)
        return self.predict(images)

    @torch.no_grad()
    def predict(
        self,
        images: list[Tensor],
        *,
        score_thr: float = 0.0,
        max_det: int | None = None,
        mask_thr: float | None = None,
    ) -> list[dict[str, Tensor]]:
        """Eval-mode inference: per image `{boxes, labels, scores, masks (N, 1, H, W)}` in its own pixels.

        Detections scoring below `score_thr`, and all but the best `max_det`, are dropped *before* the
        masks are pasted, so memory grows with the detections kept, not with the RoI heads' output.
        mask_thr None: masks are probabilities (torchvision's detection interface, what `forward` returns);
        a number: bool masks of the pixels above it (a quarter of the memory, the form Predictor uses).
        """
        # while tracing for export the sizes are 0-d tensors (kept so the graph follows the input size)
        sizes = [(im.shape[-2], im.shape[-1]) for im in images]
        batch, _ = self.transform(images, None)
        features = self.backbone(batch.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, _ = self.rpn(batch, features, None)
        detections, _ = self.roi_heads(features, proposals, batch.image_sizes, None)
        return [
            self._finish(det, seen, orig, score_thr, max_det, mask_thr)
            for det, seen, orig in zip(detections, batch.image_sizes, sizes)
        ]

    def _finish(
        self,
        det: dict[str, Tensor],
        seen: tuple[int, int],
        orig: tuple[int, int],
        score_thr: float,
        max_det: int | None,
        mask_thr: float | None,
    ) -> dict[str, Tensor]:
        """One image's RoI-head output -> trimmed, in the original image's pixels, masks pasted."""
        det = dict(det)
        if score_thr > 0:
            # the number kept must be known to size the outputs: one host read (a nonzero)
            keep = torch.where(det["scores"] >= score_thr)[0]
            det = {k: v[keep] for k, v in det.items()}
        if max_det is not None and det["scores"].shape[0] > max_det:
            # the RoI heads return detections best first; a stable sort keeps that order for equal scores
            top = torch.argsort(det["scores"], descending=True, stable=True)[:max_det]
            det = {k: v[top] for k, v in det.items()}
        det["boxes"] = _resize_boxes(det["boxes"], seen, orig)
        if "masks" in det:
            det["masks"] = paste_masks(det["masks"], det["boxes"], orig, mask_thr, self.paste_budget_mb)
        return det


def _resize_boxes(boxes: Tensor, seen: tuple[int, int], orig: tuple[int, int]) -> Tensor:
    """Boxes from the resized image's pixels to the original's, with torchvision's float32 ratios."""
    if torch.jit.is_tracing() or any(isinstance(v, Tensor) for v in (*seen, *orig)):
        return resize_boxes(boxes, list(seen), list(orig))
    # the ratios as float32 on the host (torchvision divides two float32 tensors on the device: same values)
    rh = float(np.float32(orig[0]) / np.float32(seen[0]))
    rw = float(np.float32(orig[1]) / np.float32(seen[1]))
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * rw, y1 * rh, x2 * rw, y2 * rh), dim=1)


class CoMask(TwoStageDetector):
    """CoMask (paper sec. 3): MFPN features, a standard RPN, the classification head and the
    collaborative head (dense offsets + coarse masks -> mask-weighted box voting -> final mask)."""

    model_type = "comask"
