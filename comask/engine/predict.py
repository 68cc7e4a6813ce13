"""Inference on images: the `Predictor` API and `comask predict` (overlays + one COCO-style JSON).

The model sits behind a *backend*: any callable taking a list of float (3, H, W) tensors in [0, 1] and
returning torchvision-style outputs (`boxes`, `labels`, `scores`, `masks` (N, 1, H, W)) in the input
images' pixels. `TorchBackend` wraps an `nn.Module`; the ONNX Runtime backend (`comask.export.ort.OnnxBackend`)
has the same call signature and is passed in by the caller (`Predictor(backend=...)`, `predict_paths(load_onnx=...)`).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from comask.engine.results import MASK_THRESHOLD, binarize_masks, coco_rows, to_numpy
from comask.engine.runtime import check_output_dir, resolve_device
from comask.errors import DataError, UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
# Names Windows refuses as file names whatever the extension; prefixing keeps outputs portable.
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_MAX_NAME = 100

Backend = Callable[[list[torch.Tensor]], list[dict]]
ImageLike = str | Path | Image.Image | np.ndarray


class ImageSizeError(DataError, ValueError):
    """An image the model's test-time resize cannot handle (a side would shrink to 0 pixels).

    A ValueError too, so `comask predict` reports and skips the image like any image the model fails on.
    """


def resize_problem(model: Any, height: int, width: int) -> str | None:
    """Why `model`'s test-time resize cannot take a height x width image, or None when it can (or when
    the model has no torchvision GeneralizedRCNNTransform to ask, e.g. an ONNX backend).

    torchvision's resize makes the shorter side min_size unless the longer side would exceed max_size,
    then floors the sizes: a 2x300 strip at max_size 64 becomes 0 px high and interpolate crashes.
    """
    t = getattr(model, "transform", None)
    min_size, max_size = getattr(t, "min_size", None), getattr(t, "max_size", None)
    if min_size is None or max_size is None:
        return None
    short_target = float(min_size[-1] if isinstance(min_size, (tuple, list)) else min_size)
    # the same scale and floor as torchvision's _resize_image_and_masks in eval mode
    scale = min(short_target / min(height, width), float(max_size) / max(height, width))
    if int(min(height, width) * scale) >= 1:
        return None
    return (f"image of {width}x{height} pixels is too thin for the model's resize (shorter side {short_target:g}, "
            f"longer side at most {float(max_size):g} makes its shorter side 0 px); crop or pad it to an aspect "
            f"ratio below {float(max_size):g}:1")


def _check_resizable(backend: Any, arrays: Sequence[np.ndarray]) -> None:
    """Refuse, with a clear message, images the model's resize would shrink to 0 px."""
    for a in arrays:
        why = resize_problem(getattr(backend, "model", None), *a.shape[:2])
        if why:
            raise ImageSizeError(why)


class TorchBackend:
    """A PyTorch detection model in eval mode on one device.

    With a model that has comask's `predict(images, score_thr=, max_det=, mask_thr=)` (both of comask's
    detectors), detections are trimmed on the device before their masks are pasted, as bool masks: memory
    per image grows with the detections kept, not with the RoI heads' 100 (100 float masks of a
    36-megapixel image are 14 GB). Any other torchvision-style model runs through its forward.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @property
    def trims(self) -> bool:
        """Whether `__call__` applies score_thr / max_det / mask_thr itself (before pasting)."""
        return callable(getattr(self.model, "predict", None))

    @torch.inference_mode()
    def __call__(self, images: list[torch.Tensor], *, score_thr: float = 0.0, max_det: int | None = None,
                 mask_thr: float | None = None) -> list[dict]:
        images = [im.to(self.device) for im in images]
        if self.trims:
            outs = self.model.predict(images, score_thr=score_thr, max_det=max_det, mask_thr=mask_thr)
        else:
            outs = self.model(images)
        return [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in o.items()} for o in outs]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    cfg: Any
    classes: list[str]
    cat_ids: list[int]
    from_meta: bool  # False: names/ids were made up (class_i, 1..C) because the checkpoint has no meta


def load_model(weights: str | Path, config: str | Path | None = None, opts: list[str] | None = None,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Checkpoint (+ optional config override) -> model on device in eval mode, config, classes, cat ids."""
    from comask.engine.checkpoint import checkpoint_config, load_checkpoint, load_model_weights
    from comask.errors import CheckpointError
    from comask.modeling.build import build_model
    from comask.modeling.fold_bn import fold_for_inference

    ckpt = load_checkpoint(weights, map_location="cpu")
    cfg = checkpoint_config(ckpt, weights, config, opts)
    # pretrained=False: the checkpoint replaces every tensor, and the files named by model.backbone.weights /
    # model.init_from need not exist where a trained model is used
    model = build_model(cfg, pretrained=False)
    load_model_weights(model, ckpt["model"], strict=True, source=str(weights))
    fold_for_inference(model, cfg)  # an inference model: the norms become part of the convs' weights
    meta = ckpt.get("meta") or {}
    n = int(cfg.model.num_classes)
    classes = [str(c) for c in meta.get("classes") or [f"class_{i}" for i in range(1, n + 1)]]
    cat_ids = [int(c) for c in meta.get("cat_ids") or range(1, len(classes) + 1)]
    if len(classes) != len(cat_ids):
        raise CheckpointError(f"{weights}: meta has {len(classes)} class names but {len(cat_ids)} category ids")
    return LoadedModel(model.to(device).eval(), cfg, classes, cat_ids, bool(meta.get("cat_ids")))


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """A path, PIL image or array -> (H, W, 3) uint8 RGB (paths go through the safe reader)."""
    if isinstance(image, (str, Path)):
        from comask.data.images import read_image

        return read_image(image)
    if isinstance(image, Image.Image):
        img = ImageOps.exif_transpose(image)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"image array must be HxW, HxWx3 or HxWx4, got shape {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(f"image array must be uint8 (0..255), got {a.dtype}")
    return np.ascontiguousarray(a[:, :, :3])


