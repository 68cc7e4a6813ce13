"""`comask bench`: output format only (benchmarks are commands, not tests; docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comask import cli
from comask.bench.accuracy import COLUMNS, format_table, format_tables
from comask.bench.speed import _timed, check_device, format_report
from comask.config import ConfigError
from comask.engine.runtime import parse_size
from comask.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "comask", "bench", *args, "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_speed_json_is_well_formed() -> None:
    rep = _bench(
        "speed", "--config", "comask_r18_mfpn_shapes", "--compare", "maskrcnn_r18_fpn_shapes",
        "--size", "64x96", "--threads", "1", "--repeats", "2", "--warmup", "0",
    )
    models = rep["models"]
    assert [m["config"] for m in models] == ["comask_r18_mfpn_shapes", "maskrcnn_r18_fpn_shapes"]
    assert [m["model_type"] for m in models] == ["comask", "maskrcnn"]
    for m in models:
        lat = m["latency_s"]
        assert 0 < lat["min"] <= lat["median"] <= lat["max"]
        assert len(m["times_s"]) == 2
        cpu = m["cpu_s"]
        assert len(m["cpu_times_s"]) == 2 and 0 < cpu["min"] <= cpu["median"] <= cpu["max"]
        # one thread: the process cannot use more CPU time than wall time (small slack for clock granularity)
        assert all(c <= t * 1.05 + 0.01 for c, t in zip(m["cpu_times_s"], m["times_s"]))
        assert m["size"] == [64, 96] and m["threads"] == 1 and m["batch"] == 1
        assert m["params"] > 1_000_000 and m["gflops"] > 0.01
        assert 50 < m["peak_rss_mb"] < 20_000
        # score_thresh=0: a random-initialised model still hands a full set of detections to its mask stage
        assert m["detections"] == 50
        assert m["device"] == "cpu" and m["amp"] is None and m["peak_gpu_mb"] is None
        assert m["device_name"] == rep["machine"]["cpu"]
        assert math.isclose(m["fps"], 1 / m["latency_s"]["median"])
    a, b = models
    # MSFEM and the collaborative head add parameters over the baseline (FLOPs depend on the head's depth
    # and the detection count: a shallow collaborative tower at 7x7 can cost less than a 14x14 mask head)
    assert a["params"] > b["params"] and a["gflops"] != b["gflops"]
    r = rep["ratio"]
    assert math.isclose(r["latency"], a["latency_s"]["median"] / b["latency_s"]["median"])
    assert math.isclose(r["peak_rss"], a["peak_rss_mb"] / b["peak_rss_mb"])
    assert math.isclose(r["cpu"], a["cpu_s"]["median"] / b["cpu_s"]["median"])
    assert math.isclose(r["latency_min"], a["latency_s"]["min"] / b["latency_s"]["min"])
    assert r["peak_gpu"] is None
    assert rep["machine"]["cores"] >= 1 and rep["machine"]["date"]


def test_speed_train_step_json() -> None:
    rep = _bench(
        "speed", "--train", "--config", "comask_r18_mfpn_shapes", "--threads", "1", "--repeats", "1",
        "--warmup", "0", "--opts", "schedule.ims_per_batch=1", "input.min_size_train=[64]",
    )
    (m,) = rep["models"]
    assert "ratio" not in rep
    assert m["mode"] == "train" and m["batch"] == 1 and m["size"] == [64, 64]
    assert m["latency_s"]["median"] > 0 and m["gflops"] > 0 and m["cpu_s"]["median"] > 0


def test_speed_under_cpu_bf16_autocast() -> None:
    """`--amp` on the CPU runs the same path a GPU run takes (autocast around the forward), minus CUDA."""
    rep = _bench(
        "speed", "--config", "comask_r18_mfpn_shapes", "--size", "64x96", "--threads", "1", "--repeats", "1",
        "--warmup", "0", "--amp", "bf16", "--device", "cpu",
    )
    (m,) = rep["models"]
    assert m["amp"] == "bf16" and m["device"] == "cpu" and m["peak_gpu_mb"] is None
    assert m["detections"] == 50 and m["size"] == [64, 96] and m["gflops"] > 0.01
    assert m["latency_s"]["median"] > 0 and math.isclose(m["fps"], 1 / m["latency_s"]["median"])


def test_train_step_under_cpu_bf16_autocast() -> None:
    rep = _bench(
        "speed", "--train", "--config", "comask_r18_mfpn_shapes", "--threads", "1", "--repeats", "1",
        "--warmup", "0", "--amp", "bf16", "--opts", "schedule.ims_per_batch=1", "input.min_size_train=[64]",
    )
    (m,) = rep["models"]
    assert m["mode"] == "train" and m["amp"] == "bf16" and m["latency_s"]["median"] > 0 and m["gflops"] > 0


def test_bench_device_flags_parse() -> None:
    a = cli.build_parser().parse_args(["bench", "speed", "--device", "cuda", "--amp", "fp16"])
    assert (a.device, a.amp) == ("cuda", "fp16")
    a = cli.build_parser().parse_args(["bench", "speed"])
    assert (a.device, a.amp) == ("cpu", None)
    for bad in (["--device", "tpu"], ["--amp", "fp8"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["bench", "speed", *bad])


def test_cuda_without_a_gpu_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(UserError, match="^no CUDA device: "):
        check_device("cuda", "fp16")
    check_device("cpu", "bf16")  # CPU autocast needs no GPU
    with pytest.raises(ConfigError):
        check_device("cpu", "fp8")
    # the CLI stops before any model is built or subprocess started
    rc = cli.main(["bench", "speed", "--config", "comask_r18_mfpn_shapes", "--size", "64x96", "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("comask: error: no CUDA device: ")


def test_cuda_timing_synchronises_around_every_timed_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a sync after the run, CUDA latency would measure kernel launches only."""
    events: list[str] = []
    monkeypatch.setattr("torch.cuda.synchronize", lambda device=None: events.append("sync"))
    times = _timed(lambda: events.append("run"), repeats=3, warmup=1, device=torch.device("cuda"))
    assert len(times) == 3
    assert events == ["run"] + ["sync", "run", "sync"] * 3
    events.clear()
    _timed(lambda: events.append("run"), repeats=2, warmup=0)  # CPU: nothing to wait for
    assert events == ["run", "run"]


