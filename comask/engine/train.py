"""Training: any torchvision-style detection model, one process or DDP under torchrun.

`train(cfg, out_dir)` builds the data set, the model (`comask.modeling.build.build_model` unless a
factory is given), SGD with warm-up + multi-step decay, and runs `schedule.max_iter` iterations,
writing checkpoints, logs and the final metrics into `out_dir` (rank 0 only). This module assembles
the run; the step, the loop and the hooks around it (LR schedule, logging, checkpoints, evaluation,
end of run) are in `comask.engine.trainer`.

Reproducibility: every random draw comes from RNGs seeded by (runtime.seed, rank) and saved in each
checkpoint, and the training batches are a deterministic function of (seed, iteration); a resumed
run starts the batch sampler at its iteration and therefore continues the exact sequence of an
uninterrupted one (bit-identical on the CPU with `data.num_workers=0`; with workers, the data order
is identical but each worker's augmentation RNG is re-seeded by the loader).

Stopping: SIGINT/SIGTERM finish the current step, write a checkpoint and return exit code 130/143;
`runtime.max_minutes` ends training like `max_iter` (checkpoint, model_final.pth, final evaluation).

Time-based schedule (`schedule.by_time`): the LR decays when `schedule.time_steps` fractions of
`runtime.max_minutes` are spent, and training ends when all of it is (`max_iter` is then only an
upper bound). The elapsed time is saved in each checkpoint and a resumed run continues from it. The
time is rank 0's; it travels with the per-step stop decision so every rank sees the same value.
A non-finite loss raises NonFiniteLossError (no checkpoint is written after it) unless
`runtime.skip_nonfinite` is set, which drops such steps and counts them.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from comask.config import Config, ConfigError, changed_sections
from comask.engine import dist
from comask.engine.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    remove_stale_temp_files,
)
from comask.engine.evaluate import check_categories
from comask.engine.logging import TrainLogger, setup_console_logging
from comask.engine.optim import (
    apply_schedule,
    build_optimizer,
    build_scheduler,
    scaled_lr,
)
from comask.engine.runtime import (
    OutputDirError,
    check_output_dir,
    resolve_device,
    seed_all,
    set_rng_state,
)
from comask.engine.runtime import amp_dtype as runtime_amp_dtype
from comask.engine.trainer import (
    CheckpointHook,
    EvalHook,
    FinalHook,
    LoggingHook,
    LRScheduleHook,
    NonFiniteLossError,
    Trainer,
)
from comask.errors import CheckpointError, UserError

__all__ = ["EXIT_CODES", "NonFiniteLossError", "build_train_iterator", "select_prefixes", "train"]

log = logging.getLogger("comask.train")

EXIT_CODES = {"completed": 0, "time_limit": 0, "SIGINT": 130, "SIGTERM": 143}


# ---------------------------------------------------------------------------------------------
# Pretrained weights
# ---------------------------------------------------------------------------------------------


def select_prefixes(state: dict, prefixes: tuple[str, ...]) -> dict:
    """`runtime.load_only`: the tensors whose names start with one of `prefixes` (e.g. [backbone.body.]: the same
    pretrained body under two detectors, nothing else shared)."""
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def build_train_iterator(cfg: Config, dataset: Any, *, distributed: bool, seed: int, start_iter: int) -> Iterator:
    """An iterator over training batches that starts at batch `start_iter` of the seeded sequence
    (the sampler skips the earlier batches as indices; no image is loaded for them)."""
    from comask.data.loader import build_train_loader

    return iter(build_train_loader(cfg, dataset, distributed=distributed, seed=seed, start_iter=start_iter))


# ---------------------------------------------------------------------------------------------
# SyncBN
# ---------------------------------------------------------------------------------------------


def _sync_batchnorm(model: nn.Module, device: torch.device, is_main: bool) -> nn.Module:
    """BatchNorm -> SyncBatchNorm under DDP, so the statistics span the global batch (SyncBN needs CUDA;
    on the CPU each rank keeps its own). FrozenBN layers are not BatchNorm and stay as they are."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return model
    if device.type != "cuda":
        if is_main:
            log.info("norm syncbn: SyncBatchNorm needs CUDA; each rank keeps its own BatchNorm statistics on %s",
                     device)
        return model
    if is_main:
        log.info("norm syncbn: BatchNorm layers converted to SyncBatchNorm across ranks")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


# ---------------------------------------------------------------------------------------------
# train()
# ---------------------------------------------------------------------------------------------


