"""comask.modeling.roi_align: torchvision's forward, and a separable CPU backward that must give torchvision's
gradient for every box torchvision accepts (inside, across the border, beyond it, tiny, huge)."""

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align

from comask.modeling.heads import FPNRoIAlign
from comask.modeling.roi_align import roi_align


def _rois(n_images=3, n=60, h=40, w=52, scale=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([w / scale, h / scale])
    xy = torch.rand(n, 2, generator=g) * size * 1.2 - 0.1 * size  # some start outside the map
    wh = torch.rand(n, 2, generator=g) ** 2 * size * 0.8 + 0.05  # from sub-pixel to most of the image
    b = torch.randint(0, n_images, (n, 1), generator=g).float()
    fixed = torch.tensor(
        [
            [0, -30.0, -30.0, -10.0, -10.0],  # wholly beyond the top-left corner: no gradient
            [1, w / scale - 3, h / scale - 3, w / scale + 40, h / scale + 40],  # across the bottom-right border
            [1, 0.0, 0.0, w / scale, h / scale],  # the whole map
            [2, 10.0, 10.0, 10.0, 10.0],  # zero size
        ]
    )
    # torchvision's CPU backward writes past the input for a batch index >= N (see test below), so the fixed
    # boxes go to the last image when there are fewer than three
    fixed[:, 0].clamp_(max=n_images - 1)
    return torch.cat([torch.cat([b, xy, xy + wh], 1), fixed])


@pytest.mark.parametrize("size", [7, 14])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling", [1, 2, 3])
def test_input_gradient_matches_torchvision(size, aligned, sampling):
    torch.manual_seed(0)
    feat = torch.randn(3, 8, 40, 52, requires_grad=True)
    rois = _rois()
    ours = roi_align(feat, rois, (size, size), 0.25, sampling, aligned)
    ref = tv_roi_align(feat, rois, (size, size), 0.25, sampling, aligned)
    assert ours.grad_fn.name().endswith("_RoIAlignCPUBackward")
    assert torch.equal(ours, ref)
    grad = torch.randn_like(ref)
    (g_ours,) = torch.autograd.grad(ours, feat, grad)
    (g_ref,) = torch.autograd.grad(ref, feat, grad)
    assert g_ref.abs().max() > 1.0
    torch.testing.assert_close(g_ours, g_ref, atol=2e-5, rtol=1e-4)


def test_more_rois_than_one_chunk_and_an_image_without_rois():
    feat = torch.randn(3, 4, 20, 24, requires_grad=True)
    rois = _rois(n_images=2, n=300, h=20, w=24, scale=0.5)  # image 2 of the three gets none
    grad = torch.randn(rois.shape[0], 4, 7, 7)
    (g_ours,) = torch.autograd.grad(roi_align(feat, rois, (7, 7), 0.5, 2, True), feat, grad)
    (g_ref,) = torch.autograd.grad(tv_roi_align(feat, rois, (7, 7), 0.5, 2, True), feat, grad)
    torch.testing.assert_close(g_ours, g_ref, atol=5e-5, rtol=1e-4)
    assert torch.equal(g_ours[2], torch.zeros_like(g_ours[2]))


def test_torchvision_op_where_no_gradient_or_adaptive_sampling():
    feat = torch.randn(2, 4, 20, 24)
    rois = _rois(n_images=2, n=10, h=20, w=24)
    assert roi_align(feat, rois, (7, 7), 0.25, 2, True).grad_fn is None  # inference: the op itself
    feat.requires_grad_(True)
    adaptive = roi_align(feat, rois, (7, 7), 0.25, 0, True)
    assert "RoIAlignCPU" not in adaptive.grad_fn.name()
    with torch.no_grad():
        assert roi_align(feat, rois, (7, 7), 0.25, 2, True).grad_fn is None


def test_bfloat16_features_under_autocast_get_a_gradient_of_their_dtype():
    """CPU autocast (`runtime.amp: bf16`) hands the pooler bfloat16 FPN maps; torchvision's autocast wrapper
    pools them in float32, and the backward returns a bfloat16 gradient close to the float32 one."""
    feat32 = torch.randn(2, 4, 20, 24)
    feat = feat32.to(torch.bfloat16).requires_grad_(True)
    rois = _rois(n_images=2, n=10, h=20, w=24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_align(feat, rois, (7, 7), 0.25, 2, True)
    assert out.grad_fn.name().endswith("_RoIAlignCPUBackward")
    (g,) = torch.autograd.grad(out.float().sum(), feat)
    ref = feat32.requires_grad_(True)
    (g_ref,) = torch.autograd.grad(tv_roi_align(ref, rois, (7, 7), 0.25, 2, True).sum(), ref)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g.float(), g_ref, atol=2e-2, rtol=1e-2)


def test_fpn_pooler_gradient_matches_torchvision_multiscale_pooler():
    """What the Mask R-CNN baseline trains with now (FPNRoIAlign, aligned=False) gives the features the
    gradient torchvision's MultiScaleRoIAlign gives them."""
    g = torch.Generator().manual_seed(1)
    shapes = [(96, 128), (80, 72)]
    feats = {
        k: torch.randn(2, 8, 96 // s, 128 // s, generator=g, requires_grad=True)
        for k, s in zip(["0", "1", "2", "3"], [4, 8, 16, 32])
    }
    boxes = []
    for h, w in shapes:
        xy = torch.rand(40, 2, generator=g) * torch.tensor([w - 8.0, h - 8.0])
        wh = 2 + torch.rand(40, 2, generator=g) ** 2 * torch.tensor([w, h])
        boxes.append(torch.cat([xy, xy + wh], 1))
    ours = FPNRoIAlign(14, 2, aligned=False)(feats, boxes, shapes)
    ref = MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2)(feats, boxes, shapes)
    assert torch.equal(ours, ref)
    grad = torch.randn_like(ref)
    g_ours = torch.autograd.grad(ours, list(feats.values()), grad)
    g_ref = torch.autograd.grad(ref, list(feats.values()), grad)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_batch_index_outside_the_input_is_refused_before_torchvision_sees_it():
    """torchvision's CPU kernels trust the index: its backward wrote a gradient past the end of the input
    (valgrind: invalid writes in roi_align_backward_kernel), which crashed later tests at random."""
    feat = torch.randn(2, 4, 20, 24, requires_grad=True)
    for index in (2.0, -1.0):
        rois = torch.tensor([[0, 8.0, 8.0, 40.0, 40.0], [index, 10.0, 10.0, 30.0, 30.0]])
        for sampling in (2, 0):  # the separable backward's path and torchvision's
            with pytest.raises(ValueError, match=r"batch indices must lie in \[0, 2\)"):
                roi_align(feat, rois, (7, 7), 0.25, sampling, True)
    assert roi_align(feat, torch.zeros(0, 5), (7, 7), 0.25, 2, True).shape == (0, 4, 7, 7)


def test_bench_roi_align_table_is_well_formed():
    from comask.bench.roi_align_grad import run

    table = run([], rounds=1, threads=1)
    row = table.splitlines()[-1].split("|")
    assert row[1].strip().startswith("RoIAlign backward alone")
    tv, ours, ratio = float(row[2]), float(row[3]), float(row[4].strip().rstrip("x"))
    assert tv > 0 and ours > 0 and ratio == pytest.approx(tv / ours, rel=0.05)  # printed rounded
