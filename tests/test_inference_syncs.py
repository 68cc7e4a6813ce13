"""Host-device round trips of CoMask-R50 inference, counted on the CPU with torch.profiler (issue 22).

The count (comask.bench.speed.count_syncs: scalar reads, data-dependent shapes, NMS calls and comask's own
marked host reads) does not depend on the device, so CI can hold it: <= 40 per image with 100 detections
(it was ~1600 when the masks were pasted one detection at a time and NMS looped over the 80 classes).
"""

from __future__ import annotations

import torch

from comask.bench.speed import _inference_cfg, _load_model, count_syncs


def test_comask_r50_inference_syncs_per_image() -> None:
    spec = {"config": "comask_r50_mfpn_2x_coco", "size": [320, 480]}
    model = _load_model(spec, _inference_cfg(spec)).eval()
    image = torch.rand(3, 320, 480, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert model([image])[0]["boxes"].shape[0] == 100  # score threshold 0: the full 100 detections
        counts = count_syncs(lambda: model([image]))
    assert counts["syncs"] <= 40, counts
    # the per-detection / per-class loops are gone: no scalar read at all, a handful of NMS calls
    assert counts["by_op"].get("aten::item", 0) == 0 and counts["by_op"].get("torchvision::nms", 0) <= 8, counts


def test_count_syncs_sees_scalar_reads_once() -> None:
    x = torch.arange(10.0)

    def fn() -> None:
        for v in x[:5]:
            float(v)  # .item() -> _local_scalar_dense: counted once each
        torch.nonzero(x > 3)

    counts = count_syncs(fn)
    assert counts["syncs"] == 6 and counts["by_op"]["aten::nonzero"] == 1, counts


def test_bench_speed_reports_syncs_and_fps_per_batch() -> None:
    import json
    import subprocess
    import sys

    from comask.bench.speed import format_report

    proc = subprocess.run(
        [sys.executable, "-m", "comask", "bench", "speed", "--config", "comask_r18_mfpn_shapes", "--compare",
         "maskrcnn_r18_fpn_shapes", "--size", "64x96", "--threads", "1", "--repeats", "1", "--warmup", "0",
         "--batches", "1", "2", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    for m in rep["models"]:
        assert set(m["fps_by_batch"]) == {"1", "2"} and all(v > 0 for v in m["fps_by_batch"].values())
        assert 0 < m["syncs"]["syncs"] <= 40 and m["syncs"]["ops"] > 100
    text = format_report(rep)
    assert "| host syncs / image | aten ops / image | FPS batch 1 | FPS batch 2 |" in text
    assert "comask_r18_mfpn_shapes syncs by operator: " in text