def test_gpu_report_has_fps_and_gpu_memory_columns() -> None:
    def model(name: str, lat: float, gpu_mb: float) -> dict:
        return {"config": name, "mode": "inference", "size": [800, 1333], "batch": 1, "threads": 4, "device": "cuda",
                "device_name": "NVIDIA H100", "amp": "fp16", "latency_s": {"median": lat, "min": lat, "max": lat},
                "cpu_s": {"median": lat, "min": lat, "max": lat}, "params": 5e7, "gflops": 300.0,
                "peak_rss_mb": 2000.0, "peak_gpu_mb": gpu_mb, "fps": 1 / lat}

    a, b = model("comask", 0.05, 1500.0), model("maskrcnn", 0.04, 1000.0)
    text = format_report({"models": [a, b], "ratio": {
        "latency": 1.25, "latency_min": 1.25, "cpu": 1.25, "peak_rss": 1.0, "gflops": 1.1, "params": 1.2,
        "peak_gpu": 1.5}})
    lines = text.splitlines()
    assert lines[0] == "device cuda (NVIDIA H100), autocast fp16"
    assert lines[2].endswith("| FPS | peak GPU (MB) |")
    assert lines[4].endswith("| 20.00 | 1500 |") and lines[5].endswith("| 25.00 | 1000 |")
    assert lines[-1].endswith("peak GPU memory 1.500x")


