"""Pasting 28x28 RoI masks into the image, for all detections at once and only inside their boxes.

The rule is torchvision's `paste_masks_in_image` (what the models' outputs have always been): the M x M
mask is padded by one zero pixel on each side, its box is scaled by (M + 2) / M about the centre and
truncated to integers, the padded mask is resized bilinearly (align_corners=False) to the box's
(y2 - y1 + 1) x (x2 - x1 + 1) pixels and written at the box, clipped to the image; everything else is 0.
torchvision does that one detection at a time (a dozen host reads each) and into a full-image float map
per detection. Here the same source indices and weights are computed on the device for a chunk of
detections at once, over a window the size of the largest box of the chunk, and the output may be bool
(thresholded): memory is the (N, H, W) result plus a workspace bounded by `budget_mb`. Indices and weights
are bitwise torchvision's; the blended values agree to within 3e-7 (ATen's compiled kernel rounds its
multiply-adds differently), so a thresholded pixel can differ only where the probability is that close to
the threshold.

One host read per call: the boxes' pixel extents, because the windows' shapes must be known to allocate
them (and to plan the chunks). While tracing (ONNX / TorchScript export) torchvision's own loop runs.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks, paste_masks_in_image

from comask.modeling.sync import host_list

# Workspace bytes per window pixel: three float32 maps live at once, the int64 target index and two bool masks
_BYTES_PER_PIXEL = 3 * 4 + 8 + 2
# Per device: on a GPU each chunk costs ~25 kernel launches, so fewer, larger chunks (detectron2 allows 1 GB);
# on the CPU a chunk costs nothing extra and memory is the point.
DEFAULT_BUDGET_MB = {"cpu": 128.0, "cuda": 1024.0}


def _fma(a: Tensor, b: Tensor, c: float) -> Tensor:
    """float32 a * b + c with one rounding, as ATen's compiled CPU kernel computes its source coordinates."""
    return torch.add(a.double() * b.double(), c).float()


def _axis(start: Tensor, length: Tensor, size: int, steps: int, m: int) -> tuple[Tensor, Tensor]:
    """Per detection and window step along one axis, packed: int64 (K, S, 3) image coordinate (-1 outside
    the box or the image), source indices i0, i1; float32 (K, S, 2) their weights.

    start (K,) first box pixel (may be < 0); length (K,) box pixels; size: the image side; steps: window
    length; m: padded mask side. Mirrors ATen's CPU bilinear (align_corners=False) index and weight rule.
    """
    lo = start.clamp(min=0)
    hi = torch.minimum(start + length, torch.full_like(start, size))
    pos = lo[:, None] + torch.arange(steps, device=start.device)[None]  # (K, S) image coordinate
    local = (pos - start[:, None]).to(torch.float32)  # pixel index inside the resized box
    scale = (torch.full_like(length, m, dtype=torch.float32) / length.to(torch.float32))[:, None]
    src = _fma(scale, local + 0.5, -0.5).clamp(min=0.0)
    i0 = src.floor().to(torch.int64).clamp(0, m - 1)  # 0: a NaN box must not index out of the mask
    lam1 = (src - i0.to(torch.float32)).clamp(0.0, 1.0)
    i1 = i0 + (i0 < m - 1).to(torch.int64)
    pos = pos.masked_fill(pos >= hi[:, None], -1)
    # (ATen copies when length == m; the rule above gives the same: source index = pixel index, weights 1 and 0)
    return torch.stack([pos, i0, i1], dim=2), torch.stack([1.0 - lam1, lam1], dim=2)