class Predictor:
    """`Predictor(weights)(image) -> Instances` (a dict of numpy arrays; see docs/DESIGN.md)."""

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu",
                 score_thr: float = 0.5, config: str | Path | None = None, *,
                 backend: Backend | None = None, classes: Sequence[str] | None = None,
                 cat_ids: Sequence[int] | None = None, mask_thr: float | None = None,
                 opts: Sequence[str] | None = None):
        from comask.modeling.static_compile import compile_for_inference

        self.device = resolve_device(device)
        self.score_thr = float(score_thr)
        self.cfg = None
        if backend is None:
            if weights is not None:
                # opts: config overrides (key.sub=value), e.g. model.test.compile=reduce-overhead
                lm = load_model(weights, config, list(opts or []), device=self.device)
                self.cfg, classes, cat_ids = lm.cfg, lm.classes, lm.cat_ids
                compile_for_inference(lm.model, lm.cfg)
                backend = TorchBackend(lm.model, self.device)
            else:
                raise UserError("Predictor needs weights (a .pth checkpoint) or a backend "
                                "(comask.export.ort.onnx_predictor for an exported model)")
        if not classes:
            raise UserError("Predictor: class names unknown (give classes=...)")
        self.backend = backend
        # unless given: the checkpoint's model.test.mask_thresh, or the one an ONNX file was exported with
        if mask_thr is None:
            mask_thr = (float(self.cfg.model.test.mask_thresh) if self.cfg is not None
                        else float(getattr(backend, "mask_thresh", MASK_THRESHOLD)))
        self.mask_thr = float(mask_thr)
        self.classes = [str(c) for c in classes]
        self.cat_ids = [int(c) for c in (cat_ids or range(1, len(self.classes) + 1))]

    @classmethod
    def from_model(cls, model: torch.nn.Module, classes: Sequence[str], cat_ids: Sequence[int] | None = None,
                   device: str | torch.device = "cpu", score_thr: float = 0.5,
                   mask_thr: float = MASK_THRESHOLD) -> Predictor:
        """Wrap an already built model (e.g. right after training)."""
        dev = resolve_device(device)
        return cls(device=dev, score_thr=score_thr, backend=TorchBackend(model, dev), classes=classes,
                   cat_ids=cat_ids, mask_thr=mask_thr)

    # the server passes each request's score_thr / max_det to the calls below
    trims_before_paste = True

    def __call__(self, image: ImageLike, *, score_thr: float | None = None,
                 max_det: int | None = None) -> dict[str, Any]:
        return self.predict_batch([image], score_thr=score_thr, max_det=max_det)[0]

    def predict_batch(self, images: Sequence[ImageLike], *, score_thr: float | None = None,
                      max_det: int | None = None) -> list[dict[str, Any]]:
        """Instances of each image (one model call for all): those scoring >= score_thr (default: the
        predictor's), at most `max_det` of them (best first)."""
        arrays = [to_rgb_array(im) for im in images]
        return self._run(arrays, score_thr=score_thr, max_det=max_det)

    def _run(self, arrays: Sequence[np.ndarray], *, score_thr: float | None = None,
             max_det: int | None = None) -> list[dict[str, Any]]:
        if not arrays:
            return []
        thr = self.score_thr if score_thr is None else float(score_thr)
        _check_resizable(self.backend, arrays)
        # PIL-backed arrays are read-only; torch wants writable memory even though it only reads here
        tensors = [torch.from_numpy(a if a.flags.writeable else a.copy()).permute(2, 0, 1).float().div_(255.0)
                   for a in arrays]
        if getattr(self.backend, "trims", False):
            outputs = self.backend(tensors, score_thr=thr, max_det=max_det, mask_thr=self.mask_thr)
        else:
            outputs = self.backend(tensors)
        del tensors
        return [self._instances(o, a.shape[:2], thr, max_det) for o, a in zip(outputs, arrays)]

    def _instances(self, out: dict, hw: tuple[int, int], score_thr: float, max_det: int | None) -> dict[str, Any]:
        scores = np.asarray(out["scores"].detach().cpu() if isinstance(out["scores"], torch.Tensor) else out["scores"],
                            dtype=np.float32).reshape(-1)
        keep = np.nonzero(scores >= score_thr)[0]
        if max_det is not None:
            keep = keep[np.argsort(-scores[keep], kind="stable")][:max_det]
        boxes = to_numpy(out["boxes"]).astype(np.float32).reshape(-1, 4)[keep]
        labels = to_numpy(out["labels"]).astype(np.int64).reshape(-1)[keep]
        if len(labels) and (labels.min() < 1 or labels.max() > len(self.classes)):
            raise UserError(f"model predicted label {int(labels.max())} but knows {len(self.classes)} classes; "
                            "the checkpoint's meta does not match its model")
        if "masks" in out and len(keep):
            m = out["masks"]
            if not np.array_equal(keep, np.arange(len(m))):  # a full-image copy per mask only when trimming here
                m = m[torch.from_numpy(keep)] if isinstance(m, torch.Tensor) else np.asarray(m)[keep]
            masks = binarize_masks(m, hw, self.mask_thr)
        else:
            masks = np.zeros((len(keep), *hw), dtype=bool)
        return {
            "boxes": boxes,
            "scores": scores[keep],
            "labels": labels,
            "category_ids": np.array([self.cat_ids[i - 1] for i in labels], dtype=np.int64),
            "class_names": [self.classes[i - 1] for i in labels],
            "masks": masks,
        }


