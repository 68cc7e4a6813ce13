"""`comask train` from the command line: user errors as one line (exit 2), and the documented
multi-process launch `torchrun --nproc_per_node=2 -m comask train ...` with the real CoMask model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import NUM_CLASSES, write_tiny_coco  # noqa: E402

from comask.cli import main  # noqa: E402
from comask.config import CONFIG_DIR  # noqa: E402
from comask.engine.checkpoint import load_checkpoint  # noqa: E402


def _tiny_comask_config(tmp_path: Path, root: Path) -> tuple[Path, list[str]]:
    cfg = tmp_path / "tiny_comask.yaml"
    bases = [CONFIG_DIR / "_base_" / p for p in ("models/comask_r18_cpu.yaml", "datasets/coco_instance.yaml",
                                                  "schedules/schedule_1x.yaml", "default_runtime.yaml")]
    cfg.write_text("_base_:\n" + "".join(f"  - {b}\n" for b in bases))
    opts = [
        f"data.train={{ann: {root}/annotations/train.json, images: {root}/train}}",
        f"data.val={{ann: {root}/annotations/val.json, images: {root}/val}}",
        "data.num_workers=0", f"model.num_classes={NUM_CLASSES}", "model.fpn.channels=32",
        "model.collab_head.conv_dim=32", "model.collab_head.num_convs=2", "model.box_head.fc_dim=64",
        "model.roi.batch_size_per_image=32", "input.min_size_train=[64]", "input.max_size_train=64",
        "input.min_size_test=64", "input.max_size_test=64", "schedule.ims_per_batch=2", "schedule.max_iter=3",
        "schedule.warmup_iters=2", "schedule.steps=[2]", "runtime.checkpoint_period=2", "runtime.log_period=1",
        "runtime.progress=false", "runtime.tensorboard=false",
    ]
    return cfg, opts


def test_cli_reports_unusable_output_dir_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["train", "--config", "maskrcnn_r50_fpn_2x_coco", "--out", str(blocker / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("comask: error: output directory") and str(blocker / "run") in err
    assert len(err.splitlines()) == 1


@pytest.mark.slow
def test_torchrun_two_processes_comask_cli(tmp_path: Path) -> None:
    root = write_tiny_coco(tmp_path / "data")
    cfg, opts = _tiny_comask_config(tmp_path, root)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "comask", "train", "--config", str(cfg), "--out", str(out), "--opts", *opts,
         # the time-based schedule's elapsed time is rank 0's, agreed in the per-step all-reduce
         "schedule.by_time=true", "runtime.max_minutes=30"],
        capture_output=True, text=True, env=env, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    sync = [r for r in recs if r.get("event") == "ddp_sync"]
    assert sync and sync[0]["in_sync"] and len(set(sync[0]["digests"])) == 1 and len(sync[0]["digests"]) == 2
    assert [r["iter"] for r in recs if "loss" in r] == [1, 2, 3]
    done = next(r for r in recs if r.get("event") == "done")
    assert done["stop_reason"] == "completed" and 0 < done["elapsed_seconds"] < 30 * 60
    assert {"loss_mask", "loss_offset"} <= set(next(r for r in recs if "loss" in r)), "CoMask's own losses"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 4, "evaluation gathered all validation images across the two ranks"
    final = load_checkpoint(out / "model_final.pth")
    assert final["config"]["model"]["type"] == "comask" and final["iter"] == 3
    assert (out / "config.yaml").is_file()
