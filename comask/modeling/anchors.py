"""torchvision's AnchorGenerator with its anchors kept per input size.

The anchors depend only on the padded batch size, the feature grid sizes, dtype and device, yet
torchvision rebuilds them on every call: ~86 operators per image (aranges, meshgrids, stacks per level),
~40 of them kernels on a GPU. Inference at one size, and training at a few, reuse them from a small cache.
Under tracing / ONNX export / torch.compile the anchors are computed as torchvision does, so an exported
graph keeps them as a function of the input size rather than baking in one size's constants.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

CACHE_SIZE = 8  # multi-scale training pads to a handful of sizes; each entry is ~4 MB at 800x1333


def _capturing() -> bool:
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


class CachedAnchorGenerator(AnchorGenerator):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._cache: OrderedDict[tuple, Tensor] = OrderedDict()

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        if _capturing():
            return super().forward(image_list, feature_maps)
        f = feature_maps[0]
        # inference-mode tensors must not reach autograd: they are cached apart from ordinary ones
        key = (tuple(image_list.tensors.shape[-2:]), tuple(tuple(m.shape[-2:]) for m in feature_maps),
               f.dtype, f.device, torch.is_inference_mode_enabled())
        anchors = self._cache.get(key)
        if anchors is None:
            anchors = super().forward(image_list, feature_maps)[0]
            self._cache[key] = anchors
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        # the same tensor for every image: the RPN reads anchors, never writes them
        return [anchors] * len(image_list.image_sizes)
