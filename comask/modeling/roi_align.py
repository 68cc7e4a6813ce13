"""RoIAlign with a fast CPU backward.

The forward is torchvision's kernel. Its CPU backward walks every (RoI, channel, bin, sample) in scalar
code and recomputes the bilinear weights for each channel; in a shapes-bench training step it took a third
of the step's CPU time (0.7 of 2.1 s, docs/BENCHMARKS.md). RoIAlign of an axis-aligned box is separable:
out[r, c] = Wy[r] @ F[b_r, c] @ Wx[r]^T, with Wy (pooled_h x H) and Wx (pooled_w x W) the per-axis
bilinear weights averaged over the sampling grid (torchvision's out-of-range rule, "zero beyond -1 or
the size, clamp inside", is per axis too). So the gradient is Wy^T @ G[r, c] @ Wx summed over the RoIs
of each image: two matrix products per chunk of RoIs instead of a scalar scatter loop.

Used for training on the CPU with a fixed `sampling_ratio`; every other case (CUDA, adaptive sampling,
inference, tracing for export) calls torchvision's op unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align as tv_roi_align

_CHUNK = 128  # RoIs per product: bounds the intermediate (chunk x C x pooled_h x W floats, ~25 MB at 14x14)


def _axis_weights(start: Tensor, extent: Tensor, pooled: int, sampling: int, length: int) -> Tensor:
    """(R, pooled, length): weight of each feature row/column in each output bin, along one axis."""
    step = extent / pooled
    bins = torch.arange(pooled, dtype=start.dtype, device=start.device)
    samples = torch.arange(sampling, dtype=start.dtype, device=start.device) + 0.5
    pos = start[:, None, None] + bins[None, :, None] * step[:, None, None] + samples * (step / sampling)[:, None, None]
    inside = (pos >= -1.0) & (pos <= length)
    pos = pos.clamp(min=0.0)
    low = pos.floor().long()
    at_end = low >= length - 1
    low = low.clamp(max=length - 1)
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end, torch.zeros_like(pos), pos - low.to(pos.dtype))
    share = inside.to(pos.dtype) / sampling
    w = torch.zeros(start.shape[0], pooled, length, dtype=start.dtype, device=start.device)
    w.scatter_add_(2, low, (1.0 - frac) * share)
    w.scatter_add_(2, high, frac * share)
    return w


def roi_align_input_grad(
    grad: Tensor,
    rois: Tensor,
    input_shape: torch.Size,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """d(loss)/d(input) of torchvision's roi_align, given grad = d(loss)/d(output) of shape (R, C, PH, PW)."""
    n, c, h, w = input_shape
    ph, pw = grad.shape[-2:]
    rois = rois.to(torch.float32)
    grad = grad.to(torch.float32)
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, k] * spatial_scale - offset for k in (1, 2, 3, 4))
    rw, rh = x2 - x1, y2 - y1
    if not aligned:  # torchvision's legacy mode forces boxes to at least one cell
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    wy = _axis_weights(y1, rh, ph, sampling_ratio, h)
    wx = _axis_weights(x1, rw, pw, sampling_ratio, w)
    out = torch.zeros(n, h, c * w, dtype=torch.float32, device=grad.device)
    image = rois[:, 0].long()
    for i in range(n):
        idx = torch.where(image == i)[0]
        for s in range(0, idx.numel(), _CHUNK):
            j = idx[s : s + _CHUNK]
            r = j.numel()
            t = torch.bmm(grad[j].reshape(r, c * ph, pw), wx[j])  # G @ Wx: (r, c*ph, w)
            t = t.view(r, c, ph, w).transpose(1, 2).reshape(r * ph, c * w)
            out[i].addmm_(wy[j].reshape(r * ph, h).t(), t)  # sum over RoIs and rows of Wy^T @ (G @ Wx)
    return out.view(n, h, c, w).transpose(1, 2).contiguous()


class _RoIAlignCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, rois, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.meta = (input.shape, input.dtype, spatial_scale, sampling_ratio, aligned)
        return tv_roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        shape, dtype, scale, sampling, aligned = ctx.meta
        g = roi_align_input_grad(grad, rois, shape, scale, sampling, aligned).to(dtype)
        return g, None, None, None, None, None


def roi_align(
    input: Tensor,
    rois: Tensor,
    output_size: tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """torchvision.ops.roi_align (rois as (K, 5) [batch index, x1, y1, x2, y2]), with the separable CPU backward
    when a gradient will be needed."""
    tracing = torch.jit.is_scripting() or torch.jit.is_tracing()
    backward = input.requires_grad and torch.is_grad_enabled()
    if input.device.type == "cpu" and rois.numel() and not tracing and backward:
        # torchvision's CPU kernels do not check the batch index: its backward writes a RoI's gradient past the
        # end of the input's buffer when the index is >= N (a heap corruption valgrind shows; the crash comes
        # later and elsewhere). One min/max pass over K numbers on the CPU; a CUDA check would cost a sync.
        # Checked where a backward will run (inference reads stay free of host reads).
        low, top = (int(v) for v in torch.aminmax(rois[:, 0]))
        if low < 0 or top >= input.shape[0]:
            raise ValueError(f"roi_align: RoI batch indices must lie in [0, {input.shape[0]}), got {low}..{top}")
    fast = input.device.type == "cpu" and sampling_ratio > 0 and backward and not tracing
    if not fast:
        return tv_roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return _RoIAlignCPU.apply(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
