"""ONNX Runtime backend for `Predictor` / `comask predict --onnx` (see comask.engine.predict).

Same call signature as the PyTorch backend: a list of float (3, H, W) tensors in [0, 1] -> per image
`{boxes, labels, scores, masks (N, 1, H, W)}` in that image's pixels, so thresholds, mask binarisation,
COCO rows and overlays are the shared code of the PyTorch path.

A graph exported with a fixed input size (HxW) gets other image sizes resized to HxW (bilinear, like
the model's own resize) and its boxes and masks mapped back; export with `--dynamic` to run every
size at its own resolution, exactly as the PyTorch model does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from comask.engine.predict import Predictor
from comask.engine.results import MASK_THRESHOLD
from comask.engine.runtime import resolve_device
from comask.errors import CheckpointError
from comask.export.common import INPUT_NAME, OUTPUT_NAMES


def _session_options(threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    # ORT logs a "VerifyOutputSizes" warning for every data-dependent output size otherwise.
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    return so


class OnnxBackend:
    """An exported CoMask / Mask R-CNN graph in an ONNX Runtime session."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        p = Path(path)
        if not p.is_file():
            raise CheckpointError(f"--onnx {p}: file not found; export one with `comask export onnx`")
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(p), _session_options(threads), providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises several private exception types for bad files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"--onnx {p}: ONNX Runtime cannot load it ({first}); re-export the model") from None
        inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        if len(inputs) != 1 or len(inputs[0].shape) != 3 or outputs[: len(OUTPUT_NAMES)] != list(OUTPUT_NAMES):
            raise CheckpointError(
                f"--onnx {p}: not a comask export (expects one (3, H, W) input and outputs "
                f"{', '.join(OUTPUT_NAMES)}); export it with `comask export onnx`"
            )
        self.path = p
        self.input_name = inputs[0].name or INPUT_NAME
        h, w = inputs[0].shape[1:]
        # Symbolic dimensions come back as strings (or None): a dynamic graph.
        self.fixed_size: tuple[int, int] | None = (h, w) if isinstance(h, int) and isinstance(w, int) else None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        self.classes: list[str] = json.loads(meta.get("comask.classes", "[]"))
        self.cat_ids: list[int] = [int(c) for c in json.loads(meta.get("comask.cat_ids", "[]"))]
        self.mask_thresh = float(meta.get("comask.mask_thresh", MASK_THRESHOLD))  # exported before the key

    def _run_one(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        img = image.detach().to("cpu", torch.float32)
        h, w = img.shape[-2:]
        resized = self.fixed_size is not None and (h, w) != self.fixed_size
        if resized:
            img = F.interpolate(img[None], size=self.fixed_size, mode="bilinear", align_corners=False)[0]
        boxes, labels, scores, masks = self.session.run(
            list(OUTPUT_NAMES), {self.input_name: np.ascontiguousarray(img.numpy())}
        )
        out = {
            "boxes": torch.from_numpy(boxes).float(),
            "labels": torch.from_numpy(labels).long(),
            "scores": torch.from_numpy(scores).float(),
            "masks": torch.from_numpy(masks).float(),
        }
        if resized:
            fh, fw = self.fixed_size
            scale = torch.tensor([w / fw, h / fh, w / fw, h / fh], dtype=torch.float32)
            out["boxes"] = out["boxes"] * scale
            if out["masks"].shape[0]:
                out["masks"] = F.interpolate(out["masks"], size=(h, w), mode="bilinear", align_corners=False)
            else:
                out["masks"] = out["masks"].new_zeros((0, 1, h, w))
        return out

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        # The graph takes one image; a batch is a loop (ORT would gain little from batching on the CPU).
        return [self._run_one(im) for im in images]


def onnx_predictor(path: str | Path, device: str = "cpu", score_thr: float = 0.5) -> Predictor:
    """A `Predictor` over an exported model, with the class names, category ids and mask threshold it was exported
    with (`comask predict --onnx`)."""
    dev = resolve_device(device)
    backend = OnnxBackend(path, device=str(dev))
    return Predictor(device=dev, score_thr=score_thr, backend=backend, classes=backend.classes,
                     cat_ids=backend.cat_ids)