def train(
    cfg: Config,
    out_dir: str | Path,
    resume: bool = False,
    model_factory: Callable[[Config], nn.Module] | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Train `cfg`'s model into `out_dir`; see the module docstring. Returns a summary dict:
    iter, stop_reason, exit_code, checkpoint, final, best, metrics, nonfinite_skipped,
    elapsed_seconds, model. `clock` (seconds, monotonic) measures the time budget; tests pass a
    simulated one."""
    cfg = copy.deepcopy(cfg)
    out = Path(out_dir)
    rt = cfg.runtime
    info = dist.init_distributed(device=str(rt.device or "auto"))
    is_main = info.rank == 0
    if is_main:
        setup_console_logging()
    try:
        return _train(cfg, out, resume, model_factory, info, is_main, clock)
    finally:
        dist.cleanup(info)


def _train(cfg: Config, out: Path, resume: bool, model_factory: Callable | None,
           info: dist.DistInfo, is_main: bool, clock: Callable[[], float]) -> dict[str, Any]:
    t_start = clock()
    rt, sched = cfg.runtime, cfg.schedule
    world = info.world_size
    by_time = bool(sched.get("by_time"))
    if by_time and not rt.max_minutes:
        raise ConfigError(
            "schedule.by_time=true needs runtime.max_minutes (the budget whose fractions schedule.time_steps "
            "are); set runtime.max_minutes, or schedule.by_time=false to decay at schedule.steps"
        )
    resume_path = _check_out_dir(out, resume, rt.min_free_mb, is_main)  # before anything expensive
    seed = int(rt.seed)
    device, amp_dtype = _process_settings(cfg, info)
    train_ds, meta = _build_train_set(cfg, is_main)

    # Model, optimizer, schedule. Every rank builds from the same seed; DDP then broadcasts rank 0's weights.
    seed_all(seed)
    model = _build_model(cfg, model_factory, device, info)
    ckpt = _load_weights(cfg, model, meta, resume_path, is_main)
    optimizer = build_optimizer(model, sched)
    scheduler = build_scheduler(optimizer, sched)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_iter, prior_elapsed = _restore_training_state(cfg, ckpt, resume_path, optimizer, scheduler, scaler)
    max_iter = int(sched.max_iter)
    ddp_model = _wrap_ddp(model, device, info, bool(rt.find_unused_parameters))

    # Data order: per-rank RNG streams; the batch sequence is a function of (seed, iteration).
    seed_all(seed + info.rank)
    data_iter = build_train_iterator(cfg, train_ds, distributed=world > 1, seed=seed, start_iter=start_iter)
    if ckpt is not None:
        # After creating the iterator: it draws from the global RNG, which the uninterrupted run did at
        # iteration 0, so the saved state (taken between steps) is what the next step must see.
        _restore_rank_rng(ckpt.get("rng"), info, seed, start_iter)
    del ckpt
    val_ds = _build_val_set(cfg, meta)

    logger = _start_logging(cfg, out, info, device, train_ds, meta, start_iter, prior_elapsed, resume_path)
    result: dict[str, Any] = {
        "out_dir": str(out), "iter": start_iter, "max_iter": max_iter, "stop_reason": "completed",
        "checkpoint": str(resume_path) if resume_path else None, "final": None, "best": None,
        "metrics": None, "nonfinite_skipped": 0, "amp_overflow_skipped": 0, "skipped_data": {},
        "elapsed_seconds": prior_elapsed,
    }
    evaluator = EvalHook(cfg, meta, out, val_ds, period=int(rt.eval_period or 0))
    hooks = [
        LRScheduleHook(scheduler),
        LoggingHook(int(rt.log_period)),
        CheckpointHook(cfg, meta, out, scheduler, period=int(rt.checkpoint_period), keep_last=int(rt.keep_last)),
        evaluator,
        FinalHook(cfg, meta, out, train_ds, evaluator),
    ]
    trainer = Trainer(
        model, ddp_model, optimizer, scaler, data_iter, device=device, amp_dtype=amp_dtype, info=info,
        logger=logger, result=result, clock=clock, t_start=t_start, prior_elapsed=prior_elapsed,
        max_minutes=rt.max_minutes, by_time=by_time,
        clip=float(sched.clip_grad_norm) if sched.get("clip_grad_norm") else None,
        skip_nonfinite=bool(rt.skip_nonfinite), hooks=hooks,
    )
    trainer.train(start_iter, max_iter)

    if is_main and result["skipped_data"]:
        log.warning("skipped bad training data (data.skip_bad): %s", result["skipped_data"])
    result["exit_code"] = EXIT_CODES[result["stop_reason"]]
    result["model"] = model
    return result


# ---------------------------------------------------------------------------------------------
# The steps of _train
# ---------------------------------------------------------------------------------------------


def _check_out_dir(out: Path, resume: bool, min_free_mb: Any, is_main: bool) -> Path | None:
    """Rank 0 checks the output directory and finds the checkpoint to resume from; every rank raises
    the same error. Returns the checkpoint path (None: start at iteration 0)."""
    problem = None
    resume_path: Path | None = None
    if is_main:
        try:
            check_output_dir(out, min_free_mb)
            remove_stale_temp_files(out)
            existing = list_checkpoints(out)
            if resume:
                resume_path = existing[-1][1] if existing else None
                if resume_path is None:
                    log.warning("--resume: no checkpoint in %s yet; starting from iteration 0", out)
            elif existing:
                raise OutputDirError(
                    f"output directory {out} already holds checkpoints (newest {existing[-1][1].name}); "
                    "pass --resume to continue that run, or choose a new --out"
                )
        except UserError as e:
            problem = (type(e).__name__, str(e))
    problem, resume_path = dist.broadcast_object((problem, resume_path))
    if problem is not None:
        raise OutputDirError(problem[1]) if problem[0] == "OutputDirError" else UserError(problem[1])
    return resume_path


def _process_settings(cfg: Config, info: dist.DistInfo) -> tuple[torch.device, torch.dtype | None]:
    """Threads, deterministic algorithms; returns (device, autocast dtype)."""
    rt = cfg.runtime
    if rt.threads:
        torch.set_num_threads(int(rt.threads))
    if rt.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    local_rank = info.local_rank if info.world_size > 1 else None
    device = resolve_device(rt.device, local_rank=local_rank, setting="runtime.device")
    return device, runtime_amp_dtype(rt.amp)


def _build_train_set(cfg: Config, is_main: bool) -> tuple[Any, dict[str, list]]:
    """The training set (a synthetic one is generated once, by rank 0) and its meta (classes, cat_ids)."""
    from comask.data.loader import build_dataset

    if cfg.data.get("synth"):
        if is_main:
            from comask.data.synth import ensure_synth

            ensure_synth(cfg.data.synth.preset, cfg.data.synth.root)
        dist.barrier()
    train_ds = build_dataset(cfg, "train")
    meta = {"classes": list(train_ds.class_names), "cat_ids": [int(c) for c in train_ds.cat_ids]}
    if int(cfg.model.num_classes) != len(meta["cat_ids"]):
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but {cfg.data.train.ann} has {len(meta['cat_ids'])} "
            f"categories; set model.num_classes={len(meta['cat_ids'])}"
        )
    return train_ds, meta


def _build_val_set(cfg: Config, meta: dict) -> Any:
    """The validation set when an evaluation is asked for, checked against the training categories."""
    from comask.data.loader import build_dataset

    rt = cfg.runtime
    want_eval = bool(rt.final_eval) or int(rt.eval_period or 0) > 0
    if not (want_eval and cfg.data.get("val")):
        return None
    val_ds = build_dataset(cfg, "val")
    # before any training step: a val set numbered or named differently would score wrong
    check_categories(list(zip(meta["cat_ids"], meta["classes"])), val_ds, str(cfg.data.val.ann))
    return val_ds


def _build_model(cfg: Config, model_factory: Callable | None, device: torch.device,
                 info: dist.DistInfo) -> nn.Module:
    if model_factory is None:
        from comask.modeling.build import build_model, check_frozen_bn

        check_frozen_bn(cfg)
        model_factory = build_model
    model = model_factory(cfg).to(device)
    model.train()
    if info.world_size > 1 and cfg.model.backbone.get("norm") in ("syncbn", "auto"):
        model = _sync_batchnorm(model, device, info.rank == 0)
    return model


def _load_weights(cfg: Config, model: nn.Module, meta: dict, resume_path: Path | None,
                  is_main: bool) -> dict | None:
    """The resumed checkpoint's weights (returned, for the training state), or runtime.load_from's."""
    rt = cfg.runtime
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path, map_location="cpu")
        old_ids = (ckpt.get("meta") or {}).get("cat_ids")
        if old_ids and [int(c) for c in old_ids] != meta["cat_ids"]:
            raise CheckpointError(
                f"{resume_path}: trained on category ids {list(old_ids)} but {cfg.data.train.ann} has "
                f"{meta['cat_ids']}; resume with the same data set, or start a new run with runtime.load_from"
            )
        load_model_weights(model, ckpt["model"], strict=True, source=str(resume_path))
        _warn_config_drift(cfg, ckpt, resume_path)
        return ckpt
    if rt.load_from:
        state = load_checkpoint(rt.load_from, map_location="cpu")["model"]
        only = tuple(rt.get("load_only") or ())
        if only:
            state = select_prefixes(state, only)
            if not state:
                raise CheckpointError(f"runtime.load_only={list(only)}: no tensor of {rt.load_from} starts with these "
                                      "prefixes; check the key names (e.g. backbone.body.)")
        strict = bool(rt.load_strict) and not only
        report = load_model_weights(model, state, strict=strict, source=str(rt.load_from))
        if is_main:
            log.info("initialised from %s: %d tensors loaded, %d skipped", rt.load_from, len(report["loaded"]),
                     len(report["missing"]) + len(report["shape_mismatch"]))
    return None


def _restore_training_state(cfg: Config, ckpt: dict | None, resume_path: Path | None, optimizer: Any,
                            scheduler: Any, scaler: torch.amp.GradScaler) -> tuple[int, float]:
    """Optimizer, scheduler and GradScaler from the resumed checkpoint; returns (start_iter, the wall
    time of the run's earlier sessions, which a by-time schedule continues from)."""
    if ckpt is None:
        return 0, 0.0
    rt, sched = cfg.runtime, cfg.schedule
    max_seconds = float(rt.max_minutes) * 60.0 if rt.max_minutes else None
    prior_elapsed = float(ckpt.get("elapsed_seconds", 0.0))
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        by_time = bool(sched.get("by_time"))
        apply_schedule(optimizer, scheduler, sched,
                       progress=prior_elapsed / max_seconds if by_time and max_seconds else 0.0)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{resume_path}: cannot restore the optimizer/scheduler state ({e}); it was written by another "
            "config; start a new run in a new --out"
        ) from None
    return int(ckpt["iter"]), prior_elapsed


def _wrap_ddp(model: nn.Module, device: torch.device, info: dist.DistInfo, find_unused: bool) -> nn.Module:
    if info.world_size == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused,
    )


