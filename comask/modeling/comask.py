"""The CoMask detector: (M)FPN backbone -> RPN -> classification + collaborative RoI heads.

The class only composes parts; `comask.modeling.build.build_model` makes them from a config, and
tests inject their own. Interface as torchvision's detection models (see docs/DESIGN.md):
`model(images, targets)` -> dict of losses in train mode, `model(images)` -> list of
`{boxes, labels, scores, masks (N,1,H,W)}` in the input images' pixels in eval mode.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.transform import GeneralizedRCNNTransform


class TwoStageDetector(GeneralizedRCNN):
    """transform -> backbone -> rpn -> roi_heads -> transform.postprocess (torchvision's flow).

    `backbone` maps a padded image batch to an OrderedDict of feature maps and has `.out_channels`;
    `rpn` is a torchvision RegionProposalNetwork (or anything with its signature); `roi_heads` has
    torchvision RoIHeads' forward signature and returns per-image dicts with 28x28 mask
    probabilities aligned to the boxes, which `transform.postprocess` pastes into the image.
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


class CoMask(TwoStageDetector):
    """CoMask (paper sec. 3): MFPN features, a standard RPN, the classification head and the
    collaborative head (dense offsets + coarse masks -> mask-weighted box voting -> final mask)."""

    model_type = "comask"
