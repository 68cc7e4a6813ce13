"""`comask bench accuracy` / `comask bench ablation`: train models on shapes-bench with one budget,
evaluate them, and tabulate COCO metrics in the paper's Table 1 columns.

Every run trains into OUT/<name>_seed<k>/ with `comask.engine.train.train`; a run whose directory
already holds `model_final.pth` and `metrics.json` is reused, so an interrupted comparison resumes
where it stopped (delete the directory to retrain); if only the evaluation settings changed since (test size,
`model.test`), its final model is evaluated again under them.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from comask.errors import UserError

COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

# The standard pair: identical backbone, FPN width, RPN, sampling, data and schedule (see their YAML).
ACCURACY_MODELS: list[tuple[str, str, list[str]]] = [
    ("comask", "comask_r18_mfpn_shapes", []),
    ("maskrcnn", "maskrcnn_r18_fpn_shapes", []),
]

# Paper Table 2 (MSFEM branches B) and Table 3 (w/o collaborative learning), on the CoMask pair config.
# B = 4 is the config's own value: that row is the accuracy benchmark's "comask" run (see run_dir_name).
ABLATION_MODELS: list[tuple[str, str, list[str]]] = [
    ("comask_B0", "comask_r18_mfpn_shapes", ["model.msfem.branches=0"]),
    ("comask_B1", "comask_r18_mfpn_shapes", ["model.msfem.branches=1"]),
    ("comask_B2", "comask_r18_mfpn_shapes", ["model.msfem.branches=2"]),
    ("comask_B4", "comask_r18_mfpn_shapes", []),
    ("comask_B4_woCL", "comask_r18_mfpn_shapes", ["model.collab_head.collaborative=false"]),
    # not in the paper: the CPU configs' 14x14 skip into the mask branch switched off (METHOD.md's head)
    ("comask_B4_noskip", "comask_r18_mfpn_shapes", ["model.collab_head.mask_skip=false"]),
    # not in the paper's tables: MSFEM's output as the paper's eq. 7 writes it, F_o = conv3x3(F_f * V2), and as
    # the authors' code has it, ReLU(y + GN(conv3x3(y))); on a config that already has that form the row is B4
    ("comask_B4_eq7", "comask_r18_mfpn_shapes", ["model.msfem.residual=false"]),
    ("comask_B4_residual", "comask_r18_mfpn_shapes", ["model.msfem.residual=true"]),
    # not in the paper: MSFEM's 1x1 fusion started as the identity on F_0 (coarser branches at zero), so the
    # module starts as plain FPN's output conv on the attended input; and the Kaiming fusion, for configs that
    # start from the identity (on such a config the idfuse row is B4)
    ("comask_B4_idfuse", "comask_r18_mfpn_shapes", ["model.msfem.fusion_init=identity"]),
    ("comask_B4_kaimingfuse", "comask_r18_mfpn_shapes", ["model.msfem.fusion_init=kaiming"]),
]


def run_dir_name(name: str, config: str, model_opts: list[str]) -> str:
    """The directory (under --out, before `_seed<k>`) of one run. A row that trains its config unchanged is
    the accuracy benchmark's run of that config, so `bench ablation --out D` after `bench accuracy --out D`
    reuses it (the B4 row) instead of training it again."""
    default_config = ABLATION_MODELS[0][1]
    if not model_opts:
        return next((n for n, c, o in ACCURACY_MODELS if c == config and not o), config)
    return name if config == default_config else f"{config}-{name}"


def select_models(models: list[tuple[str, str, list[str]]], names: list[str] | None) -> list[tuple[str, str, list[str]]]:
    """The rows of `models` named in `names` (all when empty); an unknown name is a one-line error."""
    if not names:
        return models
    known = [m[0] for m in models]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return [m for m in models if m[0] in names]


# Settings that change what a trained model is scored on, not what it learned: a finished run whose config
# differs only here is evaluated again (test resize, score threshold, detections per image, ...).
EVAL_ONLY_KEYS = (("input", "min_size_test"), ("input", "max_size_test"), ("model", "test"))


def _without_eval_keys(cfg: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items()}
    for section, key in EVAL_ONLY_KEYS:
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    return out


def _eval_settings(cfg: dict) -> dict:
    return {f"{s}.{k}": (cfg.get(s) or {}).get(k) for s, k in EVAL_ONLY_KEYS}


def _check_same_config(run_dir: Path, cfg: Any) -> bool:
    """A finished run is reused only if it trained what `cfg` now resolves to (model, input, data, schedule); a
    run left by an older config under the same --out is an error, not a silent stale row. True when only the
    evaluation settings (EVAL_ONLY_KEYS) differ, i.e. the run's model must be evaluated again."""
    saved = run_dir / "config.yaml"
    try:
        old = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{saved}: cannot read the finished run's config ({e}); delete {run_dir} to retrain") from None
    old = old if isinstance(old, dict) else {}
    new = cfg.to_dict()
    sections = ("model", "input", "data", "schedule")
    old_t, new_t = _without_eval_keys(old), _without_eval_keys(new)
    changed = [s for s in sections if old_t.get(s) != new_t.get(s)]
    if changed:
        raise UserError(
            f"{run_dir} holds a finished run whose '{', '.join(changed)}' config differs from what {cfg.get('name')} "
            f"resolves to now; delete that folder to retrain it, or use another --out"
        )
    return _eval_settings(old) != _eval_settings(new)