def _start_logging(cfg: Config, out: Path, info: dist.DistInfo, device: torch.device, train_ds: Any, meta: dict,
                   start_iter: int, prior_elapsed: float, resume_path: Path | None) -> TrainLogger:
    """The resolved config and the run's summary line (rank 0), and the TrainLogger."""
    rt, sched = cfg.runtime, cfg.schedule
    is_main, max_iter = info.rank == 0, int(sched.max_iter)
    if is_main:
        (out / "config.yaml").write_text(cfg.dump())
        log.info(
            "training %s on %s: %d images, %d classes, world %d, batch %d, lr %.4g, iters %d -> %d, out %s",
            cfg.get("name", "model"), device, len(train_ds), len(meta["classes"]), info.world_size,
            int(sched.ims_per_batch), scaled_lr(sched), start_iter, max_iter, out,
        )
        if sched.get("by_time"):
            log.info("time-based schedule: %.1f of %.1f minutes spent; LR x%s at %s of them; max_iter is an "
                     "upper bound", prior_elapsed / 60, rt.max_minutes, sched.gamma, list(sched.time_steps))
    logger = TrainLogger(out, max_iter=max_iter, start_iter=start_iter, enabled=is_main,
                         tensorboard=bool(rt.tensorboard), progress=bool(rt.progress))
    if start_iter and is_main:
        logger.event(start_iter, "resumed", checkpoint=str(resume_path))
    return logger


def _restore_rank_rng(rng: dict | None, info: dist.DistInfo, seed: int, start_iter: int) -> None:
    ranks = (rng or {}).get("ranks") or []
    if rng and int(rng.get("world_size", 0)) == info.world_size and info.rank < len(ranks):
        set_rng_state(ranks[info.rank])
        return
    # Another world size: the exact stream cannot be continued, but stay deterministic per (seed, iter, rank).
    log.warning("checkpoint RNG state is for world size %s, this run has %d; re-seeding",
                (rng or {}).get("world_size"), info.world_size)
    seed_all(seed + 1000003 * start_iter + info.rank)


def _warn_config_drift(cfg: Config, ckpt: dict, path: Path) -> None:
    changed = changed_sections(ckpt.get("config"), cfg, ("model", "input", "data"))
    if changed:
        log.warning("%s: resuming with a config whose %s differ(s) from the checkpoint's", path, ", ".join(changed))