def _paste_chunk(
    out_flat: Tensor, det: Tensor, masks: Tensor, rows: tuple[Tensor, Tensor], cols: tuple[Tensor, Tensor],
    hw: tuple[int, int], threshold: float | None,
) -> None:
    """Paste detections `det` (K,) (padded masks (K, m, m); their `_axis` tables cut to the chunk's window)
    into out_flat (N*H*W + 1)."""
    h_img, w_img = hw
    m = masks.shape[-1]
    (ys, y0, y1), (wy0, wy1) = rows[0].unbind(2), rows[1].unbind(2)
    (xs, x0, x1), (wx0, wx1) = cols[0].unbind(2), cols[1].unbind(2)
    k, wh, ww = det.shape[0], ys.shape[1], xs.shape[1]
    # Along x on the two source rows of every window row, then along y: the association of ATen's kernel.
    # (K, Wy, m) rows are small; the (K, Wy, Wx) maps are the workspace, updated in place where possible.
    gx0 = x0[:, None, :].expand(k, wh, ww)
    gx1 = x1[:, None, :].expand(k, wh, ww)

    def along_x(src_rows: Tensor) -> Tensor:
        t = torch.gather(src_rows, 2, gx0).mul_(wx0[:, None, :])
        return t.add_(torch.gather(src_rows, 2, gx1).mul_(wx1[:, None, :]))

    val = along_x(torch.gather(masks, 1, y0[:, :, None].expand(k, wh, m))).mul_(wy0[:, :, None])
    val.add_(along_x(torch.gather(masks, 1, y1[:, :, None].expand(k, wh, m))).mul_(wy1[:, :, None]))
    if threshold is not None:
        val = val > threshold
    # window pixels outside the box or the image go to the spare last element
    target = (det * (h_img * w_img))[:, None, None] + (ys * w_img)[:, :, None] + xs[:, None, :]
    target.masked_fill_((ys < 0)[:, :, None] | (xs < 0)[:, None, :], out_flat.numel() - 1)
    out_flat.scatter_(0, target.reshape(-1), val.reshape(-1).to(out_flat.dtype))


def paste_masks(
    masks: Tensor,
    boxes: Tensor,
    image_hw: tuple[int, int],
    threshold: float | None = None,
    budget_mb: float | None = None,
) -> Tensor:
    """(N, 1, M, M) mask probabilities over `boxes` (N, 4) xyxy in image pixels -> (N, 1, H, W).

    threshold None: float probabilities (torchvision's values, 0 outside the box); a number: bool masks of
    the pixels whose probability is above it. Runs on the masks' device; the working memory beyond the
    output is at most about `budget_mb` (default: DEFAULT_BUDGET_MB of the device; one box larger than that
    is pasted alone).
    """
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        pasted = paste_masks_in_image(masks, boxes, image_hw)
        return pasted if threshold is None else pasted > threshold
    h_img, w_img = int(image_hw[0]), int(image_hw[1])
    n = masks.shape[0]
    dtype = torch.bool if threshold is not None else masks.dtype
    # one spare element at the end takes the writes of window pixels outside their box
    out_flat = torch.zeros(n * h_img * w_img + 1, dtype=dtype, device=masks.device)
    out = out_flat[:-1].view(n, 1, h_img, w_img)
    if n == 0 or h_img == 0 or w_img == 0:
        return out
    padded, scale = expand_masks(masks, padding=1)
    padded = padded[:, 0].float()
    ib = expand_boxes(boxes.float(), scale).to(torch.int64)
    # window extents: the box clipped to the image (at least one pixel, so every window has a shape)
    ext_w = (torch.minimum(ib[:, 2] + 1, torch.full_like(ib[:, 2], w_img)) - ib[:, 0].clamp(min=0)).clamp(min=1)
    ext_h = (torch.minimum(ib[:, 3] + 1, torch.full_like(ib[:, 3], h_img)) - ib[:, 1].clamp(min=0)).clamp(min=1)
    order = torch.argsort(ext_h * ext_w, stable=True)
    # the one host read: window sizes, smallest first, to size the windows and group them into chunks
    plan = host_list(torch.stack([ext_h[order], ext_w[order]], dim=1))
    if budget_mb is None:
        budget_mb = DEFAULT_BUDGET_MB.get(masks.device.type, DEFAULT_BUDGET_MB["cpu"])
    budget = max(1, int(budget_mb * 2**20 / _BYTES_PER_PIXEL))
    # the axis tables once for all detections, as long as the largest window; each chunk takes a slice
    bw = (ib[:, 2] - ib[:, 0] + 1).clamp(min=1)
    bh = (ib[:, 3] - ib[:, 1] + 1).clamp(min=1)
    rows = _axis(ib[:, 1], bh, h_img, max(p[0] for p in plan), padded.shape[-1])
    cols = _axis(ib[:, 0], bw, w_img, max(p[1] for p in plan), padded.shape[-1])
    start = 0
    while start < n:
        end, (wh, ww) = start + 1, plan[start]
        while end < n:
            nh, nw = max(wh, plan[end][0]), max(ww, plan[end][1])
            if (end - start + 1) * nh * nw > budget:
                break
            wh, ww, end = nh, nw, end + 1
        det = order[start:end]
        _paste_chunk(out_flat, det, padded[det], (rows[0][det, :wh], rows[1][det, :wh]),
                     (cols[0][det, :ww], cols[1][det, :ww]), (h_img, w_img), threshold)
        start = end
    return out
