"""Training engine, in process: resume equivalence, outputs, schedule, non-finite losses, early errors.

The model is torchvision's Mask R-CNN (tests/_train_helpers.py), not CoMask: the engine must
train any torchvision-style detector.
"""

from __future__ import annotations

import json
import math
import signal
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import NaNAt, NaNGradAt, state_equal, tiny_cfg, tiny_maskrcnn, write_tiny_coco  # noqa: E402

from comask.config import ConfigError  # noqa: E402
from comask.engine.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint  # noqa: E402
from comask.engine.optim import (  # noqa: E402
    WarmupMultiStep,
    apply_schedule,
    build_optimizer,
    build_scheduler,
    scaled_lr,
    set_time_progress,
)  # noqa: E402
from comask.engine.runtime import OutputDirError  # noqa: E402
from comask.engine.train import NonFiniteLossError, train  # noqa: E402
from comask.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_coco(tmp_path_factory.mktemp("tiny_coco"))


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


class SignalAt(nn.Module):
    """Wraps a detector; raises `sig` at this process during the `at`-th training forward (None = never)."""

    def __init__(self, inner: nn.Module, at: int | None):
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, images, targets=None):
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                signal.raise_signal(signal.SIGINT)
        return self.inner(images, targets)


def test_interrupted_and_resumed_run_reaches_identical_weights(data_root: Path, tmp_path: Path) -> None:
    """6 iterations straight vs. Ctrl-C during iteration 4 (checkpoint at 4) + --resume to 6."""
    cfg = tiny_cfg(data_root, "runtime.checkpoint_period=100", "schedule.steps=[3]")
    # whatever the runner left (a background job starts with SIGINT ignored), training must put it back
    before = signal.getsignal(signal.SIGINT)
    straight = train(cfg, tmp_path / "a", model_factory=lambda c: SignalAt(tiny_maskrcnn(c), None))
    assert straight["exit_code"] == 0 and straight["iter"] == 6

    first = train(cfg, tmp_path / "b", model_factory=lambda c: SignalAt(tiny_maskrcnn(c), 4))
    assert first["stop_reason"] == "SIGINT" and first["exit_code"] == 130
    assert first["iter"] == 4 and first["final"] is None
    assert [it for it, _ in list_checkpoints(tmp_path / "b")] == [4]
    assert signal.getsignal(signal.SIGINT) is before, "handlers must be restored"

    resumed = train(cfg, tmp_path / "b", resume=True, model_factory=lambda c: SignalAt(tiny_maskrcnn(c), None))
    assert resumed["exit_code"] == 0 and resumed["iter"] == 6

    a = load_checkpoint(tmp_path / "a" / "model_final.pth")
    b = load_checkpoint(tmp_path / "b" / "model_final.pth")
    assert state_equal(a["model"], b["model"]) == []
    # The comparison is meaningful: training moved the weights away from their initialisation.
    init = SignalAt(tiny_maskrcnn(cfg), None).state_dict()
    assert state_equal(init, a["model"]) != []
    # Same losses logged at every iteration of both runs.
    la = {r["iter"]: r["loss"] for r in _records(tmp_path / "a") if "loss" in r}
    lb = {r["iter"]: r["loss"] for r in _records(tmp_path / "b") if "loss" in r}
    assert la == lb and sorted(la) == [1, 2, 3, 4, 5, 6]
    assert any(r.get("event") == "resumed" and r["iter"] == 4 for r in _records(tmp_path / "b"))


