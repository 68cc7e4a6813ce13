"""Dense offsets and mask-weighted box voting (eq. 8-9), checked against numbers worked out by hand."""

import math

import pytest
import torch

from comask.modeling.voting import cell_centres, clamp_boxes, decode_offsets, encode_offsets, vote_boxes

# RoI (100, 50, 170, 120): 70 x 70 px, so the 7x7 cells are 10 px wide and cell (row r, col c) has
# its centre at (105 + 10c, 55 + 10r).
ROI = torch.tensor([[100.0, 50.0, 170.0, 120.0]])


def _offsets() -> torch.Tensor:
    """Every cell predicts (0.5, 0.5, 0.5, 0.5) except two, given in RoI units (x 70 px):
    cell (0,0), centre (105, 55): (0.05, 0.05, 0.3, 0.2) -> box (101.5, 51.5, 126, 69)
    cell (0,1), centre (115, 55): (0.1, 0.0, 0.2, 0.4)   -> box (108, 55, 129, 83)
    """
    off = torch.full((1, 4, 7, 7), 0.5)
    off[0, :, 0, 0] = torch.tensor([0.05, 0.05, 0.3, 0.2])
    off[0, :, 0, 1] = torch.tensor([0.1, 0.0, 0.2, 0.4])
    return off


def test_cell_centres_row_major():
    uv = cell_centres(7)
    assert uv.shape == (49, 2)
    assert torch.allclose(uv[0], torch.tensor([0.5 / 7, 0.5 / 7]))
    assert torch.allclose(uv[1], torch.tensor([1.5 / 7, 0.5 / 7]))  # next column, same row
    assert torch.allclose(uv[7], torch.tensor([0.5 / 7, 1.5 / 7]))


def test_decode_hand_example():
    boxes = decode_offsets(ROI, _offsets())
    assert torch.allclose(boxes[0, 0], torch.tensor([101.5, 51.5, 126.0, 69.0]), atol=1e-4)
    assert torch.allclose(boxes[0, 1], torch.tensor([108.0, 55.0, 129.0, 83.0]), atol=1e-4)
    # cell (3,3) is the RoI centre (135, 85): +-35 px
    assert torch.allclose(boxes[0, 24], torch.tensor([100.0, 50.0, 170.0, 120.0]), atol=1e-4)


def test_vote_hand_example():
    # M_s: 0.9 at (0,0), 0.6 at (0,1) vote; 0.4 at (3,3) and 0.1 elsewhere are below 0.5 and do not.
    ms = torch.full((1, 7, 7), 0.1)
    ms[0, 0, 0], ms[0, 0, 1], ms[0, 3, 3] = 0.9, 0.6, 0.4
    box = vote_boxes(ROI, _offsets(), ms, thresh=0.5)
    # x1 = (0.9*101.5 + 0.6*108)/1.5 = 104.1   y1 = (0.9*51.5 + 0.6*55)/1.5 = 52.9
    # x2 = (0.9*126 + 0.6*129)/1.5 = 127.2     y2 = (0.9*69 + 0.6*83)/1.5 = 74.6
    assert torch.allclose(box, torch.tensor([[104.1, 52.9, 127.2, 74.6]]), atol=1e-4)
    # (N, 1, 7, 7) input, as the head produces it, gives the same
    assert torch.allclose(vote_boxes(ROI, _offsets(), ms[:, None], thresh=0.5), box)


def test_vote_fallback_no_cell_above_threshold():
    ms = torch.zeros(1, 7, 7)
    ms[0, 0, 0], ms[0, 0, 1] = 0.4, 0.2
    box = vote_boxes(ROI, _offsets(), ms, thresh=0.5)
    # all cells weighted by M_s: only the two non-zero ones count, with weights 0.4 and 0.2
    # x1 = (0.4*101.5 + 0.2*108)/0.6 = 103.6667  y1 = (0.4*51.5 + 0.2*55)/0.6 = 52.6667
    # x2 = (0.4*126 + 0.2*129)/0.6 = 127         y2 = (0.4*69 + 0.2*83)/0.6 = 73.6667
    expect = torch.tensor([[311.0 / 3, 158.0 / 3, 127.0, 221.0 / 3]])
    assert torch.allclose(box, expect, atol=1e-4)


def test_vote_all_zero_confidence_is_plain_mean_not_nan():
    ms = torch.zeros(1, 7, 7)
    box = vote_boxes(ROI, _offsets(), ms, thresh=0.5)
    assert torch.isfinite(box).all()
    assert torch.allclose(box, vote_boxes(ROI, _offsets(), ms, collaborative=False))


