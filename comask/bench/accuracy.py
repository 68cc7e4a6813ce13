"""`comask bench accuracy` / `comask bench ablation`: train models on shapes-bench with one budget,
evaluate them, and tabulate COCO metrics in the paper's Table 1 columns.

Every run trains into OUT/<name>_seed<k>/ with `comask.engine.train.train`; a run whose directory
already holds `model_final.pth` and `metrics.json` is reused, so an interrupted comparison resumes
where it stopped (delete the directory to retrain); if only the evaluation settings changed since (test size,
`model.test`), its final model is evaluated again under them. A run is reused only if it trained what the
config resolves to now: model, input, data (but `data.test`) and schedule sections, `runtime.load_from` /
`load_only` / `load_strict`, and the sha256 of any `asset:` file these name (recorded in RUN/bench_inputs.json
when the run starts).

Each final model is scored on `data.val` (the split choices are made on) and, when the config has one, on the
held-out `data.test` (the split numbers are reported on; docs/BENCHMARKS.md "Protocol"): that
evaluation goes to RUN/test_<digest>/ and is read back on the next call.
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
    # not in the paper: the CPU configs' 14x14 skip into the mask branch switched off (the paper's head)
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


# Which held-out split is scored afterwards: not part of what a run trained, nor of its val evaluation.
TEST_SPLIT_KEY = ("data", "test")
# What a run starts from: a finished run is reused only if these are the same (and any asset: file the same bytes).
LOAD_KEYS = ("load_from", "load_only", "load_strict")
INPUTS_FILE = "bench_inputs.json"


def _without_eval_keys(cfg: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items()}
    for section, key in EVAL_ONLY_KEYS + (TEST_SPLIT_KEY,):
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    return out


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _asset_path(name: str) -> Path:
    """The file an `asset:NAME` names (resolved as the checkpoint loader resolves it)."""
    from comask.checkpoint_io import resolve_asset

    return Path(resolve_asset(name))


def run_inputs(cfg_dict: dict) -> dict[str, Any]:
    """What a run starts from: runtime.load_from / load_only / load_strict, and the sha256 of every `asset:`
    file they name (None when that file is missing)."""
    from comask.checkpoint_io import ASSET_PREFIX

    runtime = cfg_dict.get("runtime") or {}
    load = {k: runtime.get(k) for k in LOAD_KEYS}
    named = []
    for v in load.values():
        named += [x for x in (v if isinstance(v, list) else [v]) if isinstance(x, str) and x.startswith(ASSET_PREFIX)]
    hashes = {}
    for name in named:
        path = _asset_path(name)
        hashes[name] = _sha256(path) if path.is_file() else None
    return {**load, "asset_sha256": hashes}


def _check_same_inputs(run_dir: Path, cfg_dict: dict, old: dict, finished: bool) -> None:
    """Refuse a run (finished, or partial and about to be resumed) that started from other weights than `cfg_dict`
    names now: other runtime.load_* values, or an asset: file whose content changed since."""
    new = run_inputs(cfg_dict)
    old_runtime = old.get("runtime") or {}
    changed = [f"runtime.{k}" for k in LOAD_KEYS if old_runtime.get(k) != new[k]]
    record = run_dir / INPUTS_FILE
    if not changed and new["asset_sha256"]:
        try:
            saved = json.loads(record.read_text())
        except (OSError, ValueError):
            saved = None
        if not isinstance(saved, dict):
            raise UserError(
                f"{run_dir} holds a {'finished' if finished else 'partial'} run with no record ({INPUTS_FILE}) of the "
                f"content of {', '.join(new['asset_sha256'])}; delete that folder to retrain it, or use another --out"
            )
        changed = [f"the content of {k}" for k, v in new["asset_sha256"].items() if (saved.get("asset_sha256") or {}).get(k) != v]
    if changed:
        raise UserError(
            f"{run_dir} holds a {'finished' if finished else 'partial'} run whose {', '.join(changed)} differs from "
            f"what {cfg_dict.get('name')} resolves to now; delete that folder to retrain it, or use another --out"
        )


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
    _check_same_inputs(run_dir, new, old, finished=True)
    return _eval_settings(old) != _eval_settings(new)


def _prepare_run_inputs(run_dir: Path, cfg: Any) -> None:
    """Before (re)starting training in run_dir: a partial run must have started from the same weights; record
    what this one starts from (runtime.load_* and the asset files' sha256) for the reuse check."""
    new = cfg.to_dict()
    saved = run_dir / "config.yaml"
    record = run_dir / INPUTS_FILE
    if saved.is_file() and record.is_file():
        try:
            old = yaml.safe_load(saved.read_text())
        except (OSError, yaml.YAMLError):
            old = None
        if isinstance(old, dict):
            _check_same_inputs(run_dir, new, old, finished=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(run_inputs(new), indent=2, sort_keys=True) + "\n")


def _split_override(split: dict) -> str:
    """`data.val={ann: ..., images: ...}` pointing the evaluation at another split (JSON strings: any path)."""
    return f"data.val={{ann: {json.dumps(str(split['ann']))}, images: {json.dumps(str(split['images']))}}}"


def _evaluate_test(run_dir: Path, config: str, overrides: list[str], cfg: Any) -> tuple[dict[str, Any] | None, Path | None]:
    """Metrics of the run's final model on the config's held-out `data.test` (None when it has none), under the
    current evaluation settings, in run_dir/test_<digest>/ (kept and read back by the next call)."""
    test = cfg.to_dict().get("data", {}).get("test")
    if not test:
        return None, None
    key = {**_eval_settings(cfg.to_dict()), "test": {"ann": str(test["ann"]), "images": str(test["images"])}}
    return _cached_eval(run_dir, "test", key, config, list(overrides) + [_split_override(test)])


def _cached_eval(run_dir: Path, prefix: str, key: dict, config: str, opts: list[str]) -> tuple[dict[str, Any], Path]:
    """Evaluate run_dir's final model into run_dir/<prefix>_<digest of key>/, or read back what an earlier call
    left there; an evaluation that did not finish is started again."""
    import hashlib
    import shutil

    from comask.engine.evaluate import evaluate_checkpoint

    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    eval_dir = run_dir / f"{prefix}_{digest}"
    metrics_file = eval_dir / "metrics.json"
    if metrics_file.is_file():
        try:
            data = json.loads(metrics_file.read_text())
            if isinstance(data, dict) and "bbox" in data:
                return data, eval_dir
        except (OSError, ValueError):
            pass
    if eval_dir.exists():
        shutil.rmtree(eval_dir)
    return evaluate_checkpoint(run_dir / "model_final.pth", config=config, opts=opts, out_dir=eval_dir), eval_dir


def _reevaluate(run_dir: Path, config: str, overrides: list[str], cfg: Any) -> tuple[dict[str, Any], Path]:
    """Metrics of the run's final model on val under the current evaluation settings (kept in run_dir/eval_<digest>/,
    so a second call reads them back instead of evaluating again)."""
    return _cached_eval(run_dir, "eval", _eval_settings(cfg.to_dict()), config, list(overrides))


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
        _prepare_run_inputs(run_dir, cfg)
        t0 = time.monotonic()
        # resume=True continues an interrupted run from its last periodic checkpoint (or starts fresh)
        result = train(cfg, run_dir, resume=True)
        seconds = time.monotonic() - t0
        if result.get("stop_reason") not in ("completed", "time_limit"):
            raise UserError(f"training {name} seed {seed} stopped: {result.get('stop_reason')} (see {run_dir})")
        metrics = result.get("metrics") or _finished_metrics(run_dir)
        if not metrics:
            raise UserError(f"training {name} seed {seed} produced no metrics (runtime.final_eval?) in {run_dir}")
    test_metrics, test_dir = _evaluate_test(run_dir, config, overrides, cfg)
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
        # the held-out split (None when the config has none): the numbers to report
        "test": None if test_metrics is None else {
            "eval_dir": str(test_dir),
            "segm": {k: float(test_metrics.get("segm", {}).get(k, float("nan"))) for k in COLUMNS},
            "bbox": {k: float(test_metrics.get("bbox", {}).get(k, float("nan"))) for k in COLUMNS},
        },
    }


