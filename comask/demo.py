"""`comask demo`: synthetic data -> train a CPU-sized CoMask for a time budget -> eval -> overlays.

Two routes. The default fine-tunes the MobileNetV3-Large CoMask from the checkpoint shipped in
the package (comask/assets/comask_mnv3_shapes_demo.pth, which this project trained on the demo generator
with another seed; docs/PRETRAINED.md has the commands that rebuild it, in four stages). `--from-scratch`
trains the ResNet-18 demo model from random weights instead, for comparison: in 15 CPU minutes it stays far
below the fine-tuned model.

Training runs on the time-based schedule (`schedule.by_time`): whatever this machine's speed, and
however it changes during the run, the LR decays at fixed fractions of the training minutes and
training ends when they are spent.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from comask.checkpoint_io import ASSET_PREFIX, resolve_asset
from comask.config import load_config
from comask.errors import CheckpointError

DEMO_CONFIG = "comask_mnv3_mfpn_demo"  # fine-tunes PRETRAINED_FILE
SCRATCH_CONFIG = "comask_r18_mfpn_demo"  # --from-scratch
PRETRAINED_FILE = "comask_mnv3_shapes_demo.pth"
# How PRETRAINED_FILE is made (docs/PRETRAINED.md: four stages). The error for a missing file names the
# shortest route to a working file: the config as it is (stage 2, from the shipped stage-1 file), exported.
PRETRAIN_COMMAND = "comask train --config comask_mnv3_mfpn_shapes_demo_pretrain --out runs/demo_pretrain"
EXPORT_COMMAND = "comask export weights --weights runs/demo_pretrain/model_final.pth --half --out {path}"
_EVAL_SHARE = 0.12  # of the budget kept for data generation, evaluation and overlays
_NUM_OVERLAYS = 8
_CONFIG_MINUTES = 15.0  # the budget the demo config's warm-up (in iterations) is sized for


def plan_schedule(train_seconds: float, warmup: int) -> list[str]:
    """Overrides for a time-based schedule that fills `train_seconds`: LR decays at the config's
    `schedule.time_steps` fractions of it, training ends when it is spent (max_iter: a mere bound)."""
    # Warm-up stays in iterations; a shorter budget has fewer of them, so it gets a shorter warm-up.
    warmup = max(1, min(warmup, math.ceil(warmup * train_seconds / (_CONFIG_MINUTES * 60.0))))
    return [
        "schedule.by_time=true",
        f"runtime.max_minutes={train_seconds / 60:.4f}",
        "schedule.max_iter=1000000",
        f"schedule.warmup_iters={warmup}",
    ]


def pretrained_path() -> Path:
    """Where the installed package keeps the demo's checkpoint (independent of the working directory)."""
    return resolve_asset(ASSET_PREFIX + PRETRAINED_FILE)


def require_pretrained() -> Path:
    """The demo checkpoint's path; CheckpointError (one line: how to rebuild it) when it is missing."""
    path = pretrained_path()
    if not path.is_file() or path.stat().st_size == 0:
        raise CheckpointError(
            f"{path}: the demo's pretrained checkpoint is missing; rebuild it with `{PRETRAIN_COMMAND}` and then "
            f"`{EXPORT_COMMAND.format(path=path)}` (stage 2; docs/PRETRAINED.md has stages 3 and 4), or run `comask demo --from-scratch`"
        )
    return path


def _small_data(out: Path, preset: str, num_train: int | None, num_val: int | None) -> list[str]:
    """Write a smaller copy of the demo set under `out` (regenerated on every call: it is for quick
    checks) and return the overrides that train and evaluate on it."""
    from comask.data.synth import write_dataset

    root = (out / "data").resolve()
    if root.exists():
        shutil.rmtree(root)
    write_dataset(root, num_train=num_train, num_val=num_val, preset=preset, verbose=False)
    def split(name: str) -> str:  # JSON strings are YAML strings: any path survives the override parser
        ann, images = json.dumps(str(root / "annotations" / f"{name}.json")), json.dumps(str(root / name))
        return f"data.{name}={{ann: {ann}, images: {images}}}"

    return [split("train"), split("val"), "data.synth=null"]


