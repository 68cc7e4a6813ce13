"""Models: ResNet-(M)FPN backbones, the CoMask detector and the Mask R-CNN baseline."""

from comask.modeling.build import build_model

__all__ = ["build_model"]
