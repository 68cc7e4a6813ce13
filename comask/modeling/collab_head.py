"""The collaborative head network (CoMask paper sec. 3.2; docs/DESIGN.md).

14x14 RoI features -> 3x3 conv stride 2 (14 -> 7) -> `num_convs` x (3x3 conv, GN, ReLU) = X;
X -> 3x3 conv -> 4 channels -> exp: dense (l, t, r, b) offsets at 7x7 (the paper says ReLU; see below);
X -> 2 x (deconv 2x2 stride 2, GN, ReLU) -> 3x3 conv -> C+1 coarse mask logits at 28x28; with `mask_skip` (not
in the paper; on in the CPU configs) a zero-initialised 1x1 conv of the 14x14 input is added to the first
deconv's output.

The stride-2 conv also has GN + ReLU, as in the D2Det head the authors built on. Only one class's
mask is ever used per RoI (the ground-truth class in training, the predicted class at test), so the
last conv is evaluated for that class alone instead of for all C+1 channels: at 81 classes the full
conv (and its backward) would otherwise be the most expensive layer of the head.

Two choices differ from the paper / the first version, measured on the 4-image overfit set of
tests/test_model_overfit.py:
- Offsets are exp(conv) (clamped at 8 RoI units, the gradient passed through the clamp), not ReLU(conv):
  with ReLU one large step could push all four distances of a cell below 0, so that -log IoU sat at its
  clamp with a zero gradient and the offsets stayed dead. With exp, -log IoU is, per side, the absolute
  difference of log distances, so its gradient w.r.t. the conv output is bounded by 1 (FCOS uses exp for
  the same reason). docs/DESIGN.md, "Offsets and their loss".
- The mask logits conv is initialised like torchvision's / mmdetection's mask predictor (Kaiming normal,
  fan_out), not N(0, 1e-3): a 1e-3 readout scaled every gradient reaching the tower down ~20x.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comask.modeling.backbone import gn_groups

# distances in RoI units: 8 is far beyond any box an RoI matched at IoU >= 0.5 can have; 1e-3 keeps exp from
# underflowing to an empty box
_LOG_MAX_OFFSET = math.log(8.0)
_LOG_MIN_OFFSET = math.log(1e-3)


def _conv_gn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(gn_groups(cout), cout),
        nn.ReLU(inplace=True),
    )


class HeadFeatures(NamedTuple):
    """What both branches read: the tower output X at 7x7 and, with `mask_skip`, a 14x14 map for the mask."""

    tower: Tensor
    skip: Tensor | None


class CollaborativeHead(nn.Module):
    def __init__(
        self, in_channels: int, num_classes: int, conv_dim: int = 256, num_convs: int = 9, mask_skip: bool = False
    ):
        super().__init__()
        self.num_classes = num_classes
        layers = [_conv_gn_relu(in_channels, conv_dim, stride=2)]
        layers += [_conv_gn_relu(conv_dim, conv_dim) for _ in range(num_convs)]
        self.tower = nn.Sequential(*layers)
        self.offset_pred = nn.Conv2d(conv_dim, 4, 3, padding=1)
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(conv_dim, conv_dim, 2, stride=2, bias=False),
            nn.GroupNorm(gn_groups(conv_dim), conv_dim),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(conv_dim, conv_dim, 2, stride=2, bias=False),
            nn.GroupNorm(gn_groups(conv_dim), conv_dim),
            nn.ReLU(inplace=True),
        )
        self.mask_pred = nn.Conv2d(conv_dim, num_classes + 1, 3, padding=1)
        # A 1x1 projection of the 14x14 RoI features, added to the first deconv's 14x14 output (a U-Net style
        # skip). Without it the mask only sees the 7x7 tower; measured on shapes-bench in docs/BENCHMARKS.md,
        # tuning table (14x14 mask skip).
        self.mask_skip = nn.Conv2d(in_channels, conv_dim, 1, bias=False) if mask_skip else None
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # std 0.01 as FCOS's distance predictor: at 1e-3 the offset loss barely reached the tower early on
        nn.init.normal_(self.offset_pred.weight, std=0.01)
        # Start every cell at distance 0.5 RoI units from each side (the RoI's own box seen from its central
        # cell), so the first decoded boxes are sensible.
        nn.init.constant_(self.offset_pred.bias, math.log(0.5))
        # mask_pred keeps the Kaiming init of the loop above (see the module docstring)
        if self.mask_skip is not None:
            # Zero: the head starts as the paper's (mask from the 7x7 tower alone) and the skip grows in
            # as the mask loss asks for it. Kaiming-initialised (leaning, as we read it, on the raw 14x14
            # features from step 0), shapes-bench mask APl rose but APs and AP fell (docs/BENCHMARKS.md,
            # tuning table).
            nn.init.zeros_(self.mask_skip.weight)

    def features(self, x: Tensor) -> HeadFeatures:
        """(N, in, 14, 14) -> X (N, conv_dim, 7, 7) and the optional 14x14 skip."""
        return HeadFeatures(self.tower(x), None if self.mask_skip is None else self.mask_skip(x))

    def offsets(self, feat: HeadFeatures) -> Tensor:
        """X -> (N, 4, 7, 7) positive (l, t, r, b) in units of the RoI size."""
        # float32: the exp, the decoded boxes and the IoU loss are not safe in half precision.
        # exp keeps every distance alive (ReLU units died at lr 0.02); the clamp keeps a wild early step from
        # overflowing or underflowing but passes the gradient through: a plain clamp has zero gradient beyond
        # its bounds, so cells that overshot stayed there for good (the constant offset loss of ~11).
        x = self.offset_pred(feat.tower).float()
        return torch.exp(x + (x.clamp(_LOG_MIN_OFFSET, _LOG_MAX_OFFSET) - x).detach())

    def mask_logits(self, feat: HeadFeatures, classes: Tensor | None = None) -> Tensor:
        """X (+ skip) -> (N, C+1, 28, 28) logits, or (N, 1, 28, 28) for `classes` (N,) only."""
        up = self.upsample[0](feat.tower)
        if feat.skip is not None:
            up = up + feat.skip
        up = self.upsample[1:](up)
        if classes is None:
            return self.mask_pred(up)
        n, c, h, w = up.shape
        k = self.mask_pred.kernel_size[0]
        # A 3x3 conv with one output channel per RoI: a batched matmul of the RoI's class filter taps with
        # its features (N, k*k, h*w), then the k*k tap maps summed at their shifts, which is exactly what
        # fold (col2im) does once the taps are reversed. ~20x cheaper than the full C+1-channel conv (forward
        # + backward), exact up to float rounding, and a handful of kernels instead of one per tap.
        taps = self.mask_pred.weight[classes].reshape(n, c, k * k).flip(2).transpose(1, 2)
        z = torch.bmm(taps, up.reshape(n, c, h * w))
        out = F.fold(z, (int(h), int(w)), k, padding=k // 2)
        return out + self.mask_pred.bias[classes][:, None, None, None]

    def forward(self, x: Tensor, classes: Tensor | None = None) -> tuple[Tensor, Tensor]:
        feat = self.features(x)
        return self.offsets(feat), self.mask_logits(feat, classes)


def fg_confidence(mask_logits: Tensor, grid: int = 7) -> Tensor:
    """M_s: sigmoid of a (N, 1, 28, 28) mask, average-pooled to (N, 1, grid, grid)."""
    p = mask_logits.sigmoid()
    n, c, h, w = p.shape
    if not torch.jit.is_tracing() and (h % grid or w % grid):
        return F.adaptive_avg_pool2d(p, grid)
    # The same average as adaptive pooling when the size is a multiple of the grid (28 = 4 x 7), written
    # as reshape + mean because the ONNX exporter cannot export adaptive pooling of a map whose traced
    # size it does not know.
    return p.reshape(n, c, grid, h // grid, grid, w // grid).mean(dim=(3, 5))