def test_parse_size() -> None:
    assert parse_size("800x1216") == (800, 1216)
    assert parse_size("128") == (128, 128)
    assert parse_size((64, 96)) == (64, 96) and parse_size(None) is None
    for bad in ("800x", "axb", "8x8", "1x2x3", "64by64", "9000x64"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_accuracy_table_columns_and_means() -> None:
    def row(name: str, seed: int, ap: float) -> dict:
        vals = {c: ap for c in COLUMNS}
        return {"name": name, "seed": seed, "segm": dict(vals), "bbox": {**vals, "APs": -1.0}}

    text = format_table([row("comask", 0, 0.40), row("comask", 1, 0.50), row("maskrcnn", 0, 0.30)])
    lines = text.splitlines()
    assert lines[0].startswith("| model | seeds | mask AP | mask AP50 | mask AP75 | mask APs | mask APm | mask APl | box AP")
    # 2+ seeds: mean +- sample standard deviation
    assert lines[2].split(" | ")[:4] == ["| comask", "0,1", "45.0 +- 7.1", "45.0 +- 7.1"]
    assert "| maskrcnn | 0 | 30.0 |" in lines[3]
    # COCO's -1 (no objects of that size) shows as '-', not as a negative AP
    assert lines[3].split(" | ")[11] == "-"


def test_accuracy_tables_report_val_and_the_held_out_test_split() -> None:
    def row(name: str, seed: int, val: float, test: float | None) -> dict:
        return {"name": name, "seed": seed, "segm": {c: val for c in COLUMNS}, "bbox": {c: val for c in COLUMNS},
                "test": None if test is None else {"segm": {c: test for c in COLUMNS}, "bbox": {c: test for c in COLUMNS}}}

    rows = [row("comask", 0, 0.40, 0.30), row("comask", 1, 0.40, 0.32), row("maskrcnn", 0, 0.35, 0.31)]
    text = format_tables(rows)
    val_head, test_head = text.index("val"), text.index("test")
    assert val_head < test_head and "choices are made on this split" in text and "held out" in text
    val_part, test_part = text[:test_head], text[test_head:]
    assert "| comask | 0,1 | 40.0 +- 0.0 |" in val_part and "| maskrcnn | 0 | 35.0 |" in val_part
    assert "| comask | 0,1 | 31.0 +- 1.4 |" in test_part and "| maskrcnn | 0 | 31.0 |" in test_part
    assert format_table(rows, split="test") in test_part
    # runs on a config without data.test: the val table, and a line saying there is no test split
    text = format_tables([row("comask", 0, 0.40, None)])
    assert "| comask | 0 | 40.0 |" in text and "test: none" in text and "held out" not in text


def _fake_evaluations(monkeypatch: pytest.MonkeyPatch, val: float = 0.5, test: float = 0.125) -> list:
    """evaluate_checkpoint replaced: AP `test` when pointed at the held-out split (a data.val= override), else `val`;
    the calls (weights, opts) are returned."""
    from comask.engine import evaluate

    calls = []

    def fake_eval(weights, config=None, opts=None, out_dir=None, device="auto"):
        calls.append((Path(weights), list(opts)))
        on_test = any(o.startswith("data.val=") and "test" in o for o in opts)
        metrics = {t: {c: test if on_test else val for c in COLUMNS} for t in ("segm", "bbox")}
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    monkeypatch.setattr(evaluate, "evaluate_checkpoint", fake_eval)
    return calls


def test_ablation_variants_select_rows_and_b4_reuses_the_accuracy_run(tmp_path: Path, monkeypatch) -> None:
    from comask.bench.accuracy import (
        ABLATION_MODELS,
        ACCURACY_MODELS,
        run_dir_name,
        select_models,
        train_and_evaluate,
    )

    assert [m[0] for m in select_models(ABLATION_MODELS, ["comask_B0", "comask_B4_woCL"])] == [
        "comask_B0", "comask_B4_woCL"]
    assert select_models(ABLATION_MODELS, []) == ABLATION_MODELS
    with pytest.raises(UserError, match="comask_B3"):
        select_models(ABLATION_MODELS, ["comask_B3"])
    # the B4 row trains exactly the accuracy benchmark's CoMask run ...
    b4 = next(m for m in ABLATION_MODELS if m[0] == "comask_B4")
    assert (b4[1], b4[2]) == (ACCURACY_MODELS[0][1], ACCURACY_MODELS[0][2])
    # ... so a finished "comask" run in the same --out is reused, not retrained
    run = tmp_path / "comask_seed0"
    run.mkdir()
    (run / "model_final.pth").write_bytes(b"")
    metrics = {t: {c: 0.25 for c in COLUMNS} for t in ("segm", "bbox")}
    (run / "metrics.json").write_text(json.dumps(metrics))
    from comask.config import load_config

    (run / "config.yaml").write_text(load_config(b4[1], ["runtime.seed=0", "runtime.threads=1"]).dump())
    calls = _fake_evaluations(monkeypatch)
    row = train_and_evaluate("comask_B4", b4[1], b4[2], 0, tmp_path, [])
    assert row["reused"] and row["run_dir"] == str(run) and row["segm"]["AP75"] == 0.25
    # ... and its final model is scored on the held-out test split as well (only that is evaluated)
    assert row["test"]["segm"]["AP75"] == 0.125 and len(calls) == 1 and calls[0][0] == run / "model_final.pth"
    # a finished run of an older model config in the same folder is refused, naming the folder and section
    (run / "config.yaml").write_text(load_config(b4[1], ["model.collab_head.mask_skip=false"]).dump())
    with pytest.raises(UserError, match=r"comask_seed0 holds a finished run whose 'model' config differs"):
        train_and_evaluate("comask_B4", b4[1], b4[2], 0, tmp_path, [])
    # on another config (--config), the unchanged row is that config's accuracy run, the others its own
    assert run_dir_name("comask_B4", "comask_mnv3_mfpn_shapes", []) == "comask_mnv3_mfpn_shapes"
    assert run_dir_name("comask_B0", "comask_mnv3_mfpn_shapes", ["model.msfem.branches=0"]) == (
        "comask_mnv3_mfpn_shapes-comask_B0")
    assert run_dir_name("comask_B0", b4[1], ["model.msfem.branches=0"]) == "comask_B0"


def test_shapes_pair_starts_from_the_same_pretrained_tensors() -> None:
    """The accuracy pair is a fair comparison only if both models take the same tensors from the shared
    checkpoint, and only parts both have (body, FPN laterals, RPN head): not MSFEM, FPN output convs or heads."""
    from comask.config import load_config
    from comask.engine.checkpoint import load_checkpoint, load_model_weights
    from comask.engine.train import select_prefixes
    from comask.modeling.build import build_model

    loaded = {}
    for name in ("comask_mnv3_mfpn_shapes", "maskrcnn_mnv3_fpn_shapes"):
        cfg = load_config(name)
        src = load_checkpoint(cfg.runtime.load_from)["model"]
        state = select_prefixes(src, tuple(cfg.runtime.load_only))  # as training does
        model = build_model(cfg, pretrained=False)
        report = load_model_weights(model, state, strict=False, source=name)
        # the frozen body's FrozenBatchNorm2d keeps no num_batches_tracked: the only tensors it cannot take
        assert not report["shape_mismatch"]
        assert all(k.endswith("num_batches_tracked") for k in set(state) - set(report["loaded"]))
        own = model.state_dict()
        assert all(torch.equal(own[k], state[k].to(own[k].dtype)) for k in report["loaded"])
        assert sum(k.endswith("running_var") for k in report["loaded"]) > 40  # every body BN took its statistics
        loaded[name] = set(report["loaded"])
    a, b = loaded.values()
    assert a == b
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in a} == {"backbone.body", "backbone.fpn", "rpn.head"}
    assert not any(k.startswith(("backbone.fpn.layer_blocks.", "roi_heads.")) for k in a)


