"""The `comask` command: parses arguments and calls the library; nothing else lives here.

Each sub-command imports its implementation lazily so `comask --help` stays fast.
Errors that carry a user-facing message (ConfigError, DataError, CheckpointError, ...)
derive from `comask.errors.UserError` and are printed as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from comask.errors import UserError


def _cmd_data_check(a: argparse.Namespace) -> int:
    from comask.data.check import run_check

    return run_check(a.ann, a.images, as_json=a.json, deep=a.deep, allow_outside_paths=a.allow_outside_paths)


def _cmd_data_synth(a: argparse.Namespace) -> int:
    from comask.data.synth import write_dataset

    write_dataset(a.out, num_train=a.num_train, num_val=a.num_val, size=a.size, seed=a.seed, preset=a.preset,
                  num_test=a.num_test, test_seed=a.test_seed)
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    import comask.modeling.build  # noqa: F401  (registers the model's config checks: bad keys fail before the data scan)
    from comask.config import load_config
    from comask.engine.train import train

    # 130/143 when stopped by SIGINT/SIGTERM (a checkpoint was written; continue with --resume).
    return int(train(load_config(a.config, a.opts), a.out, resume=a.resume)["exit_code"])


def _cmd_eval(a: argparse.Namespace) -> int:
    from comask.engine.evaluate import evaluate_checkpoint

    evaluate_checkpoint(a.weights, config=a.config, opts=a.opts, out_dir=a.out, device=a.device,
                        batch_size=a.batch_size)
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from comask.engine.evaluate import evaluate_files

    return evaluate_files(a.gt, a.dt, iou_type=a.iou_type, as_json=a.json)


def _cmd_predict(a: argparse.Namespace) -> int:
    from comask.engine.predict import predict_paths
    from comask.export.ort import onnx_predictor

    return predict_paths(
        a.inputs, a.out, weights=a.weights, config=a.config, onnx=a.onnx, score_thr=a.score_thr,
        device=a.device, batch_size=a.batch_size, load_onnx=onnx_predictor, opts=a.opts,
    )


def _cmd_demo(a: argparse.Namespace) -> int:
    from comask.demo import run_demo

    run_demo(a.out, minutes=a.minutes, seed=a.seed, num_train=a.num_train, num_val=a.num_val,
             from_scratch=a.from_scratch)
    return 0


def _cmd_export_onnx(a: argparse.Namespace) -> int:
    from comask.export.onnx import export_onnx

    export_onnx(a.weights, a.out, config=a.config, size=a.size, dynamic=a.dynamic)
    return 0


def _cmd_export_torchscript(a: argparse.Namespace) -> int:
    from comask.export.torchscript import export_torchscript

    export_torchscript(a.weights, a.out, config=a.config, size=a.size)
    return 0


def _cmd_export_weights(a: argparse.Namespace) -> int:
    from comask.export.weights import export_weights

    export_weights(a.weights, a.out, half=a.half, config=a.config, opts=a.opts)
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    from comask.serve.app import serve

    serve(a.weights, host=a.host, port=a.port, device=a.device, opts=a.opts)
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    from comask.bench import run_bench

    return run_bench(a)


CHECKPOINT_OPTS_HELP = "overrides of the checkpoint's config, e.g. model.test.compile=reduce-overhead"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="comask", description="CoMask instance segmentation toolkit")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data set tools").add_subparsers(dest="data_command", required=True)
    c = data.add_parser("check", help="validate a COCO-format data set")
    c.add_argument("--ann", required=True, help="COCO instances JSON")
    c.add_argument("--images", required=True, help="image folder")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--deep", action="store_true", help="decode every image (slower; finds corruption mid-file)")
    c.add_argument("--allow-outside-paths", action="store_true",
                   help="file_names leaving the image folder are warnings, not errors (data.allow_outside_paths)")
    c.set_defaults(func=_cmd_data_check)
    s = data.add_parser("synth", help="write the synthetic shapes data set in COCO format")
    s.add_argument("--out", required=True)
    s.add_argument("--preset", default=None, help="named split, e.g. shapes-bench (sets the defaults below)")
    s.add_argument("--num-train", type=int, default=None)
    s.add_argument("--num-val", type=int, default=None)
    s.add_argument("--size", type=int, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--num-test", type=int, default=None, help="held-out test images (shapes-bench: 500)")
    s.add_argument("--test-seed", type=int, default=None, help="the test split's own seed (must differ from --seed)")
    s.set_defaults(func=_cmd_data_synth)

    t = sub.add_parser("train", help="train a model")
    t.add_argument("--config", required=True, help="built-in config name or YAML path")
    t.add_argument("--out", required=True, help="run directory (checkpoints, logs)")
    t.add_argument("--opts", nargs="*", default=[], help="overrides key.sub=value")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on the validation set (COCO metrics)")
    e.add_argument("--weights", required=True)
    e.add_argument("--config", default=None, help="default: the config stored in the checkpoint")
    e.add_argument("--opts", nargs="*", default=[])
    e.add_argument("--out", default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--batch-size", type=int, default=2, help="images per model call")
    e.set_defaults(func=_cmd_eval)

    v = sub.add_parser("evaluate", help="score a COCO results file against ground truth")
    v.add_argument("--gt", required=True)
    v.add_argument("--dt", required=True)
    v.add_argument("--iou-type", choices=["bbox", "segm"], default="segm")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=_cmd_evaluate)

    pr = sub.add_parser("predict", help="run a model on images or folders")
    pr.add_argument("inputs", nargs="+")
    pr.add_argument("--weights", default=None)
    pr.add_argument("--onnx", default=None, help="run an exported ONNX model in ONNX Runtime")
    pr.add_argument("--config", default=None)
    pr.add_argument("--out", required=True)
    pr.add_argument("--score-thr", type=float, default=0.5)
    pr.add_argument("--device", default="auto")
    pr.add_argument("--batch-size", type=int, default=2, help="images per model call")
    pr.add_argument("--opts", nargs="*", default=[], help=CHECKPOINT_OPTS_HELP)
    pr.set_defaults(func=_cmd_predict)

    d = sub.add_parser("demo", help="synthetic data -> train -> eval -> predict, on the CPU")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--minutes", type=float, default=15.0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--num-train", type=int, default=None,
                   help="a smaller demo set in OUT/data with this many training images (quick checks, CI)")
    d.add_argument("--num-val", type=int, default=None, help="validation images of that smaller set")
    d.add_argument("--from-scratch", action="store_true",
                   help="train the ResNet-18 demo model from random weights instead of fine-tuning the shipped "
                        "checkpoint (for comparison; far lower AP in the same minutes)")
    d.set_defaults(func=_cmd_demo)

    ex = sub.add_parser("export", help="export a model").add_subparsers(dest="export_format", required=True)
    o = ex.add_parser("onnx", help="ONNX (TorchScript-based exporter, opset 18), masks included")
    o.add_argument("--weights", required=True)
    o.add_argument("--config", default=None)
    o.add_argument("--out", required=True)
    o.add_argument("--size", default=None, help="HxW input size (default: the config's test size)")
    o.add_argument("--dynamic", action="store_true", help="dynamic input height/width")
    o.set_defaults(func=_cmd_export_onnx)
    ts = ex.add_parser("torchscript", help="TorchScript (torch.jit.trace), masks included")
    ts.add_argument("--weights", required=True)
    ts.add_argument("--config", default=None)
    ts.add_argument("--out", required=True)
    ts.add_argument("--size", default=None, help="HxW size to trace at (default: the config's test size)")
    ts.set_defaults(func=_cmd_export_torchscript)
    w = ex.add_parser("weights", help="slim weights-only checkpoint (model, config, class names; no optimizer)")
    w.add_argument("--weights", required=True, help="a training checkpoint (.pth)")
    w.add_argument("--out", required=True)
    w.add_argument("--half", action="store_true", help="store floating-point tensors as float16 (half the size)")
    w.add_argument("--config", default=None, help="config to store (default: the one in the checkpoint)")
    w.add_argument("--opts", nargs="*", default=[], help="overrides key.sub=value applied to that config")
    w.set_defaults(func=_cmd_export_weights)

    sv = sub.add_parser("serve", help="HTTP inference service with a web page")
    sv.add_argument("--weights", required=True)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--device", default="auto")
    sv.add_argument("--opts", nargs="*", default=[], help=CHECKPOINT_OPTS_HELP)
    sv.set_defaults(func=_cmd_serve)

    b = sub.add_parser("bench", help="speed / accuracy / ablation / roi-align benchmarks")
    b.add_argument("kind", choices=["speed", "accuracy", "ablation", "roi-align"])
    b.add_argument("--config", default=None)
    b.add_argument("--compare", default=None)
    b.add_argument("--weights", default=None)
    b.add_argument("--size", default="800x1216")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--seeds", type=int, nargs="*", default=[0])
    b.add_argument("--out", default="runs/bench")
    b.add_argument("--opts", nargs="*", default=[])
    b.add_argument("--compare-opts", nargs="*", default=[],
                   help="speed: options for the --compare model only, e.g. --compare CONFIG --compare-opts "
                        "model.test.fold_bn=false (one config against itself; torch.compile: model.test.compile=default)")
    b.add_argument("--json", action="store_true")
    b.add_argument("--train", action="store_true", help="speed: time a training step instead of inference")
    b.add_argument("--warmup", type=int, default=1, help="speed: untimed runs before the repeats")
    b.add_argument("--rounds", type=int, default=1,
                   help="speed: alternate A and B this many times, a fresh process each, and pool the timings")
    b.add_argument("--profile", type=int, default=0, help="speed: also list the N slowest operators")
    b.add_argument("--batches", type=int, nargs="+", default=None,
                   help="speed: also report images/s at these batch sizes (default: 1 8 on cuda, 1 on cpu)")
    b.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="speed: run the model on this device (cuda: synchronised timing, peak GPU memory)")
    b.add_argument("--amp", choices=["bf16", "fp16"], default=None,
                   help="speed: run the forward under torch.autocast with this dtype (default: float32)")
    b.add_argument("--no-train", action="store_true", help="ablation: latency table only, no training")
    b.add_argument("--variants", nargs="*", default=[],
                   help="accuracy/ablation: only these rows, e.g. comask_B0 comask_B4_woCL (default: all)")
    b.add_argument("--jobs", type=int, default=1, help="accuracy/ablation: training runs at once (1 thread each)")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"comask: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("comask: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