def instances_to_rows(inst: dict[str, Any], image_id: int, extra: dict[str, Any] | None = None) -> list[dict]:
    """Predictor instances -> COCO results rows (RLE masks, `category_name`), `extra` merged into each row."""
    return coco_rows(inst["boxes"], inst["scores"], inst["category_ids"], inst["masks"], image_id=image_id,
                     fields={"category_name": inst["class_names"]}, extra=extra)


# ---------------------------------------------------------------------------------------------------
# comask predict
# ---------------------------------------------------------------------------------------------------


def safe_stem(path: str | Path) -> str:
    """A file-name stem that cannot name another directory: word characters, '.', '-' only."""
    stem = Path(str(path)).stem if Path(str(path)).suffix.lower() in IMAGE_EXTENSIONS else Path(str(path)).name
    s = re.sub(r"[^\w.-]+", "_", stem).strip("._-")[:_MAX_NAME] or "image"
    if s.split(".")[0].upper() in _RESERVED:
        s = "_" + s
    return s


class OutputNames:
    """Unique, sanitised output names; a repeated stem gets `_2`, `_3`, ... (case-insensitively unique)."""

    def __init__(self) -> None:
        self._used: set[str] = set()

    def take(self, path: str | Path) -> str:
        base = safe_stem(path)
        name, k = base, 1
        while name.lower() in self._used:
            k += 1
            name = f"{base}_{k}"
        self._used.add(name.lower())
        return name


def collect_inputs(inputs: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]], int]:
    """Files and folders -> (image paths in order, [(input, problem)], count of ignored non-image files).

    Folders contribute their image-extension files, sorted; a file named explicitly is always tried.
    """
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    ignored = 0
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            entries = sorted(q for q in p.iterdir() if q.is_file())
            imgs = [q for q in entries if q.suffix.lower() in IMAGE_EXTENSIONS]
            ignored += len(entries) - len(imgs)
            files.extend(imgs)
        elif p.exists():
            files.append(p)
        else:
            problems.append((str(inp), "no such file or folder"))
    return files, problems, ignored


