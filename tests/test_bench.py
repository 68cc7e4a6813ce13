"""`comask bench`: output format only (benchmarks are commands, not tests; docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from comask.bench.accuracy import COLUMNS, format_table
from comask.bench.speed import parse_size
from comask.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "comask", "bench", *args, "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_speed_json_is_well_formed() -> None:
    rep = _bench(
        "speed", "--config", "comask_r18_mfpn_shapes", "--compare", "maskrcnn_r18_fpn_shapes",
        "--size", "64x96", "--threads", "1", "--repeats", "2", "--warmup", "0",
    )
    models = rep["models"]
    assert [m["config"] for m in models] == ["comask_r18_mfpn_shapes", "maskrcnn_r18_fpn_shapes"]
    assert [m["model_type"] for m in models] == ["comask", "maskrcnn"]
    for m in models:
        lat = m["latency_s"]
        assert 0 < lat["min"] <= lat["median"] <= lat["max"]
        assert len(m["times_s"]) == 2
        cpu = m["cpu_s"]
        assert len(m["cpu_times_s"]) == 2 and 0 < cpu["min"] <= cpu["median"] <= cpu["max"]
        # one thread: the process cannot use more CPU time than wall time (small slack for clock granularity)
        assert all(c <= t * 1.05 + 0.01 for c, t in zip(m["cpu_times_s"], m["times_s"]))
        assert m["size"] == [64, 96] and m["threads"] == 1 and m["batch"] == 1
        assert m["params"] > 1_000_000 and m["gflops"] > 0.01
        assert 50 < m["peak_rss_mb"] < 20_000
        # score_thresh=0: a random-initialised model still hands a full set of detections to its mask stage
        assert m["detections"] == 50
    a, b = models
    # MSFEM and the collaborative head add parameters over the baseline (FLOPs depend on the head's depth
    # and the detection count: a shallow collaborative tower at 7x7 can cost less than a 14x14 mask head)
    assert a["params"] > b["params"] and a["gflops"] != b["gflops"]
    r = rep["ratio"]
    assert math.isclose(r["latency"], a["latency_s"]["median"] / b["latency_s"]["median"])
    assert math.isclose(r["peak_rss"], a["peak_rss_mb"] / b["peak_rss_mb"])
    assert math.isclose(r["cpu"], a["cpu_s"]["median"] / b["cpu_s"]["median"])
    assert math.isclose(r["latency_min"], a["latency_s"]["min"] / b["latency_s"]["min"])
    assert rep["machine"]["cores"] >= 1 and rep["machine"]["date"]


def test_speed_train_step_json() -> None:
    rep = _bench(
        "speed", "--train", "--config", "comask_r18_mfpn_shapes", "--threads", "1", "--repeats", "1",
        "--warmup", "0", "--opts", "schedule.ims_per_batch=1", "input.min_size_train=[64]",
    )
    (m,) = rep["models"]
    assert "ratio" not in rep
    assert m["mode"] == "train" and m["batch"] == 1 and m["size"] == [64, 64]
    assert m["latency_s"]["median"] > 0 and m["gflops"] > 0 and m["cpu_s"]["median"] > 0


def test_parse_size() -> None:
    assert parse_size("800x1216") == (800, 1216)
    assert parse_size("128") == (128, 128)
    for bad in ("800x", "axb", "16x16", "1x2x3"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_accuracy_table_columns_and_means() -> None:
    def row(name: str, seed: int, ap: float) -> dict:
        vals = {c: ap for c in COLUMNS}
        return {"name": name, "seed": seed, "segm": dict(vals), "bbox": {**vals, "APs": -1.0}}

    text = format_table([row("comask", 0, 0.40), row("comask", 1, 0.50), row("maskrcnn", 0, 0.30)])
    lines = text.splitlines()
    assert lines[0].startswith("| model | seeds | mask AP | mask AP50 | mask AP75 | mask APs | mask APm | mask APl | box AP")
    assert lines[2].split(" | ")[:4] == ["| comask", "0,1", "45.0", "45.0"]
    assert "| maskrcnn | 0 | 30.0 |" in lines[3]
    # COCO's -1 (no objects of that size) shows as '-', not as a negative AP
    assert lines[3].split(" | ")[11] == "-"