def test_without_cl_is_plain_mean_of_49_cells():
    ms = torch.ones(1, 7, 7)
    ms[0, 0, 0] = 0.0  # confidence is ignored without CL
    box = vote_boxes(ROI, _offsets(), ms, collaborative=False)
    # the 47 cells with (0.5,)*4 give (cx-35, cy-35, cx+35, cy+35); sum of cx over all 49 cells = 49*135,
    # over the 47 = 49*135 - 105 - 115 = 6395 (same for cy: 49*85 - 55 - 55 = 4055)
    x1 = (6395 - 47 * 35 + 101.5 + 108) / 49
    y1 = (4055 - 47 * 35 + 51.5 + 55) / 49
    x2 = (6395 + 47 * 35 + 126 + 129) / 49
    y2 = (4055 + 47 * 35 + 69 + 83) / 49
    assert torch.allclose(box, torch.tensor([[x1, y1, x2, y2]]), atol=1e-4)


def test_vote_batched_rois_are_independent():
    ms = torch.full((1, 7, 7), 0.1)
    ms[0, 0, 0], ms[0, 0, 1] = 0.9, 0.6
    rois = torch.cat([ROI, ROI - torch.tensor([[100.0, 50.0, 100.0, 50.0]])])
    offs = _offsets().repeat(2, 1, 1, 1)
    boxes = vote_boxes(rois, offs, ms.repeat(2, 1, 1))
    # the second RoI is the first moved by (-100, -50)
    assert torch.allclose(boxes[1], boxes[0] - torch.tensor([100.0, 50.0, 100.0, 50.0]), atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_offset_encode_decode_round_trip(dtype, tol):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g, dtype=dtype) * 500
    rois = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=g, dtype=dtype) * 300], 1)
    gxy = torch.rand(50, 2, generator=g, dtype=dtype) * 500
    gt = torch.cat([gxy, gxy + 1 + torch.rand(50, 2, generator=g, dtype=dtype) * 300], 1)
    enc = encode_offsets(rois, gt)
    assert enc.shape == (50, 4, 7, 7) and enc.dtype == dtype
    dec = decode_offsets(rois, enc)  # every cell decodes back to its ground-truth box
    assert (dec - gt[:, None, :]).abs().max().item() < tol * 500
    # and voting over exact offsets returns the ground truth, whatever the weights
    ms = torch.rand(50, 7, 7, generator=g, dtype=dtype)
    assert torch.allclose(vote_boxes(rois, enc, ms), gt, atol=tol * 500)


def test_encode_values_by_hand():
    gt = torch.tensor([[101.5, 51.5, 126.0, 69.0]])
    enc = encode_offsets(ROI, gt)
    assert torch.allclose(enc[0, :, 0, 0], torch.tensor([0.05, 0.05, 0.3, 0.2]), atol=1e-6)
    # cell (6,6), centre (165, 115), lies outside this box: negative distances on the far sides
    assert torch.allclose(enc[0, :, 6, 6], torch.tensor([63.5, 63.5, -39.0, -46.0]) / 70, atol=1e-6)


def test_clamp_boxes_keeps_valid_boxes():
    hw = torch.tensor([[100, 80]]).expand(4, 2)
    boxes = torch.tensor(
        [
            [-10.0, -5.0, 50.0, 60.0],  # partly outside: clipped
            [90.0, 10.0, 120.0, 20.0],  # right part outside (width 80)
            [200.0, 200.0, 300.0, 300.0],  # entirely outside
            [30.0, 30.0, 30.0, 30.0],  # empty
        ]
    )
    out = clamp_boxes(boxes, hw)
    assert torch.equal(out[0], torch.tensor([0.0, 0.0, 50.0, 60.0]))
    assert torch.equal(out[1], torch.tensor([79.0, 10.0, 80.0, 20.0]))
    assert torch.equal(out[2], torch.tensor([79.0, 99.0, 80.0, 100.0]))
    assert torch.equal(out[3], torch.tensor([30.0, 30.0, 31.0, 31.0]))
    assert (out[:, 2] > out[:, 0]).all() and (out[:, 3] > out[:, 1]).all()


def test_vote_extreme_offsets_stay_finite():
    off = torch.full((3, 4, 7, 7), 1e6)
    ms = torch.tensor([0.0, 1e-30, 1.0]).reshape(3, 1, 1).expand(3, 7, 7)
    box = vote_boxes(ROI.repeat(3, 1), off, ms)
    assert torch.isfinite(box).all()
    assert not math.isnan(box.sum().item())
