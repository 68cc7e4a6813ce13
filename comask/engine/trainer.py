"""The training step and loop, with hooks for everything around them (after Detectron2's SimpleTrainer).

`Trainer.run_step()` does one iteration: next batch, forward under autocast, backward, one all-reduce
that agrees across ranks on a non-finite loss, a signal and the time spent, then gradient clipping
and the optimizer / GradScaler step (or the skip of a non-finite step). `Trainer.train()` calls the
hooks around the steps and ends the loop on `max_iter`, the time budget or a signal.

Hooks run in the order given, after each step:
`LRScheduleHook` (scheduler.step, by-time progress) -> `LoggingHook` (iteration time, ETA, window of
losses averaged over ranks) -> `CheckpointHook` (full checkpoint with every rank's RNG state, also when
the run stops) -> `EvalHook` (periodic evaluation and model_best.pth). `FinalHook.after_train` does the
end-of-run work (final checkpoint, DDP digest check, final evaluation, `done` event).

The order inside an iteration is part of the contract: the RNG state is saved between steps and the
scheduler has stepped before the checkpoint, so a resumed run continues bit-identically.
"""

from __future__ import annotations

import hashlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from comask.config import Config
from comask.engine import dist
from comask.engine.checkpoint import checkpoint_name, load_checkpoint, prune_checkpoints, save_checkpoint
from comask.engine.evaluate import evaluate_model
from comask.engine.logging import TrainLogger
from comask.engine.optim import set_time_progress
from comask.engine.runtime import autocast, get_rng_state, preserved_rng
from comask.errors import CheckpointError, UserError

log = logging.getLogger("comask.train")

_SIGNAL_CODES: dict[str | None, int] = {None: 0, "SIGTERM": 2, "SIGINT": 3}
_CODE_SIGNALS = {v: k for k, v in _SIGNAL_CODES.items()}


class NonFiniteLossError(UserError):
    """Training produced a NaN/inf loss and runtime.skip_nonfinite is off."""


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps. A second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal_name == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt  # the user insists: stop without waiting for the checkpoint
        # Only set a flag: the loop reports it (logging from a signal handler can re-enter I/O).
        self.signal_name = name

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


# ---------------------------------------------------------------------------------------------
# Checkpoint content
# ---------------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def weights_checkpoint(model: nn.Module, cfg: Config, meta: dict, it: int, **extra: Any) -> dict[str, Any]:
    return {"model": unwrap(model).state_dict(), "iter": it, "config": cfg.to_dict(), "meta": meta, **extra}


