"""Batched inference (issue 22): several images per model call give each image's own result."""

from __future__ import annotations

import numpy as np
import pytest

from comask import cli
from comask.engine.predict import Predictor

DEMO = "asset:comask_mnv3_shapes_demo.pth"


def _images(n: int) -> list[np.ndarray]:
    from comask.data import synth

    return [synth.render_image(synth.PRESETS["demo"], 128, 11, "val", i)[0] for i in range(n)]


def test_predict_batch_equals_one_at_a_time() -> None:
    pred = Predictor(DEMO, device="cpu", score_thr=0.2)
    images = _images(3)
    batched = pred.predict_batch(images)
    for image, got in zip(images, batched):
        one = pred(image)
        assert len(one["scores"]) > 0
        # the same detections; the convolutions of a batch of 3 round differently from a batch of 1 (~1e-6)
        np.testing.assert_array_equal(got["labels"], one["labels"])
        np.testing.assert_allclose(got["scores"], one["scores"], atol=1e-5)
        np.testing.assert_allclose(got["boxes"], one["boxes"], atol=1e-2)
        assert (got["masks"] != one["masks"]).mean() < 1e-3
    # per-call trim: max_det keeps the best, score_thr raises the bar
    top1 = pred.predict_batch(images, max_det=1)
    assert all(len(t["scores"]) == 1 and t["scores"][0] == b["scores"].max() for t, b in zip(top1, batched))
    strict = pred(images[0], score_thr=0.9)
    assert np.all(strict["scores"] >= 0.9) and strict["masks"].shape[0] == len(strict["scores"])


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_batch_size_must_be_positive(command: str, tmp_path, capsys) -> None:
    args = ["--weights", DEMO, "--batch-size", "0"]
    if command == "predict":
        args = [str(tmp_path), "--out", str(tmp_path / "out"), *args]
    assert cli.main([command, *args]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
