"""PyTorch vs ONNX Runtime latency of one checkpoint and its export (docs/EXPORT.md).

    python -m comask.export.latency --weights CKPT --onnx MODEL.onnx --size 192x192 --repeats 5 --threads 2

Both backends run the same image (a fixed random one at --size) through the `Predictor` backends, after
one warm-up call each; prints one JSON line with the median seconds per image.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from comask.engine.runtime import parse_size
from comask.export.common import example_image


def measure(weights: str, onnx_path: str, size: str, repeats: int = 5, threads: int | None = None) -> dict:
    from comask.engine.predict import TorchBackend, load_model
    from comask.export.ort import OnnxBackend

    if threads:
        torch.set_num_threads(threads)
    hw = parse_size(size)
    image = example_image(hw, seed=1)
    backends = {"pytorch": TorchBackend(load_model(weights).model), "onnxruntime": OnnxBackend(onnx_path, threads=threads)}
    out: dict = {"size": size, "threads": torch.get_num_threads(), "repeats": repeats}
    for name, backend in backends.items():
        backend([image])  # warm-up (allocations, ORT graph optimisation)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            dets = backend([image])[0]
            times.append(time.perf_counter() - t0)
        out[f"{name}_s"] = round(statistics.median(times), 4)
        out[f"{name}_detections"] = int(dets["boxes"].shape[0])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--onnx", required=True)
    p.add_argument("--size", required=True, help="HxW")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    print(json.dumps(measure(a.weights, a.onnx, a.size, a.repeats, a.threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
