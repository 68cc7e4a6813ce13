"""MSFEM (paper sec. 3.1; docs/DESIGN.md, "Model") and its two placements in the feature pyramid.

- `in_fpn` (`msfem_in_fpn`, the authors' code): the MSFEM replaces the FPN's 3x3 output conv on
  P2..P5, its own 3x3 conv doing that conv's job; P6 is the stride-2 max-pool of the MSFEM'd P5.
- `after_fpn` (`MFPN`, the paper's text): a standard FPN P2..P6, then one MSFEM per level.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from comask.config import ConfigError
from comask.modeling.backbone import LEVEL_NAMES, gn_groups

PLACEMENTS = ("in_fpn", "after_fpn")
# how the 1x1 fusion starts (MSFEM's docstring)
FUSION_INITS = ("kaiming", "identity")
MAX_BRANCHES = 6


def check_msfem_config(msfem, source: str = "config") -> None:
    """ConfigError for `model.msfem` keys outside the module's vocabulary."""
    if msfem.branches not in range(MAX_BRANCHES + 1):
        raise ConfigError(f"{source}: model.msfem.branches must be 0..{MAX_BRANCHES} (0 = plain FPN), "
                          f"got {msfem.branches!r}")
    if not msfem.branches:
        return
    if msfem.get("fusion_init", "kaiming") not in FUSION_INITS:
        raise ConfigError(f"{source}: model.msfem.fusion_init must be one of {', '.join(FUSION_INITS)}, "
                          f"got {msfem.fusion_init!r}")
    if msfem.get("placement", "after_fpn") not in PLACEMENTS:
        raise ConfigError(f"{source}: model.msfem.placement must be one of {', '.join(PLACEMENTS)}, "
                          f"got {msfem.placement!r}")


class MSFEM(nn.Module):
    """Multi-scale feature extraction with channel attention.

    F_0 = F; F_i = C2(F_{i-1}) for i = 1..B-1 (3x3 stride-2 conv + GN + ReLU), each upsampled
    bilinearly to F's size; F_f = conv1x1(cat(F_0..F_{B-1})); V2 = sigmoid(fc(relu(fc(gap(F_f)))));
    y = F_f * V2; F_o = ReLU(y + GN(conv3x3(y))) if `residual` else conv3x3(y).

    On a map that reaches 1x1 before the chain ends, the chain stops: a 1x1 map has no coarser
    scale, so the remaining branches repeat it (the global summary) instead of running convs on it.

    `fusion_init="identity"` starts the 1x1 fusion as F_f = F_0 (identity on the input's slice, zero on
    the coarser branches'), so at step 0 the module is the output conv on the channel-attended input,
    as plain FPN's output conv is on its input, and the coarser scales enter as training opens them.
    """

    def __init__(
        self, channels: int, branches: int, residual: bool = True, reduction: int = 4, fusion_init: str = "kaiming"
    ):
        super().__init__()
        if branches < 1:
            raise ValueError(f"MSFEM needs at least one branch, got {branches} (use no MSFEM for plain FPN)")
        if fusion_init not in FUSION_INITS:
            raise ValueError(f"MSFEM fusion_init must be one of {', '.join(FUSION_INITS)}, got {fusion_init!r}")
        self.channels = channels
        self.branches = branches
        self.residual = residual
        groups = gn_groups(channels)
        self.down = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False),
                nn.GroupNorm(groups, channels),
                nn.ReLU(inplace=True),
            )
            for _ in range(branches - 1)
        )
        self.fuse = nn.Conv2d(channels * branches, channels, 1)
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        self.out_conv = nn.Conv2d(channels, channels, 3, padding=1, bias=not residual)
        self.out_norm = nn.GroupNorm(groups, channels) if residual else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if fusion_init == "identity":
            with torch.no_grad():
                self.fuse.weight.zero_()
                self.fuse.weight[:, :channels, 0, 0].copy_(torch.eye(channels))

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        # conv1x1(cat(up(F_i))) == sum_i up(W_i F_i): bilinear resizing is linear and acts per
        # channel, so the 1x1 fusion commutes with it. Applying each slice of the fusion weight at the
        # branch's own (smaller) resolution avoids building the B*C-channel concatenation at full size.
        # The slices are made contiguous: a strided weight sends the CPU convolution to its slow
        # im2col path (~3x the time of the 1x1 conv at P2 by torch.profiler).
        w = self.fuse.weight.split(self.channels, dim=1)
        fused = F.conv2d(x, w[0].contiguous(), self.fuse.bias)
        cur = x
        for i, down in enumerate(self.down, start=1):
            if cur.shape[-2] > 1 or cur.shape[-1] > 1:
                cur = _down_step(down, cur)
            part = F.conv2d(cur, w[i].contiguous())
            # in place: the sum's backward needs neither operand, and at P2 each full-size temporary
            # costs an allocation of the whole map
            fused.add_(F.interpolate(part, size=size, mode="bilinear", align_corners=False))
        att = torch.sigmoid(self.fc2(F.relu(self.fc1(fused.mean(dim=(2, 3))))))
        y = fused * att[:, :, None, None]
        if self.out_norm is None:
            return self.out_conv(y)
        # GroupNorm's backward reads its input, not its output, so the residual sum can reuse it
        return F.relu(self.out_norm(self.out_conv(y)).add_(y), inplace=True)


