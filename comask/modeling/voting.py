"""Dense per-cell box offsets and mask-weighted box voting (CoMask paper, eq. 8-9).

Every cell of the 7x7 grid laid over an RoI predicts the distances (l, t, r, b) from its centre to
the four sides of the object's box, in units of the RoI width / height. Decoding turns them into one
absolute box per cell; voting averages those boxes with the foreground confidence M_s of the cell.

Eq. 8-9 write the vote on (l, t, r, b), but distances measured from different cell centres only
make sense once turned into coordinates, so the weighted mean is taken over the decoded per-cell
box coordinates (x1, y1, x2, y2), as the authors' code does.
"""

from __future__ import annotations

import torch
from torch import Tensor

GRID = 7


def cell_centres(
    size: int = GRID, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Cell centres of a `size` x `size` grid over the unit square, as (size*size, 2) (u, v), row-major."""
    c = (torch.arange(size, device=device, dtype=dtype) + 0.5) / size
    v, u = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([u.reshape(-1), v.reshape(-1)], dim=1)


def _centres_in_image(rois: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Absolute cell centres (N, S*S) x and y, and RoI width / height (N, 1)."""
    uv = cell_centres(size, rois.device, rois.dtype)
    w = (rois[:, 2] - rois[:, 0])[:, None]
    h = (rois[:, 3] - rois[:, 1])[:, None]
    x = rois[:, 0:1] + uv[None, :, 0] * w
    y = rois[:, 1:2] + uv[None, :, 1] * h
    return x, y, w, h


def encode_offsets(rois: Tensor, gt_boxes: Tensor, size: int = GRID) -> Tensor:
    """Offset targets (N, 4, size, size): (x - gx1, y - gy1, gx2 - x, gy2 - y) / (w, h, w, h) of the RoI."""
    x, y, w, h = _centres_in_image(rois, size)
    l_ = (x - gt_boxes[:, 0:1]) / w
    t_ = (y - gt_boxes[:, 1:2]) / h
    r_ = (gt_boxes[:, 2:3] - x) / w
    b_ = (gt_boxes[:, 3:4] - y) / h
    return torch.stack([l_, t_, r_, b_], dim=1).reshape(-1, 4, size, size)


def decode_offsets(rois: Tensor, offsets: Tensor) -> Tensor:
    """Per-cell absolute boxes (N, S*S, 4) xyxy from offsets (N, 4, S, S) predicted over `rois` (N, 4)."""
    size = offsets.shape[-1]
    x, y, w, h = _centres_in_image(rois, size)
    o = offsets.reshape(offsets.shape[0], 4, size * size)
    return torch.stack([x - o[:, 0] * w, y - o[:, 1] * h, x + o[:, 2] * w, y + o[:, 3] * h], dim=2)


def clamp_boxes(boxes: Tensor, image_hw: Tensor, min_size: float = 1.0) -> Tensor:
    """Clip boxes (N, 4) to their image ((N, 2) heights, widths) and keep x2 - x1, y2 - y1 >= min_size.

    A box that falls entirely outside its image becomes a `min_size` box at the nearest edge, so the
    second RoIAlign and the mask paste always get a valid region.
    """
    h = image_hw[:, 0].to(boxes.dtype)
    w = image_hw[:, 1].to(boxes.dtype)
    mw = torch.minimum(torch.full_like(w, min_size), w)
    mh = torch.minimum(torch.full_like(h, min_size), h)
    x1 = torch.minimum(torch.clamp(boxes[:, 0], min=0), w - mw)
    y1 = torch.minimum(torch.clamp(boxes[:, 1], min=0), h - mh)
    x2 = torch.minimum(torch.maximum(boxes[:, 2], x1 + mw), w)
    y2 = torch.minimum(torch.maximum(boxes[:, 3], y1 + mh), h)
    return torch.stack([x1, y1, x2, y2], dim=1)


def vote_boxes(
    rois: Tensor,
    offsets: Tensor,
    fg_conf: Tensor,
    thresh: float = 0.5,
    collaborative: bool = True,
) -> Tensor:
    """One box per RoI (N, 4) from the per-cell boxes.

    rois (N, 4) xyxy; offsets (N, 4, S, S); fg_conf (N, S, S) or (N, 1, S, S): M_s in [0, 1].
    collaborative: cells with M_s > thresh vote with weight M_s (eq. 8-9); if no cell of an RoI passes,
    all its cells vote with weight M_s; if M_s is zero everywhere, the plain mean is used (never NaN).
    Not collaborative ("w/o CL"): the plain mean of all per-cell boxes.
    """
    cell_boxes = decode_offsets(rois, offsets)  # (N, S*S, 4)
    if not collaborative:
        return cell_boxes.mean(dim=1)
    m = fg_conf.flatten(1).to(cell_boxes.dtype)
    passed = m > thresh
    w = torch.where(passed.any(dim=1, keepdim=True), m * passed, m)
    # sigmoid underflows to exactly 0 for very negative logits: fall back to equal weights there
    w = torch.where(w.sum(dim=1, keepdim=True) > 0, w, torch.ones_like(w))
    return (cell_boxes * w[:, :, None]).sum(dim=1) / w.sum(dim=1)[:, None]