SPLITS = ("val", "test")


def _split_rows(rows: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """The rows with `segm` / `bbox` of `split`: val as they are, test from each row's `test` (rows without one
    are left out)."""
    if split == "val":
        return rows
    if split != "test":
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [{**r, "segm": r["test"]["segm"], "bbox": r["test"]["bbox"]} for r in rows if r.get("test")]


def _mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model name: the mean over seeds (and the seeds it covers), the sample std with 2+ seeds."""
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


def _pct(v: float, std: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v < 0:
        return "-"
    return f"{100 * v:.1f}" + ("" if std is None or math.isnan(std) else f" +- {100 * std:.1f}")


def format_table(rows: list[dict[str, Any]], extra: dict[str, str] | None = None, split: str = "val") -> str:
    """Markdown table of `split` (val, or the held-out test): mask AP columns, then box AP columns (COCO AP x 100),
    one row per model, the mean over its seeds (mean +- sample std with 2+ seeds)."""
    extra = extra or {}
    head = ["model", "seeds"] + [f"mask {c}" for c in COLUMNS] + [f"box {c}" for c in COLUMNS]
    head += list(next(iter(extra.values()), {}).keys()) if extra else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in _mean_rows(_split_rows(rows, split)):
        cells = [r["name"], ",".join(str(s) for s in r["seeds"])]
        for task in ("segm", "bbox"):
            std = r.get(task + "_std") or {}
            cells += [_pct(r[task][c], std.get(c)) for c in COLUMNS]
        cells += list((extra.get(r["name"]) or {}).values())
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_tables(rows: list[dict[str, Any]], extra: dict[str, str] | None = None) -> str:
    """Both splits: val (where choices are made) and the held-out test (the numbers to report), when the runs
    have one."""
    n_val = _images_note(rows, "val")
    parts = [f"val{n_val} (choices are made on this split):", "", format_table(rows, extra, "val")]
    if any(r.get("test") for r in rows):
        n_test = _images_note(rows, "test")
        parts += ["", f"test{n_test} (held out; the numbers to report):", "", format_table(rows, extra, "test")]
    else:
        parts += ["", "test: none (the configs name no data.test)"]
    return "\n".join(parts)


def _images_note(rows: list[dict[str, Any]], split: str) -> str:
    """', N images' from the split's annotation file of the first run's config, or ''."""
    from comask.config import load_config

    for r in rows:
        try:
            cfg = load_config(r["config"], list(r.get("opts", [])))
            ann = (cfg.to_dict().get("data") or {}).get(split) or {}
            doc = json.loads(Path(ann["ann"]).read_text())
            return f", {len(doc['images'])} images"
        except Exception:  # a note only: the table does not depend on it
            return ""
    return ""


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