def param_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(unwrap(model).state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def primary_metric(metrics: dict[str, Any]) -> tuple[str, float] | None:
    """segm AP when the model predicts masks, else bbox AP (the best-checkpoint criterion)."""
    for task in ("segm", "bbox"):
        v = metrics.get(task, {}).get("AP") if isinstance(metrics.get(task), dict) else None
        if isinstance(v, (int, float)) and math.isfinite(v):
            return f"{task}/AP", float(v)
    return None


def read_best_score(out: Path) -> float | None:
    p = out / "model_best.pth"
    if not p.is_file():
        return None
    try:
        best = load_checkpoint(p).get("best") or {}
        return float(best["value"]) if "value" in best else None
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None


def _to_device(images: list[torch.Tensor], targets: list[dict], device: torch.device) -> tuple[list, list]:
    nb = device.type == "cuda"
    images = [im.to(device, non_blocking=nb) for im in images]
    targets = [{k: (v.to(device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def _nonfinite_report(values: dict[str, float], total: float) -> str:
    terms = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        return f"non-finite terms {', '.join(bad)} ({terms})"
    if not math.isfinite(total):
        return f"total {total} ({terms})"
    return f"another rank's loss was non-finite (this rank: {terms})"


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


class HookBase:
    """Called by `Trainer.train`: before_train once, after_step after every step, after_train once at
    the end of a run that was not aborted by an exception."""

    def before_train(self, trainer: Trainer) -> None:
        pass

    def after_step(self, trainer: Trainer) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass


class Trainer:
    """One training step (`run_step`) and the loop around it (`train`).

    After each step it holds what the hooks read: `iter` (steps done), `values` (per-term losses of
    this rank), `loss_value`, `grad_norm` (before clipping, or None), `stepped` (False when a
    non-finite step was skipped), `lr` (the step's LR), `data_time`, `step_start` (perf_counter at the
    step's start), `reason` (None, "SIGINT", "SIGTERM" or "time_limit", agreed by all ranks), `spent`
    (seconds counted against the budget), `done` (max_iter or time limit reached) and `result`.
    """

    def __init__(
        self,
        model: nn.Module,
        ddp_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        data_iter: Iterator,
        *,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        info: dist.DistInfo,
        logger: TrainLogger,
        result: dict[str, Any],
        clock: Callable[[], float],
        t_start: float,
        prior_elapsed: float = 0.0,
        max_minutes: float | None = None,
        by_time: bool = False,
        clip: float | None = None,
        skip_nonfinite: bool = False,
        hooks: Sequence[HookBase] = (),
    ):
        self.model, self.ddp_model = model, ddp_model
        self.optimizer, self.scaler, self.data_iter = optimizer, scaler, data_iter
        self.device, self.amp_dtype, self.info = device, amp_dtype, info
        self.world, self.is_main = info.world_size, info.rank == 0
        self.logger, self.result, self.hooks = logger, result, list(hooks)
        self.clock, self.t_start, self.prior_elapsed = clock, t_start, prior_elapsed
        # runtime.max_minutes: the budget of this session, or of the whole run with a by-time schedule
        self.max_minutes, self.by_time = max_minutes, by_time
        self.max_seconds = float(max_minutes) * 60.0 if max_minutes else None
        self.clip, self.skip_nonfinite = clip, skip_nonfinite
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.stop = StopFlag()
        self.iter = self.start_iter = self.max_iter = 0
        self.values: dict[str, float] = {}
        self.loss_value = 0.0
        self.grad_norm: float | None = None
        self.stepped = False
        self.lr = 0.0
        self.data_time = 0.0
        self.step_start = 0.0
        self.reason: str | None = None
        self.spent = 0.0
        self.done = False

    # -- the loop ------------------------------------------------------------------------------

    def train(self, start_iter: int, max_iter: int) -> dict[str, Any]:
        """Run steps from `start_iter` until `max_iter`, the time budget or a signal; returns `result`."""
        self.iter, self.start_iter, self.max_iter = start_iter, start_iter, max_iter
        self.stop.install()
        try:
            for h in self.hooks:
                h.before_train(self)
            while self.iter < max_iter:
                self.run_step()
                self.iter += 1
                self.result["iter"] = self.iter
                self.done = self.iter >= max_iter or self.reason == "time_limit"
                for h in self.hooks:
                    h.after_step(self)
                if self._finish_if_stopping():
                    break
            for h in self.hooks:
                h.after_train(self)
        finally:
            self.stop.restore()
            self.logger.close()
        return self.result

    def _finish_if_stopping(self) -> bool:
        """After the step's hooks (the checkpoint is written): record why the loop ends, if it does."""
        it, reason = self.iter, self.reason
        if reason in ("SIGINT", "SIGTERM"):
            self.result["stop_reason"] = reason
            if self.is_main:
                log.warning("stopped by %s at iteration %d; checkpoint %s; continue with --resume",
                            reason, it, self.result["checkpoint"])
                self.logger.event(it, "interrupted", signal=reason, checkpoint=self.result["checkpoint"])
            return True
        if self.done:
            self.result["stop_reason"] = "time_limit" if reason == "time_limit" else "completed"
            if self.is_main and reason == "time_limit":
                log.info("runtime.max_minutes=%s reached at iteration %d", self.max_minutes, it)
                self.logger.event(it, "time_limit", max_minutes=self.max_minutes)
            return True
        return False

    # -- one step --------------------------------------------------------------------------------

    def run_step(self) -> None:
        """One iteration: data, forward, backward, the agreed flags, then the update or the skip."""
        self.step_start = time.perf_counter()
        images, targets = next(self.data_iter)
        images, targets = _to_device(images, targets, self.device)
        self.data_time = time.perf_counter() - self.step_start
        with autocast(self.device, self.amp_dtype):
            loss_dict = self.ddp_model(images, targets)
        loss = sum(loss_dict.values())
        self.optimizer.zero_grad(set_to_none=True)
        # Backward even for a non-finite loss: under DDP every rank must join the gradient
        # all-reduce; the step is dropped below if any rank saw a bad value.
        self.scaler.scale(loss).backward()
        nonfinite = self._agree_flags(loss)

        self.values = {k: float(v.detach()) for k, v in loss_dict.items()}
        self.loss_value = float(loss.detach())
        grad_norm = None
        if not nonfinite and self.clip is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.grad_norm = float(grad_norm) if grad_norm is not None else None
        # A finite loss can still give non-finite gradients (an overflow in backward); without a
        # GradScaler to catch them, the clip's scale would write NaN into every weight. Gradients are
        # all-reduced before the norm, so every rank takes the same branch.
        bad_grad = (self.grad_norm is not None and not self.scaler.is_enabled()
                    and not math.isfinite(self.grad_norm))
        if nonfinite or bad_grad:
            self._skip_nonfinite_step(bad_grad)
        else:
            self._optimizer_step()
        self.lr = self.optimizer.param_groups[0]["lr"]

    def _agree_flags(self, loss: torch.Tensor) -> bool:
        """One all-reduce agrees on the non-finite flag, the signal and the time: the other ranks
        contribute 0 seconds, so the max is rank 0's clock and every rank takes the same decisions.
        Sets `reason`, `spent` and result["elapsed_seconds"]; returns whether any rank's loss was non-finite."""
        flags = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0,
                              float(_SIGNAL_CODES[self.stop.signal_name]),
                              self.clock() - self.t_start if self.is_main else 0.0], dtype=torch.float64)
        if self.world > 1:
            flags = dist.all_reduce_max(flags.to(self.device) if self.info.backend == "nccl" else flags).cpu()
        reason = _CODE_SIGNALS[int(flags[1].item())]
        session_seconds = float(flags[2].item())
        self.result["elapsed_seconds"] = self.prior_elapsed + session_seconds
        # A by-time budget covers the whole run (all sessions); otherwise max_minutes is per session.
        self.spent = self.result["elapsed_seconds"] if self.by_time else session_seconds
        if reason is None and self.max_seconds is not None and self.spent >= self.max_seconds:
            reason = "time_limit"
        self.reason = reason
        return flags[0].item() > 0

    def _skip_nonfinite_step(self, bad_grad: bool) -> None:
        it, values = self.iter, self.values
        what = "gradient" if bad_grad else "loss"
        bad = (f"gradient norm {self.grad_norm} with finite loss terms" if bad_grad
               else _nonfinite_report(values, self.loss_value))
        if not self.skip_nonfinite:
            msg = (f"non-finite {what} at iteration {it + 1}: {bad}. The last good checkpoint is "
                   f"{self.result['checkpoint'] or '(none yet)'}. Lower schedule.base_lr, set "
                   "schedule.clip_grad_norm, or set runtime.skip_nonfinite=true to skip such steps")
            self.logger.event(it + 1, "nonfinite_stop", losses=values)
            raise NonFiniteLossError(msg)
        self.optimizer.zero_grad(set_to_none=True)
        self.stepped = False
        self.result["nonfinite_skipped"] += 1
        self.logger.event(it + 1, "nonfinite_skip", losses=values, skipped=self.result["nonfinite_skipped"])
        if self.is_main:
            log.warning("iteration %d: non-finite %s (%s), step skipped (%d so far)",
                        it + 1, what, bad, self.result["nonfinite_skipped"])

    def _optimizer_step(self) -> None:
        self.scaler.step(self.optimizer)
        self.stepped = True
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            self.scaler.update()
            # fp16 gradients overflowed: GradScaler skipped the step and halved its scale
            if self.scaler.get_scale() < scale:
                self.result["amp_overflow_skipped"] += 1
                self.logger.event(self.iter + 1, "amp_overflow_skip", scale=scale,
                                  skipped=self.result["amp_overflow_skipped"])


# ---------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------


class LRScheduleHook(HookBase):
    """scheduler.step after every step; a by-time schedule first sets the fraction of the budget spent."""

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler

    def after_step(self, trainer: Trainer) -> None:
        if trainer.by_time:
            set_time_progress(self.scheduler, trainer.spent / trainer.max_seconds)
        self.scheduler.step()


class LoggingHook(HookBase):
    """Iteration time and ETA for the logger; the losses of the logged steps averaged over a window and
    over ranks, written every `period` steps, at max_iter and when the run stops."""

    def __init__(self, period: int):
        self.period = max(int(period), 1)
        self.window: dict[str, list[float]] = {}

    def after_step(self, trainer: Trainer) -> None:
        logger, it = trainer.logger, trainer.iter
        if trainer.stepped:
            for k, v in trainer.values.items():
                self.window.setdefault(k, []).append(v)
            self.window.setdefault("loss", []).append(trainer.loss_value)
            if trainer.grad_norm is not None and math.isfinite(trainer.grad_norm):
                # before clipping: how often and by how much the clip acts
                self.window.setdefault("grad_norm", []).append(trainer.grad_norm)
        logger.iter_time(time.perf_counter() - trainer.step_start)
        if trainer.by_time:
            # The logger's ETA counts iterations to max_iter, here only an upper bound: point it at
            # the iteration where the budget should run out at the recent speed.
            per_iter = logger.seconds_per_iter()
            if math.isfinite(per_iter) and per_iter > 0:
                left = max(trainer.max_seconds - trainer.spent, 0.0)
                logger.set_max_iter(min(trainer.max_iter, it + int(left / per_iter)))
        logger.advance()
        # An all-skipped window has nothing to report (the same on every rank: the skip is agreed).
        if (it % self.period == 0 or it == trainer.max_iter or trainer.reason is not None) and self.window:
            self._write(trainer)

    def _write(self, trainer: Trainer) -> None:
        keys = sorted(self.window)
        local = torch.tensor([float(np.mean(self.window[k])) if self.window[k] else 0.0 for k in keys],
                             dtype=torch.float64)
        if trainer.world > 1:
            nccl = trainer.info.backend == "nccl"
            local = dist.all_reduce_mean(local.to(trainer.device) if nccl else local).cpu()
        trainer.logger.step(trainer.iter, lr=trainer.lr,
                            losses={k: float(v) for k, v in zip(keys, local.cpu().tolist())},
                            data_time=trainer.data_time)
        self.window.clear()


class CheckpointHook(HookBase):
    """A full checkpoint (weights, optimizer, scheduler, scaler, every rank's RNG state, elapsed time)
    every `period` steps and when the run ends or stops; keeps the newest `keep_last`."""

    def __init__(self, cfg: Config, meta: dict, out: Path, scheduler: Any, *, period: int, keep_last: int):
        self.cfg, self.meta, self.out, self.scheduler = cfg, meta, out, scheduler
        self.period, self.keep_last = max(int(period), 1), int(keep_last)

    def after_step(self, trainer: Trainer) -> None:
        if trainer.iter % self.period == 0 or trainer.done or trainer.reason is not None:
            self.save(trainer, trainer.iter)

    def save(self, trainer: Trainer, it: int) -> None:
        # All ranks take part (RNG gather); rank 0 writes.
        rng = dist.all_gather_object(get_rng_state())
        if not trainer.is_main:
            return
        state = weights_checkpoint(
            trainer.model, self.cfg, self.meta, it, optimizer=trainer.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), scaler=trainer.scaler.state_dict(),
            rng={"world_size": trainer.world, "ranks": rng}, elapsed_seconds=trainer.result["elapsed_seconds"],
        )
        path = save_checkpoint(state, self.out / checkpoint_name(it))
        prune_checkpoints(self.out, self.keep_last)
        trainer.result["checkpoint"] = str(path)


class EvalHook(HookBase):
    """Evaluation every `period` steps (not on the last one: FinalHook evaluates then); a better
    primary metric than the best so far writes model_best.pth."""

    def __init__(self, cfg: Config, meta: dict, out: Path, val_ds: Any, *, period: int):
        self.cfg, self.meta, self.out, self.val_ds = cfg, meta, out, val_ds
        self.period = int(period or 0)
        self.best_score: float | None = None

    def before_train(self, trainer: Trainer) -> None:
        self.best_score = read_best_score(self.out) if trainer.is_main else None

    def after_step(self, trainer: Trainer) -> None:
        if trainer.done or trainer.reason is not None:
            return
        if self.period and trainer.iter % self.period == 0:
            self.run(trainer, trainer.iter, final=False)

    def run(self, trainer: Trainer, it: int, final: bool) -> dict[str, Any] | None:
        if self.val_ds is None:
            return None
        model, is_main, world = trainer.model, trainer.is_main, trainer.world
        if world > 1:
            dist.broadcast_buffers(model)
        with preserved_rng():
            metrics = evaluate_model(
                model, self.val_ds, device=trainer.device, distributed=world > 1,
                out_dir=self.out if (final and is_main) else None, verbose=final and is_main,
                batch_size=int(self.cfg.runtime.eval_batch_size), mask_thr=float(self.cfg.model.test.mask_thresh),
                cat_ids=self.meta["cat_ids"],
            )
        if is_main:
            trainer.logger.eval(it, {k: v for k, v in metrics.items() if k in ("bbox", "segm")})
            key = primary_metric(metrics)
            if key is not None and (self.best_score is None or key[1] > self.best_score):
                self.best_score = key[1]
                best = save_checkpoint(
                    weights_checkpoint(model, self.cfg, self.meta, it, best={"metric": key[0], "value": key[1]}),
                    self.out / "model_best.pth",
                )
                trainer.result["best"] = str(best)
                log.info("new best %s = %.4f at iteration %d", key[0], key[1], it)
        return metrics


class FinalHook(HookBase):
    """The end of a run: bad images found on any rank, and when it completed (max_iter or the time
    budget): model_final.pth, the DDP weight digests, the final evaluation and the `done` event."""

    def __init__(self, cfg: Config, meta: dict, out: Path, train_ds: Any, evaluator: EvalHook):
        self.cfg, self.meta, self.out, self.train_ds, self.evaluator = cfg, meta, out, train_ds, evaluator

    def after_train(self, trainer: Trainer) -> None:
        world, is_main, result, it = trainer.world, trainer.is_main, trainer.result, trainer.iter
        if world > 1 and hasattr(self.train_ds, "sync_skipped"):
            self.train_ds.sync_skipped(dist.all_reduce_max)  # every rank's lazily found bad images, each once
        result["skipped_data"] = dict(getattr(self.train_ds, "skipped", {}) or {})
        if result["stop_reason"] not in ("completed", "time_limit"):
            return
        if world > 1:
            dist.broadcast_buffers(trainer.model)
        if is_main:
            final = save_checkpoint(weights_checkpoint(trainer.model, self.cfg, self.meta, it),
                                    self.out / "model_final.pth")
            result["final"] = str(final)
        if world > 1:
            digests = dist.all_gather_object(param_digest(trainer.model))
            if is_main:
                trainer.logger.event(it, "ddp_sync", digests=digests, in_sync=len(set(digests)) == 1)
                if len(set(digests)) != 1:
                    log.warning("DDP ranks ended with different weights: %s", digests)
        if self.cfg.runtime.final_eval:
            if trainer.device.type == "cuda":
                # hand the training step's cached blocks back first: jobs sharing a GPU ran out of memory here
                torch.cuda.empty_cache()
            result["metrics"] = self.evaluator.run(trainer, it, final=True)
        if is_main:
            trainer.logger.event(it, "done", stop_reason=result["stop_reason"],
                                 seconds=trainer.clock() - trainer.t_start, elapsed_seconds=result["elapsed_seconds"],
                                 nonfinite_skipped=result["nonfinite_skipped"],
                                 amp_overflow_skipped=result["amp_overflow_skipped"],
                                 skipped_data=result["skipped_data"])
