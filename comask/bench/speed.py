"""`comask bench speed`: inference latency / training-step time, parameters, GFLOPs and peak memory.

Each model is measured in a subprocess of its own (`python -m comask.bench.speed SPEC_JSON`), so the
peak resident set size that `resource.getrusage` reports belongs to that model alone, and the two
models of an A/B comparison run one after the other under the same load.

Inference: batch 1, eval mode, a fixed random image of exactly the requested size (the test-time
resize is set to that size, so the network sees H x W, padded to a multiple of 32 as always), through
the path `Predictor` takes (`predict`, bool masks pasted at `model.test.mask_thresh`). Also reported:
images per second at the `--batches` sizes (default 1 and 8 on CUDA, 1 on the CPU) and, from one
profiled call, host-device syncs and kernel launches (CPU: aten operators) per image (`count_syncs`). A
random-initialised detector scores every class near 1/(C+1), below the usual 0.05 threshold, and
would then run its mask stage on nothing; the benchmark sets `model.test.score_thresh=0` so that both
models always return `detections_per_img` detections and the RoI heads do their full test-time work
(and turns off CoMask's NMS after voting, which on a random model's votes would drop an arbitrary share
of the detections before the mask pass: the measured cost is the worst case, every detection masked).

Training (`--train`): one SGD step (forward, backward, update) on a batch of `schedule.ims_per_batch`
shapes-bench images drawn by the synthetic generator at the config's training size.

Device and precision (`--device cuda`, `--amp bf16|fp16`): the model and its inputs move to the device and
the forward runs under `torch.autocast` with that dtype (training: the loss's backward under a GradScaler
for fp16). On CUDA every timed run is bracketed by `torch.cuda.synchronize()`, so the latency covers the
kernels and not only their launch, and the peak of `torch.cuda.max_memory_allocated` is reported beside
the process's peak RSS. `--amp` also works on the CPU (autocast "cpu"), which is how the tests exercise it.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from comask.config import ConfigError
from comask.engine.runtime import amp_dtype, autocast
from comask.errors import UserError

SPEC_FIELDS = ("config", "opts", "weights", "size", "threads", "repeats", "warmup", "mode", "profile", "device",
               "amp", "batches")
DEVICES = ("cpu", "cuda")


def check_device(device: str, amp: str | None) -> None:
    """Raise a one-line UserError for a device this process cannot use or an unknown --amp value."""
    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    amp_dtype(amp, setting="--amp", off="left out (float32)")
    if device == "cuda" and not torch.cuda.is_available():
        built = torch.version.cuda or "none (CPU-only build)"
        raise UserError(
            f"no CUDA device: torch {torch.__version__} (CUDA {built}) sees no GPU; run on a machine with one, "
            "or leave out --device cuda"
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def _cpu_name() -> str:
    from comask.bench import machine

    return str(machine()["cpu"])


def _count_flops(fn: Any) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 1e9


def _load_model(spec: dict[str, Any], cfg: Any) -> torch.nn.Module:
    from comask.modeling.build import build_model

    model = build_model(cfg, pretrained=False)
    if spec.get("weights"):
        from comask.checkpoint_io import read_state_dict
        from comask.engine.checkpoint import load_model_weights

        load_model_weights(model, read_state_dict(spec["weights"], "--weights"), strict=True,
                           source=str(spec["weights"]))
    return model


def _inference_model(spec: dict[str, Any], cfg: Any) -> tuple[torch.nn.Module, int]:
    """The model as `comask predict` runs it: eval mode, BatchNorm folded when `model.test.fold_bn`."""
    from comask.modeling.fold_bn import fold_for_inference

    model = _load_model(spec, cfg).eval()
    return model, fold_for_inference(model, cfg)


def _inference_cfg(spec: dict[str, Any]) -> Any:
    from comask.config import load_config

    h, w = spec["size"]
    opts = list(spec.get("opts") or []) + [
        "model.test.score_thresh=0.0",
        "model.test.nms_after_vote=false",
        f"input.min_size_test={min(h, w)}",
        f"input.max_size_test={max(h, w)}",
    ]
    return load_config(spec["config"], opts)


def _inference_fn(model: torch.nn.Module, cfg: Any) -> Any:
    """What `Predictor` runs: comask's detectors' `predict` with bool masks at the config's mask threshold
    (any other model: its forward)."""
    predict = getattr(model, "predict", None)
    if not callable(predict):
        return model
    thr = float(cfg.model.test.mask_thresh)
    return lambda images: predict(images, mask_thr=thr)


def _train_batch(cfg: Any, seed: int = 0) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """`ims_per_batch` shapes-bench images at the config's largest training size, with their targets."""
    from comask.data import synth

    gen = synth.PRESETS["shapes-bench"]
    classes = list(gen["classes"])
    if int(cfg.model.num_classes) < len(classes):
        raise ConfigError(
            f"--train draws shapes-bench images ({len(classes)} classes): the config's model.num_classes is "
            f"{cfg.model.num_classes}; use a shapes-bench config or --opts model.num_classes={len(classes)}"
        )
    size = int(max(cfg.input.min_size_train))
    images, targets = [], []
    for i in range(int(cfg.schedule.ims_per_batch)):
        img, insts = synth.render_image(gen, size, seed, "train", i)
        insts = [d for d in insts if d["visible"].any()]
        masks = np.stack([d["visible"] for d in insts]).astype(np.uint8)
        boxes = []
        for m in masks:
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        labels = [classes.index(d["name"]) + 1 for d in insts]
        images.append(torch.from_numpy(img).permute(2, 0, 1).float().div(255))
        targets.append({
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(masks),
        })
    return images, targets


