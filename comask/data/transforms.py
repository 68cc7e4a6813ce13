"""Geometric and photometric transforms as pure functions (easy to property-test).

Masks are kept as COCO segmentations (polygons / RLE) through the geometry and rasterized once,
at the final size, by `rasterize`; horizontal flips are applied to the rasterized masks (an exact
array flip) and to the boxes with the same formula, so the two always agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torchvision.transforms.v2.functional as TF

Segmentation = list[list[float]] | dict[str, Any]


def resize_shape(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """Output (h, w): shorter side `short`, longer side at most `max_size`, aspect ratio kept."""
    scale = short / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a (3, H, W) uint8 or float tensor with antialiased bilinear interpolation."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return TF.resize(image, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def scale_boxes(boxes: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    """Scale (N, 4) xyxy boxes by sx horizontally and sy vertically."""
    return boxes * torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype)


def hflip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Mirror (N, 4) xyxy boxes in an image `width` pixels wide (x -> width - x)."""
    out = boxes.clone()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(0, width)
    out[:, 1::2] = out[:, 1::2].clamp(0, height)
    return out


def hflip_masks(masks: torch.Tensor) -> torch.Tensor:
    return masks.flip(-1)


def hflip_image(image: torch.Tensor) -> torch.Tensor:
    return image.flip(-1)


def scale_polygons(polygons: Sequence[Sequence[float]], sx: float, sy: float) -> list[list[float]]:
    """Scale COCO polygons [[x0, y0, x1, y1, ...], ...]; continuous pixel coordinates scale linearly."""
    out = []
    for poly in polygons:
        p = np.asarray(poly, dtype=np.float64).reshape(-1, 2) * (sx, sy)
        out.append(p.reshape(-1).tolist())
    return out


def hflip_polygons(polygons: Sequence[Sequence[float]], width: int) -> list[list[float]]:
    out = []
    for poly in polygons:
        p = np.asarray(poly, dtype=np.float64).reshape(-1, 2).copy()
        p[:, 0] = width - p[:, 0]
        out.append(p.reshape(-1).tolist())
    return out


def _decode(segm: Segmentation, height: int, width: int) -> np.ndarray:
    if isinstance(segm, list):
        rles = mask_utils.frPyObjects(segm, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segm["counts"], list):
        # uncompressed RLE: its own `size` is authoritative (checked against the image upstream)
        h, w = segm["size"]
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = dict(segm)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle)


def rasterize(
    segmentations: Sequence[Segmentation], orig_size: tuple[int, int], out_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Rasterize COCO segmentations of an image of `orig_size` (h, w) at `out_size` -> (N, h', w') uint8.

    Polygons are scaled and rasterized directly at the output size; RLEs are decoded at their own
    size and resized with nearest-neighbour sampling. Only one full-size mask exists at a time.
    """
    return torch.from_numpy(rasterize_np(segmentations, orig_size, out_size))


def rasterize_np(
    segmentations: Sequence[Segmentation], orig_size: tuple[int, int], out_size: tuple[int, int] | None = None
) -> np.ndarray:
    """`rasterize` in numpy: single-threaded copies, which stay fast when torch threads compete for cores."""
    h, w = orig_size
    oh, ow = out_size or orig_size
    out = np.zeros((len(segmentations), oh, ow), dtype=np.uint8)
    for i, segm in enumerate(segmentations):
        if isinstance(segm, list):
            polys = segm if (oh, ow) == (h, w) else scale_polygons(segm, ow / w, oh / h)
            m = _decode(polys, oh, ow)
        else:
            m = _decode(segm, h, w)
            if m.shape != (oh, ow):
                m = _resize_nearest(m, oh, ow)
        out[i] = m
    return out


def _resize_nearest(m: np.ndarray, oh: int, ow: int) -> np.ndarray:
    # sample at output pixel centres, the same convention as the bilinear image resize
    ys = np.minimum(((np.arange(oh) + 0.5) * m.shape[0] / oh).astype(np.int64), m.shape[0] - 1)
    xs = np.minimum(((np.arange(ow) + 0.5) * m.shape[1] / ow).astype(np.int64), m.shape[1] - 1)
    return m[ys[:, None], xs[None, :]]


def photometric_jitter(
    image: torch.Tensor,
    generator: torch.Generator | None = None,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
) -> torch.Tensor:
    """Random brightness/contrast/saturation in random order on a float (3, H, W) image in [0, 1]."""

    def factor(amount: float) -> float:
        return float(1.0 + (torch.rand((), generator=generator) * 2 - 1) * amount)

    ops = [
        lambda x: TF.adjust_brightness(x, factor(brightness)),
        lambda x: TF.adjust_contrast(x, factor(contrast)),
        lambda x: TF.adjust_saturation(x, factor(saturation)),
    ]
    for k in torch.randperm(3, generator=generator).tolist():
        image = ops[k](image)
    return image.clamp_(0.0, 1.0)