def test_outputs_logs_and_schedule(data_root: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(data_root, "runtime.tensorboard=true", "runtime.keep_last=1", "runtime.checkpoint_period=2",
                   "runtime.eval_period=3", "runtime.final_eval=true", "schedule.clip_grad_norm=5.0",
                   "schedule.ims_per_batch=4", "schedule.base_batch=8", "schedule.base_lr=0.02")
    out = tmp_path / "run"
    res = train(cfg, out, model_factory=tiny_maskrcnn)
    assert res["exit_code"] == 0 and res["stop_reason"] == "completed"
    names = sorted(p.name for p in out.iterdir())
    for f in ("config.yaml", "log.jsonl", "metrics.json", "model_best.pth", "model_final.pth", "tb"):
        assert f in names
    assert [it for it, _ in list_checkpoints(out)] == [6], "keep_last=1 keeps only the newest"
    assert list((out / "tb").iterdir()), "TensorBoard event file written"

    recs = _records(out)
    steps = [r for r in recs if "loss" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        assert {"lr", "loss_classifier", "loss_mask", "time", "eta", "eta_seconds"} <= set(r)
        assert math.isfinite(r["loss"])
    # lr = 0.02 * 4 / 8 = 0.01; warm-up over 2 iterations from 0.1; x0.1 after step 4.
    lrs = [r["lr"] for r in steps]
    assert lrs == pytest.approx([0.001, 0.0055, 0.01, 0.01, 0.001, 0.001])
    assert [r["iter"] for r in recs if "eval" in r] == [3, 6]

    metrics = json.loads((out / "metrics.json").read_text())
    assert "segm" in metrics and "bbox" in metrics
    final = load_checkpoint(out / "model_final.pth")
    assert final["iter"] == 6
    assert final["meta"]["cat_ids"] and len(final["meta"]["classes"]) == 3
    assert final["config"]["schedule"]["max_iter"] == 6 and "optimizer" not in final
    full = load_checkpoint(out / "model_0000006.pth")
    assert {"model", "optimizer", "scheduler", "scaler", "iter", "rng", "config", "meta"} <= set(full)
    assert full["scheduler"]["last_epoch"] == 6
    best = load_checkpoint(out / "model_best.pth")
    assert best["best"]["metric"] == "segm/AP"


def test_warmup_multistep_and_linear_scaling() -> None:
    f = WarmupMultiStep(steps=[10, 20], gamma=0.1, warmup_iters=4, warmup_factor=0.2)
    assert [f(i) for i in (0, 2, 4, 9)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    assert [f(i) for i in (10, 19, 20, 100)] == pytest.approx([0.1, 0.1, 0.01, 0.01])
    assert scaled_lr({"base_lr": 0.02, "ims_per_batch": 4, "base_batch": 16}) == pytest.approx(0.005)
    with pytest.raises(ConfigError):
        WarmupMultiStep(steps=[20, 10], gamma=0.1, warmup_iters=0, warmup_factor=1.0)


def test_scheduler_state_resumes_through_weights_only(tmp_path: Path) -> None:
    sched_cfg = {"base_lr": 0.1, "ims_per_batch": 2, "base_batch": 2, "momentum": 0.9, "weight_decay": 1e-4,
                 "weight_decay_norm": 0.0, "steps": [3], "gamma": 0.5, "warmup_iters": 2, "warmup_factor": 0.5}
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    opt = build_optimizer(net, sched_cfg)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert len(opt.param_groups[1]["params"]) == 3  # linear bias + BN weight and bias
    sch = build_scheduler(opt, sched_cfg)
    for _ in range(2):
        opt.step()
        sch.step()
    save_checkpoint({"model": {}, "scheduler": sch.state_dict()}, tmp_path / "s.pth")
    opt2 = build_optimizer(net, sched_cfg)
    sch2 = build_scheduler(opt2, sched_cfg)
    sch2.load_state_dict(load_checkpoint(tmp_path / "s.pth")["scheduler"])
    for _ in range(3):
        opt.step()
        sch.step()
        opt2.step()
        sch2.step()
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    # Extending a run with a new schedule: the restored iteration count, the config's LR and steps.
    longer = {**sched_cfg, "base_lr": 0.2, "steps": [10]}
    apply_schedule(opt2, sch2, longer)
    assert sch2.last_epoch == 5 and opt2.param_groups[0]["lr"] == pytest.approx(0.2)
    opt2.step()
    sch2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.2)
    sch2.last_epoch = 9
    opt2.step()
    sch2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1)


def test_nonfinite_loss_stops_with_clear_message(data_root: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(data_root, "runtime.checkpoint_period=3")
    with pytest.raises(NonFiniteLossError) as e:
        train(cfg, tmp_path / "run", model_factory=lambda c: NaNAt(tiny_maskrcnn(c), at=5))
    msg = str(e.value)
    assert "iteration 5" in msg and "loss_mask" in msg and "model_0000003.pth" in msg
    assert "skip_nonfinite" in msg
    assert [it for it, _ in list_checkpoints(tmp_path / "run")] == [3], "no checkpoint after the bad step"
    good = load_checkpoint(tmp_path / "run" / "model_0000003.pth")
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_nonfinite_loss_skipped_when_asked(data_root: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(data_root, "runtime.skip_nonfinite=true", "runtime.checkpoint_period=100")
    res = train(cfg, tmp_path / "run", model_factory=lambda c: NaNAt(tiny_maskrcnn(c), at=2))
    assert res["exit_code"] == 0 and res["iter"] == 6 and res["nonfinite_skipped"] == 1
    final = load_checkpoint(tmp_path / "run" / "model_final.pth")["model"]
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    events = [r for r in _records(tmp_path / "run") if r.get("event") == "nonfinite_skip"]
    assert len(events) == 1 and events[0]["iter"] == 2 and events[0]["losses"]["loss_mask"] == "nan"


def test_nonfinite_gradient_with_finite_loss_is_caught(data_root: Path, tmp_path: Path) -> None:
    # without the check, clip_grad_norm_ scales every gradient by 10 / NaN and the weights turn NaN silently
    cfg = tiny_cfg(data_root, "schedule.clip_grad_norm=10", "runtime.checkpoint_period=100")
    with pytest.raises(NonFiniteLossError, match="non-finite gradient at iteration 3"):
        train(cfg, tmp_path / "stop", model_factory=lambda c: NaNGradAt(tiny_maskrcnn(c), at=3))
    res = train(tiny_cfg(data_root, "schedule.clip_grad_norm=10", "runtime.skip_nonfinite=true",
                         "runtime.checkpoint_period=100"),
                tmp_path / "skip", model_factory=lambda c: NaNGradAt(tiny_maskrcnn(c), at=3))
    assert res["iter"] == 6 and res["nonfinite_skipped"] == 1
    final = load_checkpoint(tmp_path / "skip" / "model_final.pth")["model"]
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())


def _never_called(cfg):
    raise AssertionError("the model must not be built when the output directory is unusable")


def test_unwritable_output_dir_fails_before_building(data_root: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match="cannot create it") as e:
        train(tiny_cfg(data_root), blocker / "run", model_factory=_never_called)
    assert str(blocker / "run") in str(e.value)
    with pytest.raises(OutputDirError, match="min_free_mb"):
        train(tiny_cfg(data_root, "runtime.min_free_mb=1e12"), tmp_path / "full", model_factory=_never_called)


def test_refuses_to_mix_runs_and_bad_class_count(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    save_checkpoint({"model": {}, "iter": 3}, out / "model_0000003.pth")
    with pytest.raises(OutputDirError, match="--resume"):
        train(tiny_cfg(data_root), out, model_factory=_never_called)
    with pytest.raises(ConfigError, match="model.num_classes=3"):
        train(tiny_cfg(data_root, "model.num_classes=5"), tmp_path / "other", model_factory=_never_called)


def test_fine_tune_from_other_class_count(data_root: Path, tmp_path: Path) -> None:
    """runtime.load_from: strict by default (clear error), load_strict=false loads what matches."""
    other = tiny_cfg(data_root, "model.num_classes=7")
    src = tiny_maskrcnn(other)
    save_checkpoint({"model": src.state_dict()}, tmp_path / "src.pth")
    cfg = tiny_cfg(data_root, f"runtime.load_from={tmp_path / 'src.pth'}", "schedule.max_iter=1")
    with pytest.raises(UserError, match="different shapes.*box_predictor.cls_score.weight"):
        train(cfg, tmp_path / "strict", model_factory=tiny_maskrcnn)
    cfg = tiny_cfg(data_root, f"runtime.load_from={tmp_path / 'src.pth'}", "runtime.load_strict=false",
                   "schedule.max_iter=1", "schedule.base_lr=0.0")
    res = train(cfg, tmp_path / "loose", model_factory=tiny_maskrcnn)
    got = res["model"].state_dict()
    key = "backbone.body.layer1.0.conv1.weight"
    assert torch.equal(got[key], src.state_dict()[key])
    assert got["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4


def test_load_only_takes_the_named_prefixes_and_nothing_else(data_root: Path, tmp_path: Path) -> None:
    """runtime.load_only=[backbone.body.]: the source's body, none of its other tensors."""
    src = tiny_maskrcnn(tiny_cfg(data_root))
    save_checkpoint({"model": src.state_dict()}, tmp_path / "src.pth")
    cfg = tiny_cfg(data_root, f"runtime.load_from={tmp_path / 'src.pth'}", "runtime.load_only=[backbone.body.]",
                   "schedule.max_iter=1", "schedule.base_lr=0.0", "runtime.seed=123")
    got = train(cfg, tmp_path / "run", model_factory=tiny_maskrcnn)["model"].state_dict()
    body, head = "backbone.body.layer1.0.conv1.weight", "roi_heads.box_head.fc6.weight"
    assert torch.equal(got[body], src.state_dict()[body])
    assert not torch.equal(got[head], src.state_dict()[head])
    bad = tiny_cfg(data_root, f"runtime.load_from={tmp_path / 'src.pth'}", "runtime.load_only=[nothing.]")
    with pytest.raises(UserError, match=r"load_only.*nothing\."):
        train(bad, tmp_path / "bad", model_factory=tiny_maskrcnn)


def test_asset_paths_name_the_packaged_files() -> None:
    from comask.checkpoint_io import resolve_asset

    shipped = resolve_asset("asset:comask_mnv3_shapes_demo.pth")
    assert shipped.is_file() and shipped.parent.name == "assets"
    assert resolve_asset("runs/x/model_final.pth") == Path("runs/x/model_final.pth")
    # every checkpoint reader goes through load_checkpoint, so `asset:` works wherever a checkpoint path does
    assert "backbone.body.0.0.weight" in load_checkpoint("asset:comask_mnv3_shapes_demo.pth")["model"]


def test_time_budget_ends_training_like_max_iter(data_root: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(data_root, "schedule.max_iter=1000", "runtime.max_minutes=0.0001", "runtime.checkpoint_period=500")
    res = train(cfg, tmp_path / "run", model_factory=tiny_maskrcnn)
    assert res["stop_reason"] == "time_limit" and res["exit_code"] == 0
    assert res["iter"] == 1, "the budget is checked after every step"
    assert load_checkpoint(tmp_path / "run" / "model_final.pth")["iter"] == 1
    assert [it for it, _ in list_checkpoints(tmp_path / "run")] == [1]
    done = [r for r in _records(tmp_path / "run") if r.get("event") == "done"]
    assert done and done[0]["stop_reason"] == "time_limit"


class FakeClock:
    """A monotonic clock that only moves when told: simulated wall time, no sleeping."""

    def __init__(self, start: float = 0.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


class TickPerStep(nn.Module):
    """Wraps a detector; each training forward advances `clock` by `seconds` (a step's simulated cost),
    and the `signal_at`-th one raises SIGINT (None = never)."""

    def __init__(self, inner: nn.Module, clock: FakeClock, seconds: float, signal_at: int | None = None):
        super().__init__()
        self.inner, self.clock, self.seconds, self.signal_at, self.calls = inner, clock, seconds, signal_at, 0

    def forward(self, images, targets=None):
        if self.training:
            self.calls += 1
            self.clock.now += self.seconds
            if self.calls == self.signal_at:
                signal.raise_signal(signal.SIGINT)
        return self.inner(images, targets)


def test_time_schedule_lr_at_simulated_elapsed_times() -> None:
    """Decays follow the fraction of the budget spent, whatever the iteration; warm-up follows iterations."""
    sched_cfg = {"base_lr": 0.1, "ims_per_batch": 2, "base_batch": 2, "steps": [1], "gamma": 0.1,
                 "by_time": True, "time_steps": [0.5, 0.9], "warmup_iters": 4, "warmup_factor": 0.5}
    net = nn.Linear(2, 2)
    opt = build_optimizer(net, sched_cfg)
    sch = build_scheduler(opt, sched_cfg)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05), "warm-up starts at warmup_factor"
    lrs = []
    for fraction in (0.1, 0.2, 0.3, 0.49, 0.5, 0.89, 0.9, 1.0):
        opt.step()
        set_time_progress(sch, fraction)
        sch.step()
        lrs.append(opt.param_groups[0]["lr"])
    # iterations 1-3 warm up (0.0625, 0.075, 0.0875 x the base), schedule.steps=[1] is ignored
    assert lrs == pytest.approx([0.0625, 0.075, 0.0875, 0.1, 0.01, 0.01, 0.001, 0.001])
    # a decay during warm-up multiplies the warm-up factor
    f = WarmupMultiStep(steps=[0.25], gamma=0.1, warmup_iters=4, warmup_factor=0.5, by_time=True)
    f.progress = 0.3
    assert f(2) == pytest.approx(0.075)
    with pytest.raises(ConfigError, match="time_steps"):
        WarmupMultiStep(steps=[0.5, 1.5], gamma=0.1, warmup_iters=0, warmup_factor=1.0, by_time=True)
    with pytest.raises(ConfigError, match="time_steps must be increasing"):
        WarmupMultiStep(steps=[0.9, 0.5], gamma=0.1, warmup_iters=0, warmup_factor=1.0, by_time=True)


_BY_TIME = ("schedule.by_time=true", "schedule.time_steps=[0.5, 0.75]", "schedule.max_iter=1000",
            "schedule.warmup_iters=0", "runtime.max_minutes=0.6", "runtime.checkpoint_period=100")


def test_time_schedule_decays_and_stops_when_budget_spent(data_root: Path, tmp_path: Path) -> None:
    """6 simulated seconds per step, a 36 s budget: LR x0.1 once half is spent, x0.01 at 3/4, stop at 36 s."""
    clock = FakeClock(100.0)
    cfg = tiny_cfg(data_root, *_BY_TIME)
    res = train(cfg, tmp_path / "run", model_factory=lambda c: TickPerStep(tiny_maskrcnn(c), clock, 6.0),
                clock=clock)
    assert res["stop_reason"] == "time_limit" and res["exit_code"] == 0
    assert res["iter"] == 6, "max_iter=1000 is only an upper bound: the budget ends the run"
    assert res["elapsed_seconds"] == pytest.approx(36.0)
    steps = [r for r in _records(tmp_path / "run") if "loss" in r]
    # iteration k runs at the LR set after iteration k-1, when 6(k-1) of 36 s were spent
    assert [r["lr"] for r in steps] == pytest.approx([0.01, 0.01, 0.01, 0.001, 0.001, 0.0001])
    # the ETA points at the end of the budget, not at max_iter=1000 (real step times, simulated budget)
    for r in steps:
        assert 36 - 6 * r["iter"] - r["time"] <= r["eta_seconds"] <= 36 - 6 * r["iter"] + 1e-9, r
    full = load_checkpoint(tmp_path / "run" / "model_0000006.pth")
    assert full["elapsed_seconds"] == pytest.approx(36.0)
    assert (tmp_path / "run" / "model_final.pth").is_file()


def test_time_schedule_resume_continues_elapsed_time(data_root: Path, tmp_path: Path) -> None:
    """Ctrl-C after 3 steps (18 s), resume on a clock that reads something else entirely: the run goes on
    from 18 s, so the LRs and the stop are those of the uninterrupted run."""
    cfg = tiny_cfg(data_root, *_BY_TIME)
    clock = FakeClock()
    first = train(cfg, tmp_path / "run", clock=clock,
                  model_factory=lambda c: TickPerStep(tiny_maskrcnn(c), clock, 6.0, signal_at=3))
    assert first["stop_reason"] == "SIGINT" and first["iter"] == 3
    assert load_checkpoint(tmp_path / "run" / "model_0000003.pth")["elapsed_seconds"] == pytest.approx(18.0)

    clock = FakeClock(5000.0)
    resumed = train(cfg, tmp_path / "run", resume=True, clock=clock,
                    model_factory=lambda c: TickPerStep(tiny_maskrcnn(c), clock, 6.0))
    assert resumed["stop_reason"] == "time_limit" and resumed["iter"] == 6
    assert resumed["elapsed_seconds"] == pytest.approx(36.0)
    lrs = {r["iter"]: r["lr"] for r in _records(tmp_path / "run") if "loss" in r}
    assert [lrs[i] for i in range(1, 7)] == pytest.approx([0.01, 0.01, 0.01, 0.001, 0.001, 0.0001])


def test_time_schedule_needs_a_budget(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="runtime.max_minutes"):
        train(tiny_cfg(data_root, "schedule.by_time=true"), tmp_path / "run", model_factory=_never_called)