def run_demo(out: str | Path, minutes: float = 15.0, seed: int = 0, num_train: int | None = None,
             num_val: int | None = None, from_scratch: bool = False) -> dict:
    """The demo; `num_train`/`num_val` replace the standard demo set by a smaller one in `out/data`.

    Fine-tunes the shipped checkpoint unless `from_scratch`. Returns {"route", "metrics", "iterations",
    "checkpoint", "metrics_path"}.
    """
    from comask.data.synth import ensure_synth
    from comask.engine.predict import Predictor, predict_paths
    from comask.engine.train import train

    t_start = time.monotonic()
    out = Path(out)
    budget = max(0.2, float(minutes)) * 60.0
    base = [f"runtime.seed={seed}"]
    if from_scratch:
        config_name, route = SCRATCH_CONFIG, "from-scratch"
        print(f"[demo] route: from scratch ({config_name}, random initial weights; --from-scratch)")
    else:
        config_name, route = DEMO_CONFIG, "pretrained"
        init = require_pretrained()  # before any data is generated: a missing file costs nothing
        # JSON string: a YAML string whatever characters the install path has
        base.append(f"runtime.load_from={json.dumps(str(init))}")
        print(f"[demo] route: pretrained ({config_name}, fine-tuning {init}; docs/PRETRAINED.md)")
    cfg = load_config(config_name, base)
    if num_train is None and num_val is None:
        root = ensure_synth(cfg.data.synth.preset, cfg.data.synth.root)
    else:
        base += _small_data(out, cfg.data.synth.preset, num_train, num_val)
        cfg = load_config(config_name, base)
        root = Path(cfg.data.train.images).parent
    print(f"[demo] data: {root} ({cfg.model.num_classes} classes)")

    elapsed = time.monotonic() - t_start
    train_seconds = max(10.0, budget * (1 - _EVAL_SHARE) - elapsed)
    plan = plan_schedule(train_seconds, int(cfg.schedule.warmup_iters))
    print(f"[demo] {train_seconds / 60:.1f} min of training, LR x{cfg.schedule.gamma} at "
          f"{', '.join(f'{f:.0%}' for f in cfg.schedule.time_steps)} of it")
    cfg = load_config(config_name, [*base, *plan])

    run_dir = out / "train"
    if run_dir.is_dir():  # a demo is a fresh run each time; its budget and schedule are re-planned
        print(f"[demo] replacing the previous demo run in {run_dir}")
        shutil.rmtree(run_dir)
    result = train(cfg, run_dir)
    if result["stop_reason"] not in ("completed", "time_limit"):
        print(f"[demo] training stopped ({result['stop_reason']}); checkpoint {result.get('checkpoint')}")
        return {"route": route, "metrics": {}, "iterations": result["iter"], "checkpoint": result.get("checkpoint"),
                "metrics_path": None}
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        (out / "metrics.json").write_text(metrics_path.read_text())
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}

    val_dir = Path(cfg.data.val.images)
    images = sorted(val_dir.glob("*.png"))[:_NUM_OVERLAYS]
    predict_paths(images, out / "predictions", predictor=Predictor(result["final"], score_thr=0.5))

    segm = metrics.get("segm", {})
    bbox = metrics.get("bbox", {})
    print(f"[demo] done in {(time.monotonic() - t_start) / 60:.1f} min, {result['iter']} iterations ({route})")
    print(f"[demo] mask AP {segm.get('AP', float('nan')):.3f} (AP50 {segm.get('AP50', float('nan')):.3f}), "
          f"box AP {bbox.get('AP', float('nan')):.3f}")
    print(f"[demo] metrics:     {out / 'metrics.json'}")
    print(f"[demo] overlays:    {out / 'predictions'}/")
    print(f"[demo] checkpoint:  {result.get('final')}")
    return {"route": route, "metrics": metrics, "iterations": result["iter"], "checkpoint": result.get("final"),
            "metrics_path": str(out / "metrics.json")}

