"""`comask demo`: synthetic data -> train a CPU-sized CoMask for a time budget -> eval -> overlays.

The learning-rate schedule is counted in iterations, so the demo first times a few training steps
on this machine and sets `schedule.max_iter` (and the decay steps) to what fits the budget; the
training's own `runtime.max_minutes` stays on as a hard stop.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from comask.config import Config, load_config

DEMO_CONFIG = "comask_r18_mfpn_demo"
_EVAL_SHARE = 0.12  # of the budget kept for data generation, evaluation and overlays
_NUM_OVERLAYS = 8


def _time_train_steps(cfg: Config, steps: int = 4) -> float:
    """Seconds of one training iteration of `cfg`'s model on its training data, after a warm-up.

    The fastest of a few steps: a step slowed by another process on the machine would shrink the
    whole schedule, while `runtime.max_minutes` still stops a run that turns out slower."""
    from comask.bench.speed import timed_sgd_steps
    from comask.data.loader import build_dataset, build_train_loader
    from comask.modeling.build import build_model

    torch.manual_seed(int(cfg.runtime.seed))
    ds = build_dataset(cfg, "train")
    loader = iter(build_train_loader(cfg, ds, seed=int(cfg.runtime.seed)))
    model = build_model(cfg)
    model.train()
    return min(timed_sgd_steps(model, lambda: next(loader), repeats=steps, warmup=1))


def plan_schedule(train_seconds: float, sec_per_iter: float, warmup: int) -> list[str]:
    """Overrides that fit the step schedule into `train_seconds` (decay at 75% and 92% of it)."""
    # later iterations are slower than the first ones (more proposals survive into the RoI heads)
    iters = max(1, int(train_seconds / (sec_per_iter * 1.15)))
    return [
        f"schedule.max_iter={iters}",
        f"schedule.steps=[{max(1, int(iters * 0.75))}, {max(1, int(iters * 0.92))}]",
        f"schedule.warmup_iters={min(warmup, max(1, iters // 4))}",
    ]


def run_demo(out: str | Path, minutes: float = 15.0, seed: int = 0) -> dict:
    from comask.data.synth import ensure_synth
    from comask.engine.predict import Predictor, predict_paths
    from comask.engine.train import train

    t_start = time.monotonic()
    out = Path(out)
    budget = max(0.2, float(minutes)) * 60.0
    cfg = load_config(DEMO_CONFIG, [f"runtime.seed={seed}"])
    root = ensure_synth(cfg.data.synth.preset, cfg.data.synth.root)
    print(f"[demo] data: {root} ({cfg.model.num_classes} classes)")

    sec_per_iter = _time_train_steps(cfg)
    elapsed = time.monotonic() - t_start
    train_seconds = max(10.0, budget * (1 - _EVAL_SHARE) - elapsed)
    plan = plan_schedule(train_seconds, sec_per_iter, int(cfg.schedule.warmup_iters))
    print(f"[demo] {sec_per_iter:.2f} s/iteration here -> {plan[0]} for {train_seconds / 60:.1f} min of training")
    cfg = load_config(DEMO_CONFIG, [f"runtime.seed={seed}", f"runtime.max_minutes={train_seconds / 60:.3f}", *plan])

    run_dir = out / "train"
    if run_dir.is_dir():  # a demo is a fresh run each time; its budget and schedule are re-planned
        print(f"[demo] replacing the previous demo run in {run_dir}")
        shutil.rmtree(run_dir)
    result = train(cfg, run_dir)
    if result["stop_reason"] not in ("completed", "time_limit"):
        print(f"[demo] training stopped ({result['stop_reason']}); checkpoint {result.get('checkpoint')}")
        return {"metrics": {}, "iterations": result["iter"], "checkpoint": result.get("checkpoint")}
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        (out / "metrics.json").write_text(metrics_path.read_text())
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}

    val_dir = Path(cfg.data.val.images)
    images = sorted(val_dir.glob("*.png"))[:_NUM_OVERLAYS]
    predict_paths(images, out / "predictions", predictor=Predictor(result["final"], score_thr=0.5))

    segm = metrics.get("segm", {})
    bbox = metrics.get("bbox", {})
    print(f"[demo] done in {(time.monotonic() - t_start) / 60:.1f} min, {result['iter']} iterations")
    print(f"[demo] mask AP {segm.get('AP', float('nan')):.3f} (AP50 {segm.get('AP50', float('nan')):.3f}), "
          f"box AP {bbox.get('AP', float('nan')):.3f}")
    print(f"[demo] metrics:     {out / 'metrics.json'}")
    print(f"[demo] overlays:    {out / 'predictions'}/")
    print(f"[demo] checkpoint:  {result.get('final')}")
    return {"metrics": metrics, "iterations": result["iter"], "checkpoint": result.get("final")}