def _down_step(down: nn.Module, x: Tensor) -> Tensor:
    """One stride-2 step of the chain. On the CPU, oneDNN's reduced-precision convolution returns garbage
    weight gradients (NaN in about half of random draws, torch 2.14) for inputs one pixel wide, which the
    chain reaches on small or elongated images; such maps are tiny, so they run in float32."""
    if x.device.type == "cpu" and min(x.shape[-2:]) == 1 and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return down(x.float())
    return down(x)


class MFPN(nn.Module):
    """FPN backbone followed by one MSFEM per output level (P2..P6, separate weights).

    Takes the `body` and `fpn` of a torchvision BackboneWithFPN so that state-dict keys stay
    `body.*` / `fpn.*` as in torchvision's detectors; the MSFEMs live under `msfem.p2` .. `msfem.p6`.
    """

    def __init__(
        self,
        fpn_backbone: nn.Module,
        branches: int,
        residual: bool = True,
        reduction: int = 4,
        fusion_init: str = "kaiming",
    ):
        super().__init__()
        self.body = fpn_backbone.body
        self.fpn = fpn_backbone.fpn
        self.out_channels: int = fpn_backbone.out_channels
        self.msfem = nn.ModuleDict(
            {name: MSFEM(self.out_channels, branches, residual, reduction, fusion_init) for name in LEVEL_NAMES}
        )

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = self.fpn(self.body(x))
        if len(feats) != len(self.msfem):
            raise RuntimeError(f"MFPN expects {len(self.msfem)} pyramid levels, the FPN gave {len(feats)}")
        return OrderedDict(
            (key, module(feat)) for (key, feat), module in zip(feats.items(), self.msfem.values())
        )


def msfem_in_fpn(
    fpn_backbone: nn.Module,
    branches: int,
    residual: bool = True,
    reduction: int = 4,
    fusion_init: str = "kaiming",
) -> nn.Module:
    """Put one MSFEM in place of each 3x3 output conv of a torchvision BackboneWithFPN (P2..P5).

    torchvision's FPN applies `fpn.layer_blocks[i]` to the top-down sum of level i, and
    LastLevelMaxPool pools the last of those results, so after the swap P6 is the max-pool of the
    MSFEM'd P5, as in the authors' code. The backbone is changed in place and returned; its state-dict
    keys stay torchvision's, the MSFEMs under `fpn.layer_blocks.{0..3}.*` (no `.0.` of a conv).
    """
    fpn = fpn_backbone.fpn
    if not isinstance(fpn.extra_blocks, LastLevelMaxPool):
        raise ValueError("msfem_in_fpn needs an FPN whose extra level is LastLevelMaxPool (P6 = pooled P5)")
    for i in range(len(fpn.layer_blocks)):
        fpn.layer_blocks[i] = MSFEM(fpn_backbone.out_channels, branches, residual, reduction, fusion_init)
    return fpn_backbone


def msfem_levels(backbone: nn.Module) -> OrderedDict[str, tuple[str, MSFEM]]:
    """{level: (module path inside the backbone, MSFEM)} for either placement; empty for plain FPN.

    Lets benchmarks and tests find the MSFEMs without knowing where the config placed them.
    """
    if isinstance(backbone, MFPN):
        return OrderedDict((k, (f"msfem.{k}", m)) for k, m in backbone.msfem.items())
    blocks = getattr(getattr(backbone, "fpn", None), "layer_blocks", ())
    return OrderedDict(
        (LEVEL_NAMES[i], (f"fpn.layer_blocks.{i}", m)) for i, m in enumerate(blocks) if isinstance(m, MSFEM)
    )
