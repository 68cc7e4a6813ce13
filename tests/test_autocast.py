"""Inference under autocast (`bench speed --amp`, issue 4): the RoI stage's box arithmetic, scores and masks
stay float32 when the convolutions run in half precision. CPU bfloat16 autocast stands in for CUDA here."""

from __future__ import annotations

import torch

from comask.config import load_config
from comask.modeling.build import build_model
from comask.modeling.roi_heads import CoMaskRoIHeads

CH = 16
HW = (640, 640)  # large enough for RoIs whose area overflows float16 (> 65504 px^2)


def _features() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, w = HW
    return {k: torch.randn(1, CH, h // s, w // s, generator=g)
            for k, s in zip(["0", "1", "2", "3", "pool"], [4, 8, 16, 32, 64])}


def test_half_precision_proposals_are_pooled_and_voted_in_float32() -> None:
    """float16 proposals (what the RPN decodes under CUDA fp16 autocast) give the same detections as the
    same coordinates in float32: a 400 x 400 RoI's area is inf in float16, which would move it from P4 to P5."""
    torch.manual_seed(0)
    heads = CoMaskRoIHeads(CH, 3, fc_dim=32, conv_dim=16, num_convs=1, score_thresh=0.0, detections_per_img=30)
    heads.eval()
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(20, 2, generator=g) * 200
    wh = torch.cat([torch.full((10, 2), 400.0), 20 + torch.rand(10, 2, generator=g) * 100])
    props16 = torch.cat([xy, xy + wh], dim=1).half()
    assert not torch.isfinite((props16[:, 2] - props16[:, 0]) * (props16[:, 3] - props16[:, 1])).all()
    feats = _features()
    with torch.no_grad():
        (r16,), _ = heads(feats, [props16], [HW])
        (r32,), _ = heads(feats, [props16.float()], [HW])
    for key in ("boxes", "scores", "masks"):
        assert r16[key].dtype == torch.float32
        torch.testing.assert_close(r16[key], r32[key], rtol=0, atol=0)
    assert torch.equal(r16["labels"], r32["labels"])


def test_eval_forward_under_cpu_bf16_autocast() -> None:
    cfg = load_config("comask_r18_mfpn_shapes", [
        "model.test.score_thresh=0.0", "model.test.detections_per_img=20", "model.test.nms_after_vote=false",
        "input.min_size_test=64", "input.max_size_test=96",
    ])
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).eval()
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        (out,) = model([image])
    n = out["boxes"].shape[0]
    assert n == 20  # score_thresh 0: the full set reaches the collaborative head
    assert out["boxes"].dtype == out["scores"].dtype == out["masks"].dtype == torch.float32
    assert out["masks"].shape == (n, 1, 64, 96)
    b = out["boxes"]
    assert torch.isfinite(b).all() and torch.isfinite(out["masks"]).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    assert b[:, :2].min() >= 0 and (b[:, 2] <= 96).all() and (b[:, 3] <= 64).all()
    assert 0 <= out["masks"].min() and out["masks"].max() <= 1
    assert (out["scores"][:-1] >= out["scores"][1:]).all()