def test_ablation_latency_is_measured_at_the_configs_test_size() -> None:
    from comask.bench import config_test_size
    from comask.config import load_config

    cfg = load_config("comask_mnv3_mfpn_shapes")
    assert config_test_size("comask_mnv3_mfpn_shapes", []) == (cfg.input.min_size_test, cfg.input.max_size_test)
    assert config_test_size("comask_mnv3_mfpn_shapes", ["input.min_size_test=96", "input.max_size_test=128"]) == (
        96, 128)


def test_finished_run_is_evaluated_again_when_only_the_test_settings_changed(tmp_path: Path, monkeypatch) -> None:
    from comask.bench.accuracy import ACCURACY_MODELS, train_and_evaluate
    from comask.config import load_config
    from comask.engine import evaluate

    name, config, opts = ACCURACY_MODELS[0]
    opts = opts + ["data.test=null"]  # this test is about val; the held-out split has its own below
    run = tmp_path / f"{name}_seed0"
    run.mkdir()
    (run / "model_final.pth").write_bytes(b"")
    (run / "metrics.json").write_text(json.dumps({t: {c: 0.25 for c in COLUMNS} for t in ("segm", "bbox")}))
    (run / "config.yaml").write_text(load_config(config, ["input.min_size_test=96", "model.test.score_thresh=0.5"]).dump())
    calls = []

    def fake_eval(weights, config=None, opts=None, out_dir=None, device="auto"):
        calls.append((Path(weights), list(opts)))
        metrics = {t: {c: 0.5 for c in COLUMNS} for t in ("segm", "bbox")}
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    monkeypatch.setattr(evaluate, "evaluate_checkpoint", fake_eval)
    row = train_and_evaluate(name, config, opts, 0, tmp_path, [])
    # the final model scored under the current test size and threshold, not the stale metrics.json
    assert row["reused"] and row["segm"]["AP"] == 0.5 and calls[0][0] == run / "model_final.pth"
    assert row["test"] is None  # data.test=null: no held-out split to score
    assert Path(row["eval_dir"]).parent == run
    # a second call reads that evaluation back
    assert train_and_evaluate(name, config, opts, 0, tmp_path, [])["segm"]["AP"] == 0.5 and len(calls) == 1
    # the same settings as the run: its own metrics, nothing evaluated
    (run / "config.yaml").write_text(load_config(config).dump())
    assert train_and_evaluate(name, config, opts, 0, tmp_path, [])["segm"]["AP"] == 0.25 and len(calls) == 1
    # a training-time input change is a different run, refused
    (run / "config.yaml").write_text(load_config(config, ["input.max_size_train=999"]).dump())
    with pytest.raises(UserError, match=r"'input' config differs"):
        train_and_evaluate(name, config, opts, 0, tmp_path, [])