def _reevaluate(run_dir: Path, config: str, overrides: list[str], cfg: Any) -> tuple[dict[str, Any], Path]:
    """Metrics of the run's final model under the current evaluation settings, in run_dir/eval_<digest>/ (kept,
    so a second call reads them back instead of evaluating again)."""
    import hashlib

    from comask.engine.evaluate import evaluate_checkpoint

    digest = hashlib.sha1(json.dumps(_eval_settings(cfg.to_dict()), sort_keys=True).encode()).hexdigest()[:8]
    eval_dir = run_dir / f"eval_{digest}"
    metrics_file = eval_dir / "metrics.json"
    if metrics_file.is_file():
        try:
            data = json.loads(metrics_file.read_text())
            if isinstance(data, dict) and "bbox" in data:
                return data, eval_dir
        except (OSError, ValueError):
            pass
    if eval_dir.exists():  # an evaluation that did not finish: start it again
        import shutil

        shutil.rmtree(eval_dir)
    return evaluate_checkpoint(run_dir / "model_final.pth", config=config, opts=overrides, out_dir=eval_dir), eval_dir


def _finished_metrics(run_dir: Path) -> dict[str, Any] | None:
    m = run_dir / "metrics.json"
    if (run_dir / "model_final.pth").is_file() and m.is_file():
        try:
            data = json.loads(m.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and "bbox" in data else None
    return None


def train_and_evaluate(
    name: str, config: str, model_opts: list[str], seed: int, out: Path, opts: list[str]
) -> dict[str, Any]:
    """Train one (config, seed) into OUT/<name>_seed<seed>/ (or reuse a finished run); its metrics row."""
    from comask.config import load_config
    from comask.engine.train import train

    run_dir = out / f"{run_dir_name(name, config, model_opts)}_seed{seed}"
    overrides = list(model_opts) + list(opts) + [f"runtime.seed={seed}", "runtime.final_eval=true"]
    cfg = load_config(config, overrides)
    metrics = _finished_metrics(run_dir)
    seconds = None
    reused = metrics is not None
    eval_dir = None
    if metrics is not None and _check_same_config(run_dir, cfg):
        metrics, eval_dir = _reevaluate(run_dir, config, overrides, cfg)
    if metrics is None:
        t0 = time.monotonic()
        # resume=True continues an interrupted run from its last periodic checkpoint (or starts fresh)
        result = train(cfg, run_dir, resume=True)
        seconds = time.monotonic() - t0
        if result.get("stop_reason") not in ("completed", "time_limit"):
            raise UserError(f"training {name} seed {seed} stopped: {result.get('stop_reason')} (see {run_dir})")
        metrics = result.get("metrics") or _finished_metrics(run_dir)
        if not metrics:
            raise UserError(f"training {name} seed {seed} produced no metrics (runtime.final_eval?) in {run_dir}")
    return {
        "name": name,
        "config": config,
        "opts": overrides,
        "seed": seed,
        "iters": int(cfg.schedule.max_iter),
        "train_seconds": seconds,
        "reused": reused,
        "run_dir": str(run_dir),
        "eval_dir": str(eval_dir) if eval_dir else None,
        "segm": {k: float(metrics.get("segm", {}).get(k, float("nan"))) for k in COLUMNS},
        "bbox": {k: float(metrics.get("bbox", {}).get(k, float("nan"))) for k in COLUMNS},
    }


def _mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model name: the mean over seeds (and the seeds it covers)."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_name.setdefault(r["name"], []).append(r)
    out = []
    for name, rs in by_name.items():
        row = {"name": name, "seeds": [r["seed"] for r in rs]}
        for task in ("segm", "bbox"):
            row[task] = {k: statistics.fmean(r[task][k] for r in rs) for k in COLUMNS}
            if len(rs) > 1:
                row[task + "_std"] = {k: statistics.stdev(r[task][k] for r in rs) for k in COLUMNS}
        out.append(row)
    return out


def _pct(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) or v < 0 else f"{100 * v:.1f}"


def format_table(rows: list[dict[str, Any]], extra: dict[str, str] | None = None) -> str:
    """Markdown table: mask AP columns, then box AP columns (COCO AP x 100), one row per model."""
    extra = extra or {}
    head = ["model", "seeds"] + [f"mask {c}" for c in COLUMNS] + [f"box {c}" for c in COLUMNS]
    head += list(next(iter(extra.values()), {}).keys()) if extra else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in _mean_rows(rows):
        cells = [r["name"], ",".join(str(s) for s in r["seeds"])]
        cells += [_pct(r["segm"][c]) for c in COLUMNS] + [_pct(r["bbox"][c]) for c in COLUMNS]
        cells += list((extra.get(r["name"]) or {}).values())
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _generate_synth_once(work: list[tuple[str, str, list[str], int]], opts: list[str]) -> None:
    """Write each synthetic set the runs train on before they start, so that parallel workers do not each
    generate the same set (36 s of a core each for shapes-bench) only to keep one copy."""
    from comask.config import load_config
    from comask.data.synth import ensure_synth

    done = set()
    for _, config, model_opts, _ in work:
        synth = load_config(config, list(model_opts) + list(opts)).data.get("synth")
        if synth and (synth.preset, str(synth.root)) not in done:
            ensure_synth(synth.preset, synth.root)
            done.add((synth.preset, str(synth.root)))


def run_training_table(
    models: list[tuple[str, str, list[str]]], seeds: list[int], out: Path, opts: list[str], jobs: int = 1
) -> list[dict[str, Any]]:
    """Train and evaluate every (seed, model); with jobs > 1, that many runs at once, each in its own
    process with `runtime.threads=1` (on a small shared CPU, one thread per run loses nothing to
    threads waiting on each other; docs/BENCHMARKS.md)."""
    work = [(name, config, model_opts, seed) for seed in seeds for name, config, model_opts in models]
    if jobs <= 1:
        return [train_and_evaluate(n, c, mo, s, out, opts) for n, c, mo, s in work]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    _generate_synth_once(work, opts)
    # spawn: a fresh interpreter per worker, no forked torch thread pools or loggers
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [
            pool.submit(train_and_evaluate, n, c, mo, s, out, list(opts) + ["runtime.threads=1"]) for n, c, mo, s in work
        ]
        return [f.result() for f in futures]
