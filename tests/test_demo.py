"""`comask demo`, the main job, end to end through the CLI: a one-minute budget on a small copy of the
demo set must train on the time-based schedule, evaluate, draw overlays and say where it put them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comask.cli import main
from comask.engine.checkpoint import checkpoint_name, load_checkpoint
from comask.engine.optim import scaled_lr


@pytest.mark.slow
def test_demo_one_minute_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    # cwd=tmp_path: anything the demo wrote relative to the working directory would land there
    proc = subprocess.run(
        [sys.executable, "-m", "comask", "demo", "--out", str(out), "--minutes", "1",
         "--num-train", "16", "--num-val", "4"],
        capture_output=True, text=True, cwd=tmp_path, timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"], "nothing written outside --out"

    metrics = json.loads((out / "metrics.json").read_text())
    for task in ("bbox", "segm"):
        assert 0.0 <= metrics[task]["AP"] <= 1.0
    overlays = sorted((out / "predictions").glob("*.png"))
    assert len(overlays) == 4, "one overlay per validation image (fewer than the demo's 8 here)"
    assert isinstance(json.loads((out / "predictions" / "predictions.json").read_text()), (list, dict))
    final = load_checkpoint(out / "train" / "model_final.pth")
    assert final["config"]["schedule"]["by_time"] is True
    assert final["config"]["data"]["val"]["ann"] == str((out / "data" / "annotations" / "val.json").resolve())
    for line in ("[demo] metrics:", "[demo] overlays:", "[demo] checkpoint:"):
        assert line in proc.stdout

    # The time-based schedule used the training minutes: it stopped on the budget, not on max_iter.
    recs = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    done = next(r for r in recs if r.get("event") == "done")
    budget = final["config"]["runtime"]["max_minutes"] * 60
    assert done["stop_reason"] == "time_limit" and done["elapsed_seconds"] >= budget
    full = load_checkpoint(out / "train" / checkpoint_name(final["iter"]))
    assert full["elapsed_seconds"] >= budget and full["scheduler"]["lr_lambdas"][0]["progress"] >= 1.0
    sched = final["config"]["schedule"]
    assert sched["time_steps"][-1] < 1.0
    assert full["scheduler"]["_last_lr"][0] <= scaled_lr(sched) * sched["gamma"] ** 2 * (1 + 1e-9), \
        "both decays came before the end"

    # metrics.json has the form `comask eval` writes for the same checkpoint.
    assert main(["eval", "--weights", str(out / "train" / "model_final.pth"), "--out", str(tmp_path / "ev"),
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    evaluated = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert evaluated.keys() == metrics.keys()
    for task in ("bbox", "segm"):
        assert evaluated[task].keys() == metrics[task].keys()
        assert evaluated[task]["AP"] == pytest.approx(metrics[task]["AP"], abs=1e-6)
