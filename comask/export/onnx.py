"""`comask export onnx`: the whole detector, masks included, as one ONNX graph (opset 18).

Uses the TorchScript-based exporter (`dynamo=False`): the dynamo exporter cannot export the
data-dependent NMS of the detection heads. The graph maps one float
image (3, H, W) in [0, 1] to boxes, labels, scores and pasted masks (N, 1, H, W) in that image's
pixels (see `comask.export.common`); `comask predict --onnx` runs it through
`comask.export.ort.OnnxBackend`.

Input size: fixed (`--size HxW`, default the config's test size) or dynamic height/width
(`--dynamic`). A fixed-size graph runs other image sizes by resizing them to HxW first (see ort.py).
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from comask.engine.runtime import parse_size
from comask.errors import UserError
from comask.export.common import (
    INPUT_NAME,
    OUTPUT_NAMES,
    InferenceModule,
    default_size,
    example_image,
    metadata,
    onnx_friendly,
)

OPSET = 18


def _dynamic_axes(dynamic: bool) -> dict[str, dict[int, str]]:
    # The number of detections is data-dependent in every graph; image height/width only with --dynamic.
    axes: dict[str, dict[int, str]] = {name: {0: "detections"} for name in OUTPUT_NAMES}
    if dynamic:
        axes[INPUT_NAME] = {1: "height", 2: "width"}
        axes["masks"] = {0: "detections", 2: "height", 3: "width"}
    return axes


def trace_to_onnx(module: torch.nn.Module, example: torch.Tensor, path: str | Path, dynamic: bool) -> None:
    """torch.onnx.export of an `InferenceModule` (TorchScript-based exporter, opset 18)."""
    with warnings.catch_warnings():
        # Tracing warns about every Python int/bool it records as a constant (strides, branch choices that
        # only depend on the architecture) and about the legacy exporter itself; none is actionable here,
        # the outputs are checked against PyTorch instead.
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(
                module, (example,), str(path), dynamo=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_axes=_dynamic_axes(dynamic), do_constant_folding=True,
            )


def _add_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))


def _verify(module: torch.nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
    """Run the exported file in ONNX Runtime on the trace input and compare with PyTorch."""
    from comask.export.ort import OnnxBackend

    with torch.no_grad():
        ref = module(example)
    got = OnnxBackend(path)([example])[0]
    n_ref, n_got = int(ref[0].shape[0]), int(got["boxes"].shape[0])
    report: dict[str, Any] = {"detections": n_ref, "onnx_detections": n_got}
    if n_ref == n_got and n_ref:
        report["max_box_diff"] = float((ref[0] - got["boxes"]).abs().max())
        report["max_score_diff"] = float((ref[2] - got["scores"]).abs().max())
        report["max_mask_diff"] = float((ref[3] - got["masks"]).abs().max())
    return report


def export_onnx(weights: str | Path, out: str | Path, config: str | Path | None = None,
                size: str | tuple[int, int] | None = None, dynamic: bool = False, *,
                opts: list[str] | None = None, verify: bool = True, quiet: bool = False) -> dict[str, Any]:
    """Export checkpoint `weights` to `out` (.onnx). Returns {path, bytes, export_s, input, verify}.

    size: 'HxW' input size (default: the config's test size); with `dynamic`, height and width are
    dynamic and `size` is only the size traced at. verify: run ONNX Runtime once on the trace input and
    report the largest differences to PyTorch.
    """
    from comask.engine.checkpoint import create_temp_file
    from comask.engine.predict import load_model

    hw = parse_size(size)
    out = Path(out)
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as {out / 'model.onnx'}")
    lm = load_model(weights, config, opts, device="cpu")
    trace_hw = hw or default_size(lm.cfg)
    module = InferenceModule(onnx_friendly(lm.model))
    example = example_image(trace_hw)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the mode any new file gets (not mkstemp's 0600), without touching the process-wide umask
    fd, tmp = create_temp_file(out.parent, f".{out.name}.", ".tmp")
    os.close(fd)
    t0 = time.perf_counter()
    try:
        trace_to_onnx(module, example, tmp, dynamic)
        _add_metadata(tmp, metadata(lm.classes, lm.cat_ids, lm.cfg, None if dynamic else trace_hw, str(weights)))
        export_s = time.perf_counter() - t0
        check = _verify(module, example, tmp) if verify else None
        if check is not None and check["detections"] != check["onnx_detections"]:
            raise UserError(
                f"{out}: ONNX Runtime found {check['onnx_detections']} detections where PyTorch found "
                f"{check['detections']} on the trace image; the export is not faithful (please report it)"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    info = {
        "path": str(out), "bytes": out.stat().st_size, "export_s": round(export_s, 2),
        "input": "dynamic" if dynamic else f"{trace_hw[0]}x{trace_hw[1]}", "verify": check,
    }
    if not quiet:
        line = (f"exported {out} ({info['bytes'] / 2**20:.1f} MiB, input {info['input']}, opset {OPSET}) "
                f"in {export_s:.1f}s")
        if check is not None:
            line += f"; ONNX Runtime check: {check['onnx_detections']}/{check['detections']} detections"
            if "max_box_diff" in check:
                line += f", max box diff {check['max_box_diff']:.2g} px, max mask diff {check['max_mask_diff']:.2g}"
        print(line)
    return info
