"""Overlay drawing for predictions: translucent masks with outlines, boxes and "name score" labels (PIL only)."""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def instance_colors(n: int) -> np.ndarray:
    """n well-separated RGB colours (golden-ratio hue steps), stable for a given index."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        h = (0.07 + i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.95)
        out[i] = (int(r * 255), int(g * 255), int(b * 255))
    return out


def _outline(mask: np.ndarray) -> np.ndarray:
    # a pixel is on the outline when it is inside and one of its 4 neighbours is outside
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def draw_instances(image: np.ndarray, instances: Mapping[str, Any], class_names: Sequence[str] | None = None,
                   *, alpha: float = 0.45) -> np.ndarray:
    """Draw `instances` over an (H, W, 3) uint8 RGB image and return a new uint8 image.

    `instances` holds numpy arrays `boxes` (N, 4) xyxy, `scores` (N,), `labels` (N,) contiguous 1..C and
    optionally `masks` (N, H, W) bool and `class_names` (N names). Label text is the class name (from
    `instances["class_names"]`, else `class_names[label - 1]`, else the label number) and the score.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image must be an (H, W, 3) uint8 array, got {img.shape} {img.dtype}")
    h, w = img.shape[:2]
    boxes = np.asarray(instances.get("boxes", np.zeros((0, 4))), dtype=np.float32).reshape(-1, 4)
    n = len(boxes)
    scores = np.asarray(instances.get("scores", np.ones(n)), dtype=np.float32).reshape(-1)
    labels = np.asarray(instances.get("labels", np.zeros(n)), dtype=np.int64).reshape(-1)
    names = instances.get("class_names")
    masks = instances.get("masks")
    colors = instance_colors(n)
    out = img.astype(np.float32)
    # paint low-scoring instances first so the most confident masks end up on top
    order = np.argsort(scores, kind="stable")
    if masks is not None and n:
        masks = np.asarray(masks)
        if masks.shape[-2:] != (h, w):
            raise ValueError(f"masks are {masks.shape[-2:]} but the image is {(h, w)}")
        for i in order:
            m = masks[i].astype(bool)
            if not m.any():
                continue
            out[m] = out[m] * (1.0 - alpha) + colors[i] * alpha
            out[_outline(m)] = colors[i]
    canvas = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = _font(max(10, min(h, w) // 40))
    width = max(1, min(h, w) // 300)
    for i in order:
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        color = tuple(int(c) for c in colors[i])
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=color, width=width)
        if names is not None and i < len(names):
            name = str(names[i])
        elif class_names is not None and 1 <= labels[i] <= len(class_names):
            name = str(class_names[labels[i] - 1])
        else:
            name = str(int(labels[i]))
        text = f"{name} {scores[i]:.2f}"
        tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), text, font=font)
        tw, th = tx1 - tx0, ty1 - ty0
        # the label sits above the box, or inside it when the box touches the top edge
        lx = min(max(0.0, x0), max(0.0, w - tw - 4))
        ly = y0 - th - 4 if y0 - th - 4 >= 0 else max(0.0, y0)
        draw.rectangle([lx, ly, lx + tw + 4, ly + th + 4], fill=color)
        draw.text((lx + 2 - tx0, ly + 2 - ty0), text, fill=(0, 0, 0) if sum(color) > 380 else (255, 255, 255),
                  font=font)
    return np.asarray(canvas)