def test_speed_rounds_alternate_the_models_and_pool_their_timings(monkeypatch: pytest.MonkeyPatch) -> None:
    import comask.bench.speed as speed

    calls = []

    def fake(spec: dict) -> dict:
        calls.append((spec["config"], spec["profile"]))
        k = len(calls)  # A runs get 1, 3, 5; B runs 2, 4, 6
        times = [float(k), float(k) + 0.5]
        return {"config": spec["config"], "mode": "inference", "times_s": times, "cpu_times_s": times,
                "latency_s": {"median": k + 0.25, "min": k, "max": k + 0.5}, "peak_rss_mb": 100.0 * k,
                "peak_gpu_mb": None, "gflops": 2.0, "params": 10, "size": [8, 8], "threads": 1,
                "cpu_s": {"median": k + 0.25}}

    monkeypatch.setattr(speed, "run_in_subprocess", fake)
    rep = speed.run_speed(["A", "B"], size=(8, 8), rounds=3, profile=5)
    assert calls == [("A", 5), ("B", 5), ("A", 0), ("B", 0), ("A", 0), ("B", 0)]
    a, b = rep["models"]
    assert a["times_s"] == [1.0, 1.5, 3.0, 3.5, 5.0, 5.5] and a["rounds"] == 3
    assert a["latency_s"] == {"median": 3.25, "min": 1.0, "max": 5.5} and a["round_medians_s"] == [1.25, 3.25, 5.25]
    assert a["peak_rss_mb"] == 500.0 and b["peak_rss_mb"] == 600.0
    assert math.isclose(rep["ratio"]["latency"], 3.25 / 4.25)
    assert "3 alternating rounds" in format_report(rep)
    with pytest.raises(UserError, match="--rounds"):
        speed.run_speed(["A"], size=(8, 8), rounds=0)
def test_parallel_runs_get_their_synthetic_set_generated_once_beforehand(monkeypatch: pytest.MonkeyPatch) -> None:
    import comask.data.synth as synth
    from comask.bench.accuracy import _generate_synth_once

    calls = []
    monkeypatch.setattr(synth, "ensure_synth", lambda preset, root: calls.append((preset, str(root))))
    work = [
        ("comask", "comask_mnv3_mfpn_shapes", [], 0),
        ("maskrcnn", "maskrcnn_mnv3_fpn_shapes", [], 0),
        ("comask", "comask_mnv3_mfpn_shapes", [], 1),
        ("coco", "comask_mnv3_mfpn_shapes", ["data.synth=null"], 0),
    ]
    _generate_synth_once(work, [])
    assert calls == [("shapes-bench", "data/shapes-bench")]


