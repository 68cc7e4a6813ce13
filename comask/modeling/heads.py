"""FPN RoI pooling and the classification head of CoMask's RoI stage.

`FPNRoIAlign` does what torchvision's `MultiScaleRoIAlign` does (FPN level rule
k = floor(4 + log2(sqrt(wh) / 224)), clamped to the pooled levels), but with `aligned=True`
RoIAlign: torchvision's pooler hard-codes `aligned=False`, which samples half a pixel off, and the
collaborative head regresses sub-cell box offsets, so the half-pixel shift matters there. Both heads
of the RoI stage use the same pooler so their features agree. The Mask R-CNN baseline uses it too, with
`aligned=False` (torchvision's pooler, same levels), so that both models train with the fast CPU backward
of `comask.modeling.roi_align`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comask.modeling.roi_align import roi_align
from comask.modeling.sync import host_list

FPN_LEVEL_NAMES = ("0", "1", "2", "3")  # P2..P5; P6 ("pool") only feeds the RPN, as in FPN


class FPNRoIAlign(nn.Module):
    """RoIAlign from the FPN level each box belongs to.

    featmap_names: keys of the feature dict, finest first, each level half the size of the previous.
    """

    def __init__(
        self,
        output_size: int,
        sampling_ratio: int = 2,
        featmap_names: tuple[str, ...] = FPN_LEVEL_NAMES,
        canonical_scale: float = 224.0,
        canonical_level: int = 4,
        aligned: bool = True,
    ):
        super().__init__()
        self.output_size = (output_size, output_size)
        self.sampling_ratio = sampling_ratio
        self.featmap_names = tuple(featmap_names)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.aligned = aligned

    @staticmethod
    def _scales(feats: list[Tensor], image_shapes: list[tuple[int, int]]) -> list[float]:
        # Features are computed on the padded batch, so a map is at least (largest image height / stride)
        # high, and up to ~2x more when padding is a large part of a small image (a 40 px image padded to
        # 64 has a 16-row P2): the stride is the power of two just above height / map height. Rounding
        # that ratio to the nearest power of two, as torchvision does, picks stride 2 for that P2.
        max_h = max(s[0] for s in image_shapes)
        return [2.0 ** -math.ceil(math.log2(max_h / f.shape[-2]) - 1e-6) for f in feats]

    def forward(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """boxes: per image (K_i, 4) xyxy in image pixels -> (sum K_i, C, S, S)."""
        feats = [features[k] for k in self.featmap_names]
        scales = self._scales(feats, image_shapes)
        all_boxes = torch.cat(boxes, dim=0)
        batch_idx = torch.cat(
            [
                torch.full((b.shape[0], 1), i, dtype=all_boxes.dtype, device=all_boxes.device)
                for i, b in enumerate(boxes)
            ]
        )
        rois = torch.cat([batch_idx, all_boxes], dim=1)
        if len(feats) == 1:
            return roi_align(feats[0], rois, self.output_size, scales[0], self.sampling_ratio, self.aligned)
        k_min = round(-math.log2(scales[0]))
        k_max = round(-math.log2(scales[-1]))
        wh = ((all_boxes[:, 2] - all_boxes[:, 0]) * (all_boxes[:, 3] - all_boxes[:, 1])).clamp(min=1e-12)
        lvl = torch.floor(self.canonical_level + torch.log2(wh.sqrt() / self.canonical_scale) + 1e-6)
        lvl = lvl.clamp(k_min, k_max).to(torch.int64) - k_min
        if torch.jit.is_tracing():
            # the traced graph must not freeze the per-level counts of the example image
            order = [torch.where(lvl == i)[0] for i in range(len(feats))]
            counts = None
        else:
            # RoIs grouped by level, each level in input order; the per-level counts are the one host read
            # (they size each level's RoIAlign)
            order_all = torch.argsort(lvl, stable=True)
            counts = host_list(torch.zeros(len(feats), dtype=torch.int64, device=lvl.device).index_add_(
                0, lvl, torch.ones_like(lvl)))
            order = list(order_all.split(counts))
        pooled = [
            roi_align(feat, rois[idx], self.output_size, scale, self.sampling_ratio, self.aligned)
            for feat, scale, idx in zip(feats, scales, order)
        ]
        # Put the per-level results back in the input order with a gather (no in-place scatter), which
        # autograd, autocast (levels may differ in dtype) and tracing all handle.
        out = torch.cat([p.to(pooled[0].dtype) for p in pooled], dim=0)
        return out[torch.argsort(torch.cat(order))]


class ClassificationHead(nn.Module):
    """7x7 RoI features -> 2 FC (fc_dim, ReLU) -> C+1 logits (index 0 = background)."""

    def __init__(self, in_channels: int, num_classes: int, fc_dim: int = 1024, pool_size: int = 7):
        super().__init__()
        self.pool_size = pool_size
        self.fc6 = nn.Linear(in_channels * pool_size * pool_size, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.cls_score = nn.Linear(fc_dim, num_classes + 1)
        for fc in (self.fc6, self.fc7):
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.zeros_(self.cls_score.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.fc6(x.flatten(1)))
        x = F.relu(self.fc7(x))
        return self.cls_score(x)
