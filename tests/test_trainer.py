"""The Trainer's loop and hooks on a toy model, and the batch sampler started at an iteration."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from comask.config import Config
from comask.data.loader import build_train_loader
from comask.data.sampler import GroupedInfiniteBatchSampler
from comask.engine.dist import DistInfo
from comask.engine.logging import TrainLogger
from comask.engine.trainer import HookBase, LRScheduleHook, NonFiniteLossError, Trainer


class _Toy(nn.Module):
    """(images, targets) -> {"loss_a": ...}: the call signature of a detection model in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        return {"loss_a": (self.w * torch.stack([im.sum() for im in images]).sum()) ** 2}


def _batches(value: float = 1.0):
    while True:
        yield [torch.full((1,), value)], [{"label": torch.zeros(1)}]


class _Recorder(HookBase):
    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def before_train(self, trainer: Trainer) -> None:
        self.calls.append((self.name, "before_train", trainer.iter))

    def after_step(self, trainer: Trainer) -> None:
        self.calls.append((self.name, "after_step", trainer.iter))

    def after_train(self, trainer: Trainer) -> None:
        self.calls.append((self.name, "after_train", trainer.iter))


def _trainer(tmp_path: Path, hooks: list, data=None, **kwargs) -> Trainer:
    model = _Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    result = {"iter": 0, "stop_reason": "completed", "checkpoint": None, "nonfinite_skipped": 0,
              "amp_overflow_skipped": 0, "elapsed_seconds": 0.0}
    logger = TrainLogger(tmp_path, max_iter=10, enabled=False, tensorboard=False, progress=False)
    return Trainer(
        model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), data or _batches(),
        device=torch.device("cpu"), amp_dtype=None,
        info=DistInfo(rank=0, world_size=1, local_rank=0, backend=None, initialized_here=False),
        logger=logger, result=result, clock=lambda: 0.0, t_start=0.0, hooks=hooks, **kwargs,
    )


def test_hooks_are_called_in_order(tmp_path: Path) -> None:
    calls: list = []
    trainer = _trainer(tmp_path, [_Recorder("a", calls), _Recorder("b", calls)])
    result = trainer.train(2, 5)
    steps = [(h, "after_step", i) for i in (3, 4, 5) for h in ("a", "b")]
    assert calls == [("a", "before_train", 2), ("b", "before_train", 2), *steps,
                     ("a", "after_train", 5), ("b", "after_train", 5)]
    assert result["iter"] == 5 and result["stop_reason"] == "completed"
    assert trainer.stepped and trainer.lr == 0.01 and trainer.values.keys() == {"loss_a"}


def test_a_signal_ends_the_loop_after_the_step_that_sees_it(tmp_path: Path) -> None:
    calls: list = []

    class Signal(HookBase):
        def after_step(self, trainer: Trainer) -> None:
            if trainer.iter == 2:
                trainer.stop.signal_name = "SIGTERM"  # what the handler does

    trainer = _trainer(tmp_path, [Signal(), _Recorder("r", calls)])
    result = trainer.train(0, 10)
    # the flag is read at the next step's agreement: step 3 runs, its hooks see the reason, the loop ends
    assert result["stop_reason"] == "SIGTERM" and result["iter"] == 3 and trainer.reason == "SIGTERM"
    assert calls[-2:] == [("r", "after_step", 3), ("r", "after_train", 3)]


def test_lr_schedule_hook_steps_the_scheduler_after_the_step(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [])
    scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=1, gamma=0.5)
    trainer.hooks = [LRScheduleHook(scheduler)]
    trainer.train(0, 2)
    # the step's own LR is recorded before the scheduler moves
    assert trainer.lr == pytest.approx(0.005) and trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0025)


def test_nonfinite_loss_raises_or_is_skipped(tmp_path: Path) -> None:
    calls: list = []
    with pytest.raises(NonFiniteLossError, match="non-finite loss at iteration 1"):
        _trainer(tmp_path, [_Recorder("r", calls)], data=_batches(float("nan"))).train(0, 3)
    assert calls == [("r", "before_train", 0)]  # no hook runs after the failing step
    trainer = _trainer(tmp_path, [], data=_batches(float("nan")), skip_nonfinite=True)
    result = trainer.train(0, 3)
    assert result["nonfinite_skipped"] == 3 and not trainer.stepped
    assert float(trainer.model.w.detach()) == 1.0  # no update written


@pytest.mark.parametrize(("groups", "batch", "world"), [
    ([0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 0, 1], 3, 1),
    ([i % 2 for i in range(17)], 2, 2),
    ([0] * 5, 4, 1),
])
@pytest.mark.parametrize("start", [0, 1, 7, 40])
def test_sampler_started_at_an_iteration_continues_the_same_sequence(groups, batch, world, start) -> None:
    for rank in range(world):
        def sampler(start_iter: int, rank: int = rank) -> GroupedInfiniteBatchSampler:
            return GroupedInfiniteBatchSampler(groups, batch, seed=5, rank=rank, world_size=world,
                                               start_iter=start_iter)

        skipped = list(itertools.islice(iter(sampler(0)), start, start + 25))
        assert list(itertools.islice(iter(sampler(start)), 25)) == skipped


def test_sampler_rejects_negative_start() -> None:
    with pytest.raises(ValueError, match="start_iter"):
        GroupedInfiniteBatchSampler([0, 1], 1, start_iter=-1)


class _Counting(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n, self.loaded = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.loaded.append(i)
        return torch.zeros(1), {"index": i}


def test_train_loader_started_at_an_iteration_loads_only_its_batches() -> None:
    cfg = Config({"schedule": {"ims_per_batch": 2}, "data": {"num_workers": 0}})
    full = _Counting(9)
    expected = [[t["index"] for t in ts] for _, ts in itertools.islice(iter(build_train_loader(cfg, full, seed=3)),
                                                                        12)][5:]
    ds = _Counting(9)
    got = [[t["index"] for t in ts] for _, ts in itertools.islice(
        iter(build_train_loader(cfg, ds, seed=3, start_iter=5)), 7)]
    assert got == expected
    assert ds.loaded == [i for b in expected for i in b]  # nothing loaded for the skipped batches
