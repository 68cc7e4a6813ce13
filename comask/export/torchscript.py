"""TorchScript export by tracing (`torch.jit.trace`) of the same module the ONNX exporter traces.

Tracing works at the traced input size: the traced module reproduces the eager model there (tested).
At other sizes it is not reliable: torchvision's transform and box clipping turn image sizes into
constants under plain tracing (`torch.tensor(size)`), which the ONNX exporter, unlike `torch.jit.trace`,
keeps dynamic; so one traced file serves one input size (resize or pad inputs to it), and the ONNX
export with `--dynamic` is the way to serve mixed sizes. `torch.jit.script` does not work: the model code uses Python constructs TorchScript's compiler
rejects (generic `OrderedDict[...]` annotations, generator expressions, dicts of modules indexed by
strings), and making every module scriptable would constrain the code for no gain over tracing.
See docs/EXPORT.md.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch

from comask.engine.runtime import parse_size
from comask.export.common import InferenceModule, default_size, example_image


def export_torchscript(weights: str | Path, out: str | Path, config: str | Path | None = None,
                       size: str | tuple[int, int] | None = None, *, opts: list[str] | None = None,
                       quiet: bool = False) -> dict[str, Any]:
    """Trace checkpoint `weights` into a TorchScript file `out` (load it with `torch.jit.load`).

    The file takes one float (3, H, W) image in [0, 1] and returns (boxes, labels, scores, masks), as the
    ONNX graph does. `size` is the size traced at (default: the config's test size).
    """
    import json

    from comask.engine.predict import load_model

    lm = load_model(weights, config, opts, device="cpu")
    hw = parse_size(size) or default_size(lm.cfg)
    module = InferenceModule(lm.model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on architecture constants; outputs are checked instead
        with torch.no_grad():
            traced = torch.jit.trace(module, (example_image(hw),), check_trace=False)
        extra = {"comask.json": json.dumps({"classes": lm.classes, "cat_ids": lm.cat_ids})}
        torch.jit.save(traced, str(out), _extra_files=extra)
    info = {"path": str(out), "bytes": out.stat().st_size, "export_s": round(time.perf_counter() - t0, 2),
            "traced_at": f"{hw[0]}x{hw[1]}"}
    if not quiet:
        print(f"traced {out} ({info['bytes'] / 2**20:.1f} MiB, traced at {info['traced_at']}) in {info['export_s']:.1f}s")
    return info


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """A traced file and its metadata ({classes, cat_ids})."""
    import json

    extra = {"comask.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra["comask.json"] or "{}")