class _JsonListWriter:
    """Streams rows into a JSON list file (temp file + rename) so nothing accumulates in memory."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.f = open(self.tmp, "w")
        self.f.write("[")
        self.n = 0

    def write(self, rows: Iterable[dict]) -> None:
        for r in rows:
            self.f.write(("\n" if self.n == 0 else ",\n") + json.dumps(r))
            self.n += 1

    def close(self) -> None:
        self.f.write("\n]\n")
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def _read_batches(files: Sequence[Path], batch_size: int,
                  on_bad: Callable[[Path, str], None]) -> Iterator[list[tuple[Path, np.ndarray]]]:
    from comask.data.images import read_image

    batch: list[tuple[Path, np.ndarray]] = []
    for f in files:
        try:
            batch.append((f, read_image(f)))
        except UserError as e:
            on_bad(f, str(e))
            continue
        except (OSError, ValueError, MemoryError) as e:
            on_bad(f, f"{f}: cannot read image ({type(e).__name__}: {e})")
            continue
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _run_isolated(predictor: Predictor, batch: list[tuple[Path, np.ndarray]],
                  on_bad: Callable[[Path, str], None]) -> list[tuple[tuple[Path, np.ndarray], dict]]:
    """Run a batch; if the model fails on it, retry image by image so one odd image (e.g. a 2x300 strip
    the model's resize cannot handle) is reported and skipped instead of ending the run."""
    try:
        return list(zip(batch, predictor._run([a for _, a in batch])))
    except (RuntimeError, ValueError) as e:
        if len(batch) == 1:
            path, arr = batch[0]
            on_bad(path, f"model failed on this {arr.shape[1]}x{arr.shape[0]} image ({str(e).splitlines()[0]})")
            return []
    return [r for item in batch for r in _run_isolated(predictor, [item], on_bad)]


def predict_paths(inputs: Sequence[str | Path], out: str | Path, weights: str | Path | None = None,
                  config: str | Path | None = None, onnx: str | Path | None = None, score_thr: float = 0.5,
                  device: str = "auto", batch_size: int = 2, *, predictor: Predictor | None = None,
                  draw: bool = True, load_onnx: Callable[..., Predictor] | None = None,
                  opts: Sequence[str] | None = None) -> int:
    """`comask predict`: overlays OUT/<name>.png and OUT/predictions.json; 0 if every input was used, else 1.
    `onnx` is read by `load_onnx(onnx, device=, score_thr=)` (the CLI passes `comask.export.ort.onnx_predictor`)."""
    from comask.engine.visualize import draw_instances

    # before loading the model: an unusable --out should cost nothing (no free-space floor here)
    check_output_dir(out, 0)
    if predictor is None:
        if weights is None and onnx is None:
            raise UserError("give --weights CKPT (a .pth checkpoint) or --onnx MODEL")
        if weights is not None and onnx is not None:
            raise UserError("give either --weights or --onnx, not both")
        if onnx is not None:
            if opts:
                raise UserError("--opts applies to a .pth checkpoint's config; an ONNX model is fixed at export")
            if load_onnx is None:
                raise UserError(f"{onnx}: no ONNX backend given; use --weights with a .pth checkpoint")
            predictor = load_onnx(onnx, device=device, score_thr=score_thr)
        else:
            predictor = Predictor(weights, device=device, score_thr=score_thr, config=config, opts=opts)
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    files, problems, ignored = collect_inputs(inputs)
    for inp, why in problems:
        print(f"comask: skipped {inp}: {why}", file=sys.stderr)
    if not files and not problems:
        raise UserError(f"no images found in {', '.join(map(str, inputs))} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = out_dir.resolve()
    bad = len(problems)

    def on_bad(path: Path, msg: str) -> None:
        nonlocal bad
        bad += 1
        print(f"comask: skipped {path}: {msg.removeprefix(str(path) + ': ')}", file=sys.stderr)

    names = OutputNames()
    writer = _JsonListWriter(out_dir / "predictions.json")
    done = n_inst = 0
    t0 = time.perf_counter()
    try:
        for batch in _read_batches(files, batch_size, on_bad):
            for (path, arr), inst in _run_isolated(predictor, batch, on_bad):
                done += 1
                name = names.take(path)
                writer.write(instances_to_rows(inst, done, {"file_name": str(path)}))
                n_inst += len(inst["scores"])
                if draw:
                    target = (out_dir / f"{name}.png").resolve()
                    if target.parent != root:  # unreachable after safe_stem; a guard, not a filter
                        raise UserError(f"{path}: output name {name!r} would leave {out_dir}")
                    Image.fromarray(draw_instances(arr, inst, predictor.classes)).save(target)
    except OSError as e:
        writer.abort()
        raise UserError(f"{out_dir}: cannot write outputs ({e.strerror or e}); free disk space or choose "
                        "another --out") from None
    except BaseException:
        writer.abort()
        raise
    writer.close()
    dt = time.perf_counter() - t0
    msg = (f"predicted {done} image(s), {n_inst} instance(s) in {dt:.1f}s ({done / max(dt, 1e-9):.2f} img/s at "
           f"batch size {batch_size}) -> {out_dir}/ (predictions.json")
    msg += ", overlays)" if draw else ")"
    if bad:
        msg += f"; skipped {bad} bad input(s)"
    if ignored:
        msg += f"; ignored {ignored} non-image file(s)"
    print(msg)
    return 0 if bad == 0 else 1
