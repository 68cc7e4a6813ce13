"""The training loop: any torchvision-style detection model, one process or DDP under torchrun.

`train(cfg, out_dir)` builds the data set, the model (`comask.modeling.build.build_model` unless a
factory is given), SGD with warm-up + multi-step decay, and runs `schedule.max_iter` iterations,
writing checkpoints, logs and the final metrics into `out_dir` (rank 0 only).

Reproducibility: every random draw comes from RNGs seeded by (runtime.seed, rank) and saved in each
checkpoint, and the training batches are a deterministic function of (seed, iteration); a resumed
run therefore continues the exact sequence of an uninterrupted one (bit-identical on the CPU with
`data.num_workers=0`; with workers, the data order is identical but each worker's augmentation RNG
is re-seeded by the loader).

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
import hashlib
import inspect
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from comask.config import Config, ConfigError, changed_sections
from comask.engine import dist
from comask.engine.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    prune_checkpoints,
    remove_stale_temp_files,
    save_checkpoint,
)
from comask.engine.evaluate import check_categories, evaluate_model
from comask.engine.logging import TrainLogger, setup_console_logging
from comask.engine.optim import (
    apply_schedule,
    build_optimizer,
    build_scheduler,
    scaled_lr,
    set_time_progress,
)
from comask.engine.runtime import (
    OutputDirError,
    autocast,
    check_output_dir,
    get_rng_state,
    preserved_rng,
    resolve_device,
    seed_all,
    set_rng_state,
)
from comask.engine.runtime import amp_dtype as runtime_amp_dtype
from comask.errors import CheckpointError, UserError

log = logging.getLogger("comask.train")

EXIT_CODES = {"completed": 0, "time_limit": 0, "SIGINT": 130, "SIGTERM": 143}


class NonFiniteLossError(UserError):
    """Training produced a NaN/inf loss and runtime.skip_nonfinite is off."""


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


class _SkipBatches(torch.utils.data.Sampler):
    """A batch sampler that drops the first `skip` batches of another (indices only, no image I/O)."""

    def __init__(self, batch_sampler: Any, skip: int):
        self.batch_sampler = batch_sampler
        self.skip = skip

    def __iter__(self) -> Iterator[list[int]]:
        it = iter(self.batch_sampler)
        for _ in range(self.skip):
            next(it)
        yield from it


def build_train_iterator(cfg: Config, dataset: Any, *, distributed: bool, seed: int, start_iter: int) -> Iterator:
    """An iterator over training batches that starts at batch `start_iter` of the seeded sequence.

    Uses the data layer's `start_iter` support when it has one; otherwise re-creates its loader
    around a batch sampler that skips the first batches without loading them.
    """
    from comask.data.loader import build_train_loader

    params = inspect.signature(build_train_loader).parameters
    if "start_iter" in params:
        loader = build_train_loader(cfg, dataset, distributed=distributed, seed=seed, start_iter=start_iter)
        return iter(loader)
    loader = build_train_loader(cfg, dataset, distributed=distributed, seed=seed)
    if start_iter == 0:
        return iter(loader)
    if getattr(loader, "batch_sampler", None) is not None:
        kwargs: dict[str, Any] = {
            "batch_sampler": _SkipBatches(loader.batch_sampler, start_iter),
            "num_workers": loader.num_workers,
            "collate_fn": loader.collate_fn,
            "pin_memory": loader.pin_memory,
            "worker_init_fn": loader.worker_init_fn,
            "generator": loader.generator,
            "persistent_workers": loader.persistent_workers,
        }
        if loader.num_workers > 0:
            kwargs["prefetch_factor"] = loader.prefetch_factor
        return iter(torch.utils.data.DataLoader(loader.dataset, **kwargs))
    log.warning("data loader has no batch sampler: skipping %d batches by loading them", start_iter)
    it = iter(loader)
    for _ in range(start_iter):
        next(it)
    return it


def _to_device(images: list[torch.Tensor], targets: list[dict], device: torch.device) -> tuple[list, list]:
    nb = device.type == "cuda"
    images = [im.to(device, non_blocking=nb) for im in images]
    targets = [{k: (v.to(device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


# ---------------------------------------------------------------------------------------------
# SyncBN, signals
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


class _StopFlag:
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


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _weights_checkpoint(model: nn.Module, cfg: Config, meta: dict, it: int, **extra: Any) -> dict[str, Any]:
    return {"model": _unwrap(model).state_dict(), "iter": it, "config": cfg.to_dict(), "meta": meta, **extra}


def _param_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(_unwrap(model).state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _primary_metric(metrics: dict[str, Any]) -> tuple[str, float] | None:
    """segm AP when the model predicts masks, else bbox AP (the best-checkpoint criterion)."""
    for task in ("segm", "bbox"):
        v = metrics.get(task, {}).get("AP") if isinstance(metrics.get(task), dict) else None
        if isinstance(v, (int, float)) and math.isfinite(v):
            return f"{task}/AP", float(v)
    return None


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

    # 1. Output directory, before anything expensive. Rank 0 decides; every rank raises the same error.
    problem = None
    resume_path: Path | None = None
    if is_main:
        try:
            check_output_dir(out, rt.min_free_mb)
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

    # 2. Process-wide settings.
    if rt.threads:
        torch.set_num_threads(int(rt.threads))
    seed = int(rt.seed)
    if rt.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    device = resolve_device(rt.device, local_rank=info.local_rank if world > 1 else None, setting="runtime.device")
    amp_dtype = runtime_amp_dtype(rt.amp)

    # 3. Data (the synthetic set is generated once, by rank 0).
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

    # 4. Model, optimizer, schedule. Every rank builds from the same seed; DDP then broadcasts rank 0's weights.
    seed_all(seed)
    if model_factory is None:
        from comask.modeling.build import build_model, check_frozen_bn

        check_frozen_bn(cfg)
        model_factory = build_model
    model = model_factory(cfg).to(device)
    model.train()
    if world > 1 and cfg.model.backbone.get("norm") in ("syncbn", "auto"):
        model = _sync_batchnorm(model, device, is_main)
    ckpt = None
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
    elif rt.load_from:
        init = load_checkpoint(rt.load_from, map_location="cpu")
        state = init["model"]
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
    max_seconds = float(rt.max_minutes) * 60.0 if rt.max_minutes else None
    optimizer = build_optimizer(model, sched)
    scheduler = build_scheduler(optimizer, sched)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_iter = 0
    # Wall time of earlier sessions of this run: a by-time schedule continues from it.
    prior_elapsed = float(ckpt.get("elapsed_seconds", 0.0)) if ckpt is not None else 0.0
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            apply_schedule(optimizer, scheduler, sched,
                           progress=prior_elapsed / max_seconds if by_time and max_seconds else 0.0)
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"{resume_path}: cannot restore the optimizer/scheduler state ({e}); it was written by another "
                "config; start a new run in a new --out"
            ) from None
        start_iter = int(ckpt["iter"])
    max_iter = int(sched.max_iter)

    ddp_model: nn.Module = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(rt.find_unused_parameters),
        )

    # 5. Data order: per-rank RNG streams; the batch sequence is a function of (seed, iteration).
    seed_all(seed + info.rank)
    data_iter = build_train_iterator(cfg, train_ds, distributed=world > 1, seed=seed, start_iter=start_iter)
    if ckpt is not None:
        # After creating the iterator: it draws from the global RNG, which the uninterrupted run did at
        # iteration 0, so the saved state (taken between steps) is what the next step must see.
        _restore_rank_rng(ckpt.get("rng"), info, seed, start_iter)
    del ckpt

    val_ds = None
    want_eval = bool(rt.final_eval) or int(rt.eval_period or 0) > 0
    if want_eval and cfg.data.get("val"):
        val_ds = build_dataset(cfg, "val")
        # before any training step: a val set numbered or named differently would score wrong
        check_categories(list(zip(meta["cat_ids"], meta["classes"])), val_ds, str(cfg.data.val.ann))

    # 6. Logs and resolved config.
    if is_main:
        (out / "config.yaml").write_text(cfg.dump())
        log.info(
            "training %s on %s: %d images, %d classes, world %d, batch %d, lr %.4g, iters %d -> %d, out %s",
            cfg.get("name", "model"), device, len(train_ds), len(meta["classes"]), world,
            int(sched.ims_per_batch), scaled_lr(sched), start_iter, max_iter, out,
        )
        if by_time:
            log.info("time-based schedule: %.1f of %.1f minutes spent; LR x%s at %s of them; max_iter is an "
                     "upper bound", prior_elapsed / 60, rt.max_minutes, sched.gamma, list(sched.time_steps))
    logger = TrainLogger(out, max_iter=max_iter, start_iter=start_iter, enabled=is_main,
                         tensorboard=bool(rt.tensorboard), progress=bool(rt.progress))
    if start_iter and is_main:
        logger.event(start_iter, "resumed", checkpoint=str(resume_path))
    stop = _StopFlag()
    stop.install()

    result: dict[str, Any] = {
        "out_dir": str(out), "iter": start_iter, "max_iter": max_iter, "stop_reason": "completed",
        "checkpoint": str(resume_path) if resume_path else None, "final": None, "best": None,
        "metrics": None, "nonfinite_skipped": 0, "amp_overflow_skipped": 0, "skipped_data": {},
        "elapsed_seconds": prior_elapsed,
    }
    best_score = _read_best_score(out) if is_main else None

    def save_full(it: int) -> None:
        # All ranks take part (RNG gather); rank 0 writes.
        rng = dist.all_gather_object(get_rng_state())
        if not is_main:
            return
        state = _weights_checkpoint(
            model, cfg, meta, it, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(), rng={"world_size": world, "ranks": rng},
            elapsed_seconds=result["elapsed_seconds"],
        )
        path = save_checkpoint(state, out / checkpoint_name(it))
        prune_checkpoints(out, int(rt.keep_last))
        result["checkpoint"] = str(path)

    def run_eval(it: int, final: bool) -> dict[str, Any] | None:
        nonlocal best_score
        if val_ds is None:
            return None
        if world > 1:
            dist.broadcast_buffers(model)
        with preserved_rng():
            metrics = evaluate_model(
                model, val_ds, device=device, distributed=world > 1,
                out_dir=out if (final and is_main) else None, verbose=final and is_main,
                batch_size=int(rt.eval_batch_size), mask_thr=float(cfg.model.test.mask_thresh),
                cat_ids=meta["cat_ids"],
            )
        if is_main:
            logger.eval(it, {k: v for k, v in metrics.items() if k in ("bbox", "segm")})
            key = _primary_metric(metrics)
            if key is not None and (best_score is None or key[1] > best_score):
                best_score = key[1]
                best = save_checkpoint(
                    _weights_checkpoint(model, cfg, meta, it, best={"metric": key[0], "value": key[1]}),
                    out / "model_best.pth",
                )
                result["best"] = str(best)
                log.info("new best %s = %.4f at iteration %d", key[0], key[1], it)
        return metrics

    log_period = max(int(rt.log_period), 1)
    ckpt_period = max(int(rt.checkpoint_period), 1)
    eval_period = int(rt.eval_period or 0)
    clip = float(sched.clip_grad_norm) if sched.get("clip_grad_norm") else None
    skip_nonfinite = bool(rt.skip_nonfinite)
    params = [p for p in model.parameters() if p.requires_grad]
    window: dict[str, list[float]] = {}
    it = start_iter
    try:
        while it < max_iter:
            t0 = time.perf_counter()
            images, targets = next(data_iter)
            images, targets = _to_device(images, targets, device)
            t_data = time.perf_counter() - t0
            with autocast(device, amp_dtype):
                loss_dict = ddp_model(images, targets)
            loss = sum(loss_dict.values())
            optimizer.zero_grad(set_to_none=True)
            # Backward even for a non-finite loss: under DDP every rank must join the gradient
            # all-reduce; the step is dropped below if any rank saw a bad value.
            scaler.scale(loss).backward()

            # One all-reduce agrees on the non-finite flag, the signal and the time: the other ranks
            # contribute 0 seconds, so the max is rank 0's clock and every rank takes its decisions.
            codes = {None: 0, "SIGTERM": 2, "SIGINT": 3}
            flags = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0, float(codes[stop.signal_name]),
                                  clock() - t_start if is_main else 0.0], dtype=torch.float64)
            if world > 1:
                flags = dist.all_reduce_max(flags.to(device) if info.backend == "nccl" else flags).cpu()
            reason = {v: k for k, v in codes.items()}[int(flags[1].item())]
            session_seconds = float(flags[2].item())
            result["elapsed_seconds"] = prior_elapsed + session_seconds
            # A by-time budget covers the whole run (all sessions); otherwise max_minutes is per session.
            spent = result["elapsed_seconds"] if by_time else session_seconds
            if reason is None and max_seconds is not None and spent >= max_seconds:
                reason = "time_limit"

            values = {k: float(v.detach()) for k, v in loss_dict.items()}
            grad_norm = None
            if flags[0].item() == 0 and clip is not None:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            # A finite loss can still give non-finite gradients (an overflow in backward); without a
            # GradScaler to catch them, the clip's scale would write NaN into every weight. Gradients are
            # all-reduced before the norm, so every rank takes the same branch.
            bad_grad = grad_norm is not None and not scaler.is_enabled() and not math.isfinite(float(grad_norm))
            if flags[0].item() > 0 or bad_grad:
                what = "gradient" if bad_grad else "loss"
                bad = (f"gradient norm {float(grad_norm)} with finite loss terms" if bad_grad
                       else _nonfinite_report(values, float(loss.detach())))
                if not skip_nonfinite:
                    msg = (f"non-finite {what} at iteration {it + 1}: {bad}. The last good checkpoint is "
                           f"{result['checkpoint'] or '(none yet)'}. Lower schedule.base_lr, set "
                           "schedule.clip_grad_norm, or set runtime.skip_nonfinite=true to skip such steps")
                    logger.event(it + 1, "nonfinite_stop", losses=values)
                    raise NonFiniteLossError(msg)
                optimizer.zero_grad(set_to_none=True)
                result["nonfinite_skipped"] += 1
                logger.event(it + 1, "nonfinite_skip", losses=values, skipped=result["nonfinite_skipped"])
                if is_main:
                    log.warning("iteration %d: non-finite %s (%s), step skipped (%d so far)",
                                it + 1, what, bad, result["nonfinite_skipped"])
            else:
                scaler.step(optimizer)
                if scaler.is_enabled():
                    scale = scaler.get_scale()
                    scaler.update()
                    # fp16 gradients overflowed: GradScaler skipped the step and halved its scale
                    if scaler.get_scale() < scale:
                        result["amp_overflow_skipped"] += 1
                        logger.event(it + 1, "amp_overflow_skip", scale=scale,
                                     skipped=result["amp_overflow_skipped"])
                for k, v in values.items():
                    window.setdefault(k, []).append(v)
                window.setdefault("loss", []).append(float(loss.detach()))
                if grad_norm is not None and math.isfinite(float(grad_norm)):
                    # before clipping: how often and by how much the clip acts
                    window.setdefault("grad_norm", []).append(float(grad_norm))
            lr = optimizer.param_groups[0]["lr"]
            if by_time:
                set_time_progress(scheduler, spent / max_seconds)
            scheduler.step()
            it += 1
            result["iter"] = it
            logger.iter_time(time.perf_counter() - t0)
            if by_time:
                # The logger's ETA counts iterations to max_iter, here only an upper bound: point it at
                # the iteration where the budget should run out at the recent speed.
                per_iter = logger.seconds_per_iter()
                if math.isfinite(per_iter) and per_iter > 0:
                    logger.set_max_iter(min(max_iter, it + int(max(max_seconds - spent, 0.0) / per_iter)))
            logger.advance()

            # An all-skipped window has nothing to report (the same on every rank: the skip is agreed).
            if (it % log_period == 0 or it == max_iter or reason is not None) and window:
                keys = sorted(window)
                local = torch.tensor([float(np.mean(window[k])) if window[k] else 0.0 for k in keys],
                                     dtype=torch.float64)
                if world > 1:
                    local = dist.all_reduce_mean(local.to(device) if info.backend == "nccl" else local).cpu()
                logger.step(it, lr=lr, losses={k: float(v) for k, v in zip(keys, local.cpu().tolist())},
                            data_time=t_data)
                window.clear()

            done = it >= max_iter or reason == "time_limit"
            if it % ckpt_period == 0 or done or reason is not None:
                save_full(it)
            if reason in ("SIGINT", "SIGTERM"):
                result["stop_reason"] = reason
                if is_main:
                    log.warning("stopped by %s at iteration %d; checkpoint %s; continue with --resume",
                                reason, it, result["checkpoint"])
                    logger.event(it, "interrupted", signal=reason, checkpoint=result["checkpoint"])
                break
            if done:
                result["stop_reason"] = "time_limit" if reason == "time_limit" else "completed"
                if is_main and reason == "time_limit":
                    log.info("runtime.max_minutes=%s reached at iteration %d", rt.max_minutes, it)
                    logger.event(it, "time_limit", max_minutes=rt.max_minutes)
                break
            if eval_period and it % eval_period == 0:
                run_eval(it, final=False)

        if world > 1 and hasattr(train_ds, "sync_skipped"):
            train_ds.sync_skipped(dist.all_reduce_max)  # every rank's lazily found bad images, each once
        result["skipped_data"] = dict(getattr(train_ds, "skipped", {}) or {})
        if result["stop_reason"] in ("completed", "time_limit"):
            if world > 1:
                dist.broadcast_buffers(model)
            if is_main:
                final = save_checkpoint(_weights_checkpoint(model, cfg, meta, it), out / "model_final.pth")
                result["final"] = str(final)
            if world > 1:
                digests = dist.all_gather_object(_param_digest(model))
                if is_main:
                    logger.event(it, "ddp_sync", digests=digests, in_sync=len(set(digests)) == 1)
                    if len(set(digests)) != 1:
                        log.warning("DDP ranks ended with different weights: %s", digests)
            if rt.final_eval:
                if device.type == "cuda":
                    # hand the training step's cached blocks back first: jobs sharing a GPU ran out of memory here
                    torch.cuda.empty_cache()
                result["metrics"] = run_eval(it, final=True)
            if is_main:
                logger.event(it, "done", stop_reason=result["stop_reason"], seconds=clock() - t_start,
                             elapsed_seconds=result["elapsed_seconds"],
                             nonfinite_skipped=result["nonfinite_skipped"],
                             amp_overflow_skipped=result["amp_overflow_skipped"], skipped_data=result["skipped_data"])
    finally:
        stop.restore()
        logger.close()

    if is_main and result["skipped_data"]:
        log.warning("skipped bad training data (data.skip_bad): %s", result["skipped_data"])
    result["exit_code"] = EXIT_CODES[result["stop_reason"]]
    result["model"] = model
    return result


def _nonfinite_report(values: dict[str, float], total: float) -> str:
    terms = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        return f"non-finite terms {', '.join(bad)} ({terms})"
    if not math.isfinite(total):
        return f"total {total} ({terms})"
    return f"another rank's loss was non-finite (this rank: {terms})"


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


def _read_best_score(out: Path) -> float | None:
    p = out / "model_best.pth"
    if not p.is_file():
        return None
    try:
        best = load_checkpoint(p).get("best") or {}
        return float(best["value"]) if "value" in best else None
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None