def test_runs_are_scored_on_test_and_reused_only_from_the_same_starting_weights(tmp_path: Path, monkeypatch) -> None:
    """Issue 23: every final model is scored on val and on the held-out test split; a finished run is reused only
    if runtime.load_from / load_only / load_strict and the content (sha256) of the asset: file they name match."""
    import hashlib

    from comask.bench import accuracy
    from comask.config import load_config
    from comask.engine import train as train_mod

    config = "comask_mnv3_mfpn_shapes"  # `bench accuracy --config`: starts from asset:comask_mnv3_shapes_demo.pth
    assert load_config(config).runtime.load_from == "asset:comask_mnv3_shapes_demo.pth"
    asset = tmp_path / "asset.pth"
    asset.write_bytes(b"weights v1")
    # the shipped file itself resolves (the name the configs use); this test hashes a stand-in it can change
    assert accuracy._asset_path("asset:comask_mnv3_shapes_demo.pth").is_file()
    monkeypatch.setattr(accuracy, "_asset_path", lambda name: asset)
    calls = _fake_evaluations(monkeypatch, val=0.5, test=0.125)
    out = tmp_path / "out"
    trained = []

    def fake_train(cfg, run_dir, resume=False):  # what engine.train leaves behind, without the training
        trained.append(Path(run_dir))
        metrics = {t: {c: 0.25 for c in COLUMNS} for t in ("segm", "bbox")}
        (Path(run_dir) / "config.yaml").write_text(cfg.dump())
        (Path(run_dir) / "model_final.pth").write_bytes(b"")
        (Path(run_dir) / "metrics.json").write_text(json.dumps(metrics))
        return {"stop_reason": "completed", "metrics": metrics}

    monkeypatch.setattr(train_mod, "train", fake_train)
    row = accuracy.train_and_evaluate(config, config, [], 0, out, [])
    run = out / f"{config}_seed0"
    # trained once; val from the run's own final evaluation, test from the held-out split's
    assert trained == [run] and not row["reused"] and row["segm"]["AP"] == 0.25 and row["test"]["segm"]["AP"] == 0.125
    assert len(calls) == 1 and calls[0][0] == run / "model_final.pth"
    test_override = [o for o in calls[0][1] if o.startswith("data.val=")]
    assert test_override and "annotations/test.json" in test_override[0] and "shapes-bench/test" in test_override[0]
    assert Path(row["test"]["eval_dir"]).parent == run
    record = json.loads((run / accuracy.INPUTS_FILE).read_text())
    assert record["asset_sha256"] == {"asset:comask_mnv3_shapes_demo.pth": hashlib.sha256(b"weights v1").hexdigest()}
    assert record["load_only"] == list(load_config(config).runtime.load_only) and record["load_strict"] is True

    # the same call again: reused, both evaluations read back
    row = accuracy.train_and_evaluate(config, config, [], 0, out, [])
    assert row["reused"] and row["test"]["segm"]["AP"] == 0.125 and len(calls) == 1 and len(trained) == 1

    # another asset file content: refused, naming it
    asset.write_bytes(b"weights v2")
    with pytest.raises(UserError, match=r"content of asset:comask_mnv3_shapes_demo.pth differs"):
        accuracy.train_and_evaluate(config, config, [], 0, out, [])
    asset.write_bytes(b"weights v1")
    # other load settings than the run's: refused, naming the key
    for opt, key in (("runtime.load_only=[backbone.body.]", "runtime.load_only"),
                     ("runtime.load_strict=false", "runtime.load_strict"),
                     ("runtime.load_from=null", "runtime.load_from")):
        with pytest.raises(UserError, match=rf"{key} differs"):
            accuracy.train_and_evaluate(config, config, [], 0, out, [opt])
    # a run with no record of the asset's content (trained before the check existed) is not trusted
    (run / accuracy.INPUTS_FILE).unlink()
    with pytest.raises(UserError, match=r"no record"):
        accuracy.train_and_evaluate(config, config, [], 0, out, [])
    # a partial run that started from another asset content is not resumed
    (run / "model_final.pth").unlink()
    (run / accuracy.INPUTS_FILE).write_text(json.dumps({**record, "asset_sha256": {
        "asset:comask_mnv3_shapes_demo.pth": "0" * 64}}))
    with pytest.raises(UserError, match=r"partial run whose the content of asset:"):
        accuracy.train_and_evaluate(config, config, [], 0, out, [])
    assert len(trained) == 1
    # the held-out split only changes what is scored afterwards: not a different run
    (run / accuracy.INPUTS_FILE).write_text(json.dumps(record))
    (run / "model_final.pth").write_bytes(b"")
    row = accuracy.train_and_evaluate(config, config, [], 0, out, ["data.test=null"])
    assert row["reused"] and row["test"] is None and len(trained) == 1