def _timed(
    fn: Any, repeats: int, warmup: int, cpu_times: list[float] | None = None, device: torch.device | None = None
) -> list[float]:
    dev = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(dev)  # nothing queued from the previous run is counted in this one
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - c0)
    return times


def timed_sgd_steps(
    model: torch.nn.Module,
    next_batch: Any,
    repeats: int,
    warmup: int,
    cpu_times: list[float] | None = None,
    amp: str | None = None,
) -> list[float]:
    """Seconds of `repeats` SGD steps (forward, backward, update) after `warmup` untimed ones.

    `next_batch()` -> (images, targets) is called outside the timed region, so a data loader's time
    is not counted. Used by `bench speed --train` (one fixed batch).
    `cpu_times`, if given, receives each timed step's process CPU seconds. The step runs on the model's
    device (synchronised around each step on CUDA); `amp` ("bf16" / "fp16") runs the forward under
    autocast, fp16 with a GradScaler as in training.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    device = params[0].device if params else torch.device("cpu")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def step() -> None:
        images, targets = next_batch()
        _sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        with autocast(device, amp_dtype(amp)):
            loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)

    times: list[float] = []
    cpus: list[float] = []
    for _ in range(warmup):
        step()
    times.clear()
    cpus.clear()
    for _ in range(repeats):
        step()
    if cpu_times is not None:
        cpu_times.extend(cpus)
    return times


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one model in this process (the subprocess side of `run_speed`)."""
    from comask.config import load_config
    from comask.modeling.static_compile import compile_for_inference, restore_eager

    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    mode = spec.get("mode", "inference")
    amp = spec.get("amp")
    check_device(spec.get("device") or "cpu", amp)
    device = torch.device(spec.get("device") or "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Process CPU seconds beside wall seconds: with one thread on a machine that other jobs share, the
    # CPU time leaves out the time this process waited for a core (see docs/BENCHMARKS.md).
    cpu_times: list[float] = []
    if mode == "inference":
        cfg = _inference_cfg(spec)
        model, folded = _inference_model(spec, cfg)
        model = model.to(device)
        eager = compile_for_inference(model, cfg)  # model.test.compile (eager by default)
        h, w = spec["size"]
        image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
        run = _inference_fn(model, cfg)

        def step(images: list[torch.Tensor] | None = None) -> Any:
            with torch.inference_mode(), autocast(device, amp_dtype(amp)):
                return run(images or [image])

        t_first = time.perf_counter()
        out = step()  # first call: allocations (and the compile), also tells how many detections the RoI heads handled
        first_call_s = time.perf_counter() - t_first
        detections = int(out[0]["boxes"].shape[0])
        times = _timed(step, int(spec["repeats"]), max(0, int(spec["warmup"]) - 1), cpu_times, device)
        flops_fn = step
        size_desc = [h, w]
        # images per second at other batch sizes (the same image repeated: the work per image is the same)
        fps_by_batch = {1: 1.0 / statistics.median(times)}
        for b in sorted({int(b) for b in spec.get("batches") or [1]} - {1}):
            batch = [image] * b
            tb = _timed(lambda batch=batch: step(batch), int(spec["repeats"]), int(spec["warmup"]), None, device)
            fps_by_batch[b] = b / statistics.median(tb)
        syncs = count_syncs(step, 1, device.type)
        restore_eager(model, eager)  # FLOPs are counted on the eager modules
    elif mode == "train":
        cfg = load_config(spec["config"], list(spec.get("opts") or []))
        model = _load_model(spec, cfg).train().to(device)
        images, targets = _train_batch(cfg)
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        times = timed_sgd_steps(model, lambda: (images, targets), int(spec["repeats"]), int(spec["warmup"]),
                                cpu_times, amp=amp)
        detections = None
        fps_by_batch = {}

        def flops_fn() -> Any:
            # forward + backward, no update (FlopCounterMode counts the autograd kernels too)
            with autocast(device, amp_dtype(amp)):
                loss = sum(model(images, targets).values())
            loss.backward()
            model.zero_grad(set_to_none=True)

        size_desc = [int(max(cfg.input.min_size_train))] * 2
    else:
        raise ConfigError(f"unknown speed mode {mode!r}")

    result: dict[str, Any] = {
        "config": spec["config"],
        "opts": list(spec.get("opts") or []),
        "mode": mode,
        "model_type": str(cfg.model.type),
        "size": size_desc,
        "batch": 1 if mode == "inference" else int(cfg.schedule.ims_per_batch),
        "threads": torch.get_num_threads(),
        "device": device.type,
        "amp": amp,
        "latency_s": {"median": statistics.median(times), "min": min(times), "max": max(times)},
        # inference: images per second at batch 1; training: steps per second
        "fps": 1.0 / statistics.median(times),
        "times_s": times,
        "cpu_s": {"median": statistics.median(cpu_times), "min": min(cpu_times), "max": max(cpu_times)},
        "cpu_times_s": cpu_times,
        "params": sum(p.numel() for p in model.parameters()),
        "detections": detections,
    }
    # Before the FLOP count, whose dispatch hooks hold extra tensors: peak RSS is the model's own.
    result["peak_rss_mb"] = _peak_rss_mb()
    result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    # after the peak RSS: naming the CPU imports comask.bench, whose modules are not the model's memory
    result["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    result["gflops"] = _count_flops(flops_fn)
    if mode == "inference":
        result["fps_by_batch"] = {str(b): f for b, f in fps_by_batch.items()}
        result["syncs"] = syncs
        result["compiled"] = str(cfg.model.test.get("compile", "eager")) if eager else None
        result["first_call_s"] = first_call_s
        result["folded_bn"] = folded
    if spec.get("profile"):
        result["profile"] = _profile(flops_fn if mode == "train" else step, int(spec["profile"]))
    return result


# Operators that make the host wait for the device's values (on CUDA a stream synchronisation; on the CPU the
# same calls, counted as the device-independent stand-in): scalar reads, data-dependent shapes, torchvision's
# NMS (its CUDA kernel finishes on the host) and comask's own marked reads (comask.modeling.sync).
SYNC_OPS = frozenset({
    "aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::unique_dim",
    "aten::unique_consecutive", "torchvision::nms", "comask::host_read",
})
_CUDA_SYNC_CALLS = frozenset({"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"})
_CUDA_LAUNCH_CALLS = frozenset({"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                                "cudaGraphLaunch"})


def count_syncs(fn: Any, images: int = 1, device: str = "cpu") -> dict[str, Any]:
    """Run `fn()` once under torch.profiler and count, per image: `syncs` (outermost SYNC_OPS calls, e.g. an
    `.item()` counts once, not again for the `_local_scalar_dense` inside it), `by_op` (the same per operator),
    `ops` (outermost aten operators: on the CPU the stand-in for kernel launches) and, on CUDA, `launches`
    (kernel launch calls) and `cuda_syncs` (stream / device / event synchronisations and blocking copies)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
    by_op: dict[str, int] = {}
    ops = launches = cuda_syncs = 0
    for e in prof.events():
        name = e.name
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue  # a profiler range also shows on the GPU timeline under the same name: count it once
        if name in _CUDA_LAUNCH_CALLS:
            launches += 1
        elif name in _CUDA_SYNC_CALLS:
            cuda_syncs += 1
        parent, under_sync, under_op = e.cpu_parent, False, False
        while parent is not None:
            under_sync = under_sync or parent.name in SYNC_OPS
            under_op = under_op or parent.name.startswith("aten::")
            parent = parent.cpu_parent
        if name.startswith("aten::") and not under_op:
            ops += 1
        if name in SYNC_OPS and not under_sync:
            by_op[name] = by_op.get(name, 0) + 1
    out: dict[str, Any] = {
        "syncs": sum(by_op.values()) / images,
        "by_op": {k: v / images for k, v in sorted(by_op.items())},
        "ops": ops / images,
    }
    if device == "cuda":
        out["launches"] = launches / images
        out["cuda_syncs"] = cuda_syncs / images
    return out


def _profile(fn: Any, top: int) -> list[dict[str, Any]]:
    """The `top` operators by self CPU time over one call, and the time under each named stage."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [
        {"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "total_s": e.cpu_time_total / 1e6, "calls": e.count}
        for e in rows
    ]


def stage_times(spec: dict[str, Any]) -> dict[str, float]:
    """Seconds spent in each top-level stage (and the CoMask RoI-head steps) over one inference."""
    from comask.modeling.msfem import msfem_levels

    cfg = _inference_cfg(spec)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    model, _ = _inference_model(spec, cfg)
    h, w = spec["size"]
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))
    acc: dict[str, float] = {}
    starts: dict[str, float] = {}

    def wrap(name: str, mod: torch.nn.Module) -> None:
        def pre(*_: Any) -> None:
            starts[name] = time.perf_counter()

        def post(*_: Any) -> None:
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - starts[name]

        mod.register_forward_pre_hook(pre)
        mod.register_forward_hook(post)

    named = {"backbone": model.backbone, "rpn": model.rpn, "roi_heads": model.roi_heads}
    body = getattr(model.backbone, "body", None)
    if body is not None:
        named["backbone.body"] = body
        named["backbone.fpn"] = model.backbone.fpn
    # both placements (in the FPN: its time is also inside backbone.fpn; after it: outside)
    for path, m in msfem_levels(model.backbone).values():
        named[f"backbone.{path}"] = m
    for k in ("cls_head", "collab_head", "box_head", "mask_head", "box_roi_pool", "mask_roi_pool",
              "cls_pooler", "collab_pooler", "mask_predictor"):
        m = getattr(model.roi_heads, k, None)
        if isinstance(m, torch.nn.Module):
            named[f"roi_heads.{k}"] = m
    for name, m in named.items():
        wrap(name, m)
    with torch.inference_mode():
        model([image])  # warm-up
        acc.clear()
        t0 = time.perf_counter()
        model([image])
        acc["total"] = time.perf_counter() - t0
    return acc


# ------------------------------------------------------------------------------------------------
# Parent side
# ------------------------------------------------------------------------------------------------


def run_in_subprocess(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run `measure(spec)` in a fresh Python process and return its result."""
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
        env["MKL_NUM_THREADS"] = str(spec["threads"])
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from comask.bench.speed import main; sys.exit(main())", json.dumps(spec)],
        capture_output=True, text=True, env=env, timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise UserError(
            f"speed measurement of {spec['config']} failed (exit {proc.returncode}): " + " | ".join(tail)
        )
    return json.loads(lines[-1])


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def pool_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's result over several rounds: timings pooled, peak memory the largest of any round."""
    if len(results) == 1:
        return results[0]
    out = dict(results[0])
    times = [t for r in results for t in r["times_s"]]
    cpus = [t for r in results for t in r["cpu_times_s"]]
    out["times_s"], out["cpu_times_s"] = times, cpus
    out["latency_s"] = {"median": statistics.median(times), "min": min(times), "max": max(times)}
    out["cpu_s"] = {"median": statistics.median(cpus), "min": min(cpus), "max": max(cpus)}
    out["fps"] = 1.0 / out["latency_s"]["median"]
    if out.get("fps_by_batch"):  # batch 1 from the pooled timings, other sizes the median of the rounds'
        out["fps_by_batch"] = {b: statistics.median(r["fps_by_batch"][b] for r in results) for b in out["fps_by_batch"]}
        out["fps_by_batch"]["1"] = out["fps"]
    out["rounds"] = len(results)
    out["round_medians_s"] = [r["latency_s"]["median"] for r in results]
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
    if out.get("peak_gpu_mb") is not None:
        out["peak_gpu_mb"] = max(r["peak_gpu_mb"] for r in results)
    return out


def run_speed(
    configs: list[str],
    *,
    size: tuple[int, int],
    opts: list[str] | None = None,
    weights: str | None = None,
    threads: int | None = None,
    repeats: int = 5,
    warmup: int = 1,
    mode: str = "inference",
    profile: int = 0,
    device: str = "cpu",
    amp: str | None = None,
    rounds: int = 1,
    batches: list[int] | None = None,
    compare_opts: list[str] | None = None,
) -> dict[str, Any]:
    """Measure each config in its own subprocess (A, then B) and compute the A/B ratios. `compare_opts` are
    added to B's options only, so one config can be measured against itself with one setting changed.

    With `rounds` > 1 the models alternate (A, B, A, B, ...), a fresh process each time, and each model's
    statistics pool all its rounds: on a shared machine the load drifts within minutes, and a single A-then-B
    pair would charge that drift to whichever model ran in the worse stretch."""
    check_device(device, amp)  # here too, so a missing GPU is one line and not a subprocess traceback
    if rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {rounds}")
    if batches is not None and (not batches or min(batches) < 1):
        raise UserError(f"--batches must list batch sizes >= 1, got {batches}")
    if compare_opts and len(configs) < 2:
        raise UserError("--compare-opts needs --compare (the model those options apply to)")
    runs: list[list[dict[str, Any]]] = [[] for _ in configs]
    for r in range(rounds):
        for i, config in enumerate(configs):
            b_only = list(compare_opts or []) if i == 1 else []
            spec = {"config": config, "opts": list(opts or []) + b_only, "weights": weights, "size": list(size),
                    "threads": threads, "repeats": repeats, "warmup": warmup, "mode": mode,
                    "profile": profile if r == 0 else 0, "device": device, "amp": amp,
                    "batches": list(batches or ([1, 8] if device == "cuda" else [1]))}
            runs[i].append(run_in_subprocess(spec))
    models = [pool_rounds(rs) for rs in runs]
    for i, m in enumerate(models):
        m["label"] = m["config"] + (f" ({' '.join(compare_opts)})" if i == 1 and compare_opts else "")
    report: dict[str, Any] = {"models": models}
    if len(models) == 2:
        a, b = models
        report["ratio"] = {
            "latency": _ratio(a["latency_s"]["median"], b["latency_s"]["median"]),
            "latency_min": _ratio(a["latency_s"]["min"], b["latency_s"]["min"]),
            "cpu": _ratio(a["cpu_s"]["median"], b["cpu_s"]["median"]),
            "peak_rss": _ratio(a["peak_rss_mb"], b["peak_rss_mb"]),
            "gflops": _ratio(a["gflops"], b["gflops"]),
            "params": _ratio(a["params"], b["params"]),
            "peak_gpu": _ratio(a["peak_gpu_mb"], b["peak_gpu_mb"]) if a["peak_gpu_mb"] is not None else None,
        }
    return report


def _label(m: dict[str, Any]) -> str:
    return m.get("label", m["config"])  # reports written before labels existed name the config only


def format_report(report: dict[str, Any]) -> str:
    models = report["models"]
    what = "train step (s)" if models and models[0]["mode"] == "train" else "latency (s)"
    gpu = any(m.get("device") == "cuda" for m in models)
    lines = []
    if models and (gpu or models[0].get("amp")):
        m0 = models[0]
        lines += [f"device {m0['device']} ({m0['device_name']}), autocast {m0['amp'] or 'off (float32)'}", ""]
    rate = "steps/s" if what.startswith("train") else "FPS"
    extra = f" {rate} | peak GPU (MB) |" if gpu else ""
    lines += [
        f"| model | size | threads | {what} median | min | max | CPU (s) median | params (M) | GFLOPs | peak RSS (MB) |"
        + extra,
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if gpu else ""),
    ]
    for m in models:
        lat = m["latency_s"]
        size = "x".join(str(s) for s in m["size"])
        if m["mode"] == "train":
            size += f" x{m['batch']}"
        lines.append(
            f"| {_label(m)} | {size} | {m['threads']} | {lat['median']:.3f} | {lat['min']:.3f} | "
            f"{lat['max']:.3f} | {m['cpu_s']['median']:.3f} | {m['params'] / 1e6:.2f} | {m['gflops']:.1f} | "
            f"{m['peak_rss_mb']:.0f} |"
            + (f" {m['fps']:.2f} | {m['peak_gpu_mb']:.0f} |" if gpu else "")
        )
    for m in models:
        if m.get("rounds"):
            per_round = ", ".join(f"{t:.3f}" for t in m["round_medians_s"])
            lines.append(f"{_label(m)}: {m['rounds']} alternating rounds, medians {per_round}")
    r = report.get("ratio")
    if r:
        lines.append("")
        lines.append(
            f"A/B: latency {r['latency']:.3f}x (of minima {r['latency_min']:.3f}x, of CPU time {r['cpu']:.3f}x), "
            f"peak RSS {r['peak_rss']:.3f}x, GFLOPs {r['gflops']:.3f}x, params {r['params']:.3f}x"
            + (f", peak GPU memory {r['peak_gpu']:.3f}x" if r.get("peak_gpu") is not None else "")
        )
    from comask.modeling.static_compile import STATIC_PART

    for m in models:
        if m.get("compiled"):
            first = f", first call {m['first_call_s']:.1f} s with the compile" if m.get("first_call_s") else ""
            lines += ["", f"{_label(m)}: torch.compile mode {m['compiled']} of {', '.join(STATIC_PART)} (the RoI "
                      f"stage eager; FLOPs counted eager{first})"]
    if any(m.get("syncs") for m in models):
        batches = sorted({int(b) for m in models for b in m.get("fps_by_batch") or {}})
        per = "kernel launches" if gpu else "aten ops"
        lines += ["", f"| model | host syncs / image | {per} / image | "
                  + " | ".join(f"FPS batch {b}" for b in batches) + " |",
                  "|---|---|---|" + "---|" * len(batches)]
        for m in models:
            sy = m.get("syncs") or {}
            fps = m.get("fps_by_batch") or {}
            work = sy.get("launches", sy.get("ops", 0.0))
            lines.append(f"| {_label(m)} | {sy.get('syncs', 0.0):.0f} | {work:.0f} | "
                         + " | ".join(f"{fps[str(b)]:.2f}" if str(b) in fps else "-" for b in batches) + " |")
        for m in models:
            by_op = (m.get("syncs") or {}).get("by_op") or {}
            if by_op:
                lines.append(f"{_label(m)} syncs by operator: "
                             + ", ".join(f"{k} {v:g}" for k, v in by_op.items()))
    for m in models:
        for row in m.get("profile") or []:
            if row is (m.get("profile") or [None])[0]:
                lines.append(f"\nprofile of {_label(m)} (self CPU time, one call):")
            lines.append(f"  {row['self_s']:8.3f} s  {row['calls']:6d}x  {row['op']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    if spec.get("mode") == "stages":
        print(json.dumps(stage_times(spec)))
        return 0
    print(json.dumps(measure(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
