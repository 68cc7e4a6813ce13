"""SGD with linear LR scaling, linear warm-up and multi-step decay.

The schedule is a LambdaLR over a small callable object, so its whole state (warm-up, steps,
gamma) goes into `scheduler.state_dict()` as plain numbers and a resumed run continues it exactly.

The decays come at iterations (`schedule.steps`) or, with `schedule.by_time`, at fractions of the
wall-clock budget `runtime.max_minutes` (`schedule.time_steps`): the trainer tells the schedule how
much of the budget is spent (`set_time_progress`) before each `scheduler.step()`. Warm-up is always
counted in iterations.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from comask.config import ConfigError

_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
)


def scaled_lr(schedule: Mapping[str, Any]) -> float:
    """base_lr * ims_per_batch / base_batch: the linear scaling rule for the total batch size."""
    base_batch = schedule.get("base_batch") or schedule["ims_per_batch"]
    return float(schedule["base_lr"]) * float(schedule["ims_per_batch"]) / float(base_batch)


class WarmupMultiStep:
    """LR factor at iteration `it`: linear warm-up from `warmup_factor` to 1 over `warmup_iters`,
    times gamma ** (number of `steps` already passed).

    With `by_time`, `steps` are fractions of the time budget and are compared with `self.progress`
    (the fraction spent, set from outside) instead of the iteration."""

    def __init__(self, steps: Sequence[float], gamma: float, warmup_iters: int, warmup_factor: float,
                 by_time: bool = False):
        key = "time_steps" if by_time else "steps"
        steps = [float(s) for s in steps] if by_time else [int(s) for s in steps]
        if steps != sorted(steps):
            raise ConfigError(f"schedule.{key} must be increasing, got {steps}")
        if by_time and any(not 0.0 < s <= 1.0 for s in steps):
            raise ConfigError(f"schedule.time_steps are fractions of runtime.max_minutes in (0, 1], got {steps}")
        self.steps = steps
        self.gamma = float(gamma)
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        self.by_time = bool(by_time)
        self.progress = 0.0

    def __call__(self, it: int) -> float:
        factor = 1.0
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            factor = self.warmup_factor * (1.0 - alpha) + alpha
        position = self.progress if self.by_time else it
        return factor * self.gamma ** bisect_right(self.steps, position)


def param_groups(
    model: nn.Module, weight_decay: float, weight_decay_norm: float | None = None
) -> list[dict[str, Any]]:
    """Trainable parameters split so normalisation weights and all biases can get their own decay
    (`weight_decay_norm`; None = the same as `weight_decay`)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if weight_decay_norm is not None and (isinstance(module, _NORM_TYPES) or name == "bias"):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": weight_decay_norm})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, schedule: Mapping[str, Any]) -> torch.optim.SGD:
    """SGD with momentum and weight decay at the linearly scaled LR."""
    groups = param_groups(model, float(schedule.get("weight_decay", 0.0)), schedule.get("weight_decay_norm"))
    if not groups:
        raise ConfigError("the model has no trainable parameters (everything frozen?); check model.backbone")
    return torch.optim.SGD(
        groups, lr=scaled_lr(schedule), momentum=float(schedule.get("momentum", 0.9)),
    )


def _schedule_fn(schedule: Mapping[str, Any]) -> WarmupMultiStep:
    by_time = bool(schedule.get("by_time"))
    return WarmupMultiStep(
        steps=(schedule.get("time_steps") if by_time else schedule.get("steps")) or [],
        gamma=schedule.get("gamma", 0.1),
        warmup_iters=schedule.get("warmup_iters", 0) or 0,
        warmup_factor=schedule.get("warmup_factor", 1.0),
        by_time=by_time,
    )


def set_time_progress(scheduler: torch.optim.lr_scheduler.LambdaLR, fraction: float) -> None:
    """By-time schedules: `fraction` of the wall-clock budget is spent; the next `scheduler.step()`
    takes it into account. Iteration schedules ignore it."""
    for fn in scheduler.lr_lambdas:
        if isinstance(fn, WarmupMultiStep):
            fn.progress = float(fraction)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Mapping[str, Any]) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration LambdaLR: call `.step()` once after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule_fn(schedule))


def apply_schedule(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, schedule: Mapping[str, Any],
    progress: float = 0.0,
) -> None:
    """After restoring a checkpoint's scheduler state: keep its iteration count but take the LR,
    warm-up and steps from `schedule` (the current config), so extending a finished run with a
    new max_iter/steps/base_lr does what the config says. A no-op for an unchanged config.
    `progress`: for by-time schedules, the fraction of the budget the restored run had spent."""
    fn = _schedule_fn(schedule)
    fn.progress = float(progress)
    base = scaled_lr(schedule)
    scheduler.lr_lambdas = [fn for _ in optimizer.param_groups]
    scheduler.base_lrs = [base for _ in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["initial_lr"] = base
        g["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
