"""Mask paste for all detections at once (comask.modeling.paste) and memory bounded per request (issues 22, 24)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from comask.modeling.paste import paste_masks


def _case(seed: int, n: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n, 1, 28, 28, generator=g)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 1.1 - 5
    wh = torch.rand(n, 2, generator=g) ** 2 * torch.tensor([w, h]) + 0.5
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)  # as clamp_boxes leaves them: >= 1 px
    boxes[0] = torch.tensor([0.0, 0.0, w, h])  # the whole image: its expanded box leaves it on every side
    boxes[1] = torch.tensor([w - 1.0, h - 1.0, w, h])  # one pixel in the corner
    return masks, boxes


@pytest.mark.parametrize("seed,n,h,w", [(0, 12, 60, 80), (1, 30, 131, 47), (2, 5, 300, 200), (3, 2, 29, 31)])
def test_paste_matches_torchvision(seed: int, n: int, h: int, w: int) -> None:
    masks, boxes = _case(seed, n, h, w)
    ref = paste_masks_in_image(masks, boxes, (h, w))
    got = paste_masks(masks, boxes, (h, w))
    assert got.shape == ref.shape == (n, 1, h, w) and got.dtype == torch.float32
    assert torch.equal(got == 0, ref == 0)  # the same pixels are written
    torch.testing.assert_close(got, ref, atol=3e-7, rtol=0)
    for thr in (0.5, 0.3):
        pasted = paste_masks(masks, boxes, (h, w), threshold=thr)
        assert pasted.dtype == torch.bool and torch.equal(pasted, ref > thr)
    # chunking by the budget (down to one detection per chunk) changes nothing
    assert torch.equal(paste_masks(masks, boxes, (h, w), budget_mb=1e-6), got)


def test_paste_no_detections() -> None:
    out = paste_masks(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (40, 50), threshold=0.5)
    assert out.shape == (0, 1, 40, 50) and out.dtype == torch.bool
    # a non-finite box (a diverged model) pastes nothing and does not index outside the mask or the image
    masks = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = paste_masks(masks, torch.tensor([[float("nan"), 1, 5, 8], [2.0, 2, 10, 10]]), (20, 30), threshold=0.5)
    assert out.shape == (2, 1, 20, 30) and not out[0].any()
    assert torch.equal(out[1], paste_masks_in_image(masks[1:], torch.tensor([[2.0, 2, 10, 10]]), (20, 30))[0] > 0.5)


def test_predict_trims_before_pasting() -> None:
    from comask.engine.predict import load_model

    model = load_model("asset:comask_mnv3_shapes_demo.pth").model
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 90, 120, generator=g)
    with torch.inference_mode():
        full = model([image])[0]
        trimmed = model.predict([image], score_thr=0.06, max_det=3, mask_thr=0.5)[0]
    keep = torch.where(full["scores"] >= 0.06)[0][:3]
    assert 0 < len(keep) <= 3 and trimmed["masks"].dtype == torch.bool
    assert torch.equal(trimmed["scores"], full["scores"][keep])
    assert torch.equal(trimmed["boxes"], full["boxes"][keep])
    assert torch.equal(trimmed["masks"], full["masks"][keep] > 0.5)


_PEAK = """
import resource, sys
from comask.engine.predict import Predictor
inst = Predictor("asset:comask_mnv3_shapes_demo.pth", device="cpu", score_thr=0.3)(sys.argv[1])
assert inst["masks"].shape[1:] == (SIDE, SIDE) and inst["masks"].dtype == bool
# this process's peak resident set (KiB on Linux): the whole prediction, decoding included
print(len(inst["scores"]), int(inst["masks"].sum()), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_large_image_memory_is_bounded(tmp_path: Path) -> None:
    """A 36-megapixel image (issue 24): 100 float masks of it would be 14 GB; trimmed before pasting and pasted
    as bool inside each box, the whole prediction stays under 3 GB of peak RSS (measured ~2.2 GB; the model's
    full-size normalisation is the peak, not the paste)."""
    from PIL import Image

    from comask.data import synth

    side = 6000
    img, _ = synth.render_image(synth.PRESETS["demo"], 128, 7, "val", 3)
    path = tmp_path / "big.jpg"
    Image.fromarray(img).resize((side, side), Image.BILINEAR).save(path, quality=90)
    # a fresh process: its peak RSS is this prediction's alone (RUSAGE_CHILDREN here would keep the largest
    # child of the whole test session)
    proc = subprocess.run([sys.executable, "-c", _PEAK.replace("SIDE", str(side)), str(path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n, pixels, peak_kb = (int(v) for v in proc.stdout.split()[-3:])
    assert n >= 1 and pixels > 1_000_000  # real, large masks came back
    assert peak_kb / 1024 < 3000, f"peak RSS {peak_kb / 1024:.0f} MB for a {side}x{side} image"


def test_server_worker_passes_each_request_trim_to_the_predictor() -> None:
    """`comask serve` trims before pasting: the worker hands the request's score_thr / max_det to a predictor
    that `trims_before_paste` (a micro-batch gets the loosest of its requests'), and nothing to one that does not."""
    import asyncio

    import numpy as np

    from comask.serve.app import InferenceWorker

    calls: list[dict] = []

    class Trimming:
        trims_before_paste = True
        classes = ["a"]

        def __call__(self, image, **kw):
            calls.append(kw)
            return {"scores": np.zeros(0)}

    class Plain:
        classes = ["a"]

        def __call__(self, image):
            calls.append({})
            return {"scores": np.zeros(0)}

    async def one(worker: InferenceWorker, thr: float, k: int | None) -> None:
        await worker.run(np.zeros((4, 4, 3), np.uint8), thr, k)

    for pred, want in ((Trimming(), {"score_thr": 0.4, "max_det": 7}), (Plain(), {})):
        calls.clear()
        worker = InferenceWorker(pred, max_queue=4, max_batch=1)
        try:
            asyncio.run(one(worker, 0.4, 7))
        finally:
            worker.close()
        assert calls == [want]
