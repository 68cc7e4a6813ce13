"""`comask demo`, the main job, end to end through the CLI: a one-minute budget on a small copy of the
demo set must fine-tune the shipped checkpoint on the time-based schedule, evaluate, draw overlays and
say where it put them. Also: the one-line error when the checkpoint is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comask import demo
from comask.cli import main
from comask.engine.checkpoint import checkpoint_name, load_checkpoint, load_model_weights
from comask.engine.optim import scaled_lr


def _first_batch_loss(cfg_dict: dict, weights: Path | None) -> float:
    """Training loss of the demo model on the first 4 training images: random init or `weights`."""
    from comask.config import config_from_dict
    from comask.data.loader import build_dataset, collate
    from comask.modeling.build import build_model

    cfg = config_from_dict(cfg_dict)
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False)
    if weights is not None:
        load_model_weights(model, load_checkpoint(weights)["model"])
    ds = build_dataset(cfg, "train", flip_prob=0.0)
    images, targets = collate([ds[i] for i in range(4)])
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        return float(sum(model(images, targets).values()))


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

    # The pretrained route: every tensor of the packaged checkpoint was loaded, whatever the working directory.
    shipped = demo.pretrained_path()
    assert "[demo] route: pretrained" in proc.stdout
    assert f"initialised from {shipped}: " in proc.stderr and " 0 skipped" in proc.stderr, proc.stderr[-2000:]

    metrics = json.loads((out / "metrics.json").read_text())
    for task in ("bbox", "segm"):
        assert 0.0 <= metrics[task]["AP"] <= 1.0
    overlays = sorted((out / "predictions").glob("*.png"))
    assert len(overlays) == 4, "one overlay per validation image (fewer than the demo's 8 here)"
    assert isinstance(json.loads((out / "predictions" / "predictions.json").read_text()), (list, dict))
    final = load_checkpoint(out / "train" / "model_final.pth")
    assert final["config"]["schedule"]["by_time"] is True
    assert final["config"]["data"]["val"]["ann"] == str((out / "data" / "annotations" / "val.json").resolve())
    assert final["config"]["runtime"]["load_from"] == str(shipped)
    assert final["config"]["model"]["backbone"]["name"] == "mobilenet_v3_large"
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

    # Training started from the checkpoint: the first logged loss (mean of the first log_period iterations)
    # is far below the loss of the same model from random weights, and near the checkpoint's own loss.
    first = next(r for r in recs if "loss" in r)
    scratch = _first_batch_loss(final["config"], None)
    pretrained = _first_batch_loss(final["config"], shipped)
    assert pretrained < 0.6 * scratch, (pretrained, scratch)
    assert first["loss"] < 0.6 * scratch, (first, scratch)

    # metrics.json has the form `comask eval` writes for the same checkpoint.
    assert main(["eval", "--weights", str(out / "train" / "model_final.pth"), "--out", str(tmp_path / "ev"),
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    evaluated = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert evaluated.keys() == metrics.keys()
    for task in ("bbox", "segm"):
        assert evaluated[task].keys() == metrics[task].keys()
        assert evaluated[task]["AP"] == pytest.approx(metrics[task]["AP"], abs=1e-6)


def test_demo_without_its_checkpoint_says_how_to_rebuild_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "assets" / demo.PRETRAINED_FILE
    monkeypatch.setattr(demo, "pretrained_path", lambda: missing)
    assert main(["demo", "--out", str(tmp_path / "out"), "--minutes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err
    assert demo.PRETRAIN_COMMAND in err and f"--half --out {missing}" in err and "--from-scratch" in err
    assert not (tmp_path / "out").exists(), "it fails before generating data or training"


def test_pretrained_path_is_the_installed_package_file() -> None:
    import comask

    assert demo.pretrained_path() == Path(comask.__file__).resolve().parent / "assets" / "comask_mnv3_shapes_demo.pth"


def test_each_route_trains_its_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    seen = []

    def fake_train(cfg, out, **kwargs):  # records what the demo would train; "interrupted" ends the demo there
        seen.append(cfg)
        return {"stop_reason": "interrupted", "iter": 0, "checkpoint": None}

    monkeypatch.setattr("comask.engine.train.train", fake_train)
    shipped = tmp_path / "assets" / demo.PRETRAINED_FILE
    monkeypatch.setattr(demo, "pretrained_path", lambda: shipped)

    # --from-scratch does not need the checkpoint
    r = demo.run_demo(tmp_path / "a", minutes=1, num_train=2, num_val=1, from_scratch=True)
    assert r["route"] == "from-scratch" and seen[-1].name == demo.SCRATCH_CONFIG
    assert seen[-1].runtime.load_from is None
    assert "[demo] route: from scratch" in capsys.readouterr().out

    shipped.parent.mkdir()
    shipped.write_bytes(b"x")  # only its existence is checked before training
    r = demo.run_demo(tmp_path / "b", minutes=1, num_train=2, num_val=1)
    cfg = seen[-1]
    assert r["route"] == "pretrained" and cfg.name == demo.DEMO_CONFIG
    assert cfg.runtime.load_from == str(shipped) and cfg.schedule.by_time is True
    assert cfg.schedule.base_lr < load_config_lr(demo.SCRATCH_CONFIG), "fine-tuning uses a lower LR"
    assert f"[demo] route: pretrained ({demo.DEMO_CONFIG}, fine-tuning {shipped}" in capsys.readouterr().out


def load_config_lr(name: str) -> float:
    from comask.config import load_config

    return float(load_config(name).schedule.base_lr)
