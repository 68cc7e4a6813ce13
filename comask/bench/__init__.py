"""Benchmarks (`comask bench speed|accuracy|ablation`): CoMask against Mask R-CNN, and the paper's
ablations, measured side by side in the same run. docs/BENCHMARKS.md holds the published numbers."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path
from typing import Any

import torch

from comask.bench.accuracy import (
    ABLATION_MODELS,
    ACCURACY_MODELS,
    format_tables,
    run_training_table,
    select_models,
)
from comask.bench.speed import format_report, run_speed
from comask.config import ConfigError, load_config
from comask.engine.runtime import parse_size

DEFAULT_SPEED_PAIR = ("comask_r50_mfpn_2x_coco", "maskrcnn_r50_fpn_2x_coco")
DEFAULT_TRAIN_PAIR = ("comask_r18_mfpn_shapes", "maskrcnn_r18_fpn_shapes")


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores, torch version, date."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _write(out: Path, stem: str, text: str, data: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")


def _speed(a: argparse.Namespace) -> int:
    train_mode = bool(getattr(a, "train", False))
    default = DEFAULT_TRAIN_PAIR if train_mode else DEFAULT_SPEED_PAIR
    configs = [a.config or default[0]]
    compare = a.compare if a.compare is not None else (None if a.config else default[1])
    if compare:
        configs.append(compare)
    report = run_speed(
        configs,
        size=parse_size(a.size),
        opts=list(a.opts or []),
        weights=a.weights,
        threads=a.threads,
        repeats=int(a.repeats),
        warmup=int(getattr(a, "warmup", 1)),
        mode="train" if train_mode else "inference",
        profile=int(getattr(a, "profile", 0) or 0),
        device=getattr(a, "device", "cpu"),
        amp=getattr(a, "amp", None),
        rounds=int(getattr(a, "rounds", 1) or 1),
        batches=getattr(a, "batches", None),
        compare_opts=list(getattr(a, "compare_opts", None) or []),
    )
    report["machine"] = machine()
    if a.json:
        print(json.dumps(report))
    else:
        m = report["machine"]
        print(f"{m['cpu']}, {report['models'][0]['threads']} threads, torch {m['torch']}, {m['date']}")
        print(format_report(report))
    return 0


def config_test_size(config: str, opts: list[str]) -> tuple[int, int]:
    """The size a config evaluates at (shorter side, longer-side cap): where an ablation's latency is measured."""
    cfg = load_config(config, opts)
    return int(cfg.input.min_size_test), int(cfg.input.max_size_test)


def _accuracy(a: argparse.Namespace, ablation: bool) -> int:
    out = Path(a.out)
    models = select_models(ABLATION_MODELS if ablation else ACCURACY_MODELS, list(a.variants or []))
    if a.config and ablation:
        # the variants' options on another CoMask config (e.g. the pretrained-body one)
        models = [(name, a.config, opts) for name, _, opts in models]
    elif a.config:
        if not a.compare:
            raise ConfigError("comask bench accuracy --config A needs --compare B (the baseline trained beside it)")
        models = [(a.config, a.config, []), (a.compare, a.compare, [])]
    extra: dict[str, dict[str, str]] = {}
    speed_rows = []
    if ablation:
        # CPU latency of every variant at its config's test size unless --size says otherwise (cheap; each in
        # its own process)
        for name, config, model_opts in models:
            all_opts = model_opts + list(a.opts or [])
            size = parse_size(a.size) if a.size != "800x1216" else config_test_size(config, all_opts)
            rep = run_speed([config], size=size,
                            opts=all_opts, threads=a.threads, repeats=int(a.repeats))
            m = rep["models"][0]
            speed_rows.append({"name": name, **m})
            extra[name] = {"CPU latency (s)": f"{m['latency_s']['median']:.3f}",
                           "GFLOPs": f"{m['gflops']:.1f}", "params (M)": f"{m['params'] / 1e6:.2f}"}
    train_opts = list(a.opts or []) + ([f"runtime.threads={a.threads}"] if a.threads else [])
    jobs = int(getattr(a, "jobs", 1) or 1)
    rows = [] if getattr(a, "no_train", False) else run_training_table(models, list(a.seeds), out, train_opts,
                                                                          jobs=jobs)
    stem = "ablation" if ablation else "accuracy"
    info = machine()
    threads = a.threads or (1 if jobs > 1 and rows else torch.get_num_threads())
    header = (f"{info['cpu']}, threads {threads} per run, {jobs} run(s) at once, torch {info['torch']}, {info['date']}; "
              f"opts {' '.join(a.opts or []) or '(config defaults)'}")
    if rows:
        # val (choices) and the held-out test (the numbers to report), each final model scored on both
        text = header + "\n\n" + format_tables(rows, extra)
    else:
        lines = ["| model | CPU latency (s) | GFLOPs | params (M) |", "|---|---|---|---|"]
        lines += [f"| {n} | " + " | ".join(v.values()) + " |" for n, v in extra.items()]
        text = header + "\n\n" + "\n".join(lines)
    data = {"machine": info, "opts": list(a.opts or []), "runs": rows, "speed": speed_rows}
    _write(out, stem, text, data)
    if a.json:
        print(json.dumps(data))
    else:
        print(text)
        print(f"\nwritten: {out / (stem + '.md')} and {stem}.json")
    return 0


def run_bench(a: argparse.Namespace) -> int:
    """Entry point of `comask bench KIND` (see comask/cli.py for the arguments)."""
    if a.kind == "speed":
        return _speed(a)
    if a.kind == "accuracy":
        return _accuracy(a, ablation=False)
    if a.kind == "ablation":
        return _accuracy(a, ablation=True)
    if a.kind == "roi-align":
        from comask.bench.roi_align_grad import run

        configs = [c for c in (a.config, a.compare) if c] or ["comask_mnv3_mfpn_shapes", "maskrcnn_mnv3_fpn_shapes"]
        run(configs, rounds=a.repeats, threads=a.threads or 1)
        return 0
    raise ConfigError(f"unknown benchmark {a.kind!r}: use speed, accuracy, ablation or roi-align")
