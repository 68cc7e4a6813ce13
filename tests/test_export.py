"""ONNX export + ONNX Runtime inference, and TorchScript tracing, on a small TRAINED CoMask.

The model is trained here with `comask.engine.train.train` for a few iterations on synthetic images so
that its scores and masks are those of a fitted model (sharp, not all ~0.5), then:
- `comask predict --onnx` must give the detections of `comask predict --weights`: same count and classes,
  boxes within 0.5 px, scores within 1e-3, mask IoU >= 0.98 per instance, on images of two sizes
  (dynamic export) and the same output files;
- a fixed-size export (`--size`) has a fixed input, and images with zero detections work on both paths;
- a traced TorchScript file reproduces the eager model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from comask.cli import main
from comask.engine.checkpoint import load_checkpoint, save_checkpoint
from comask.engine.runtime import parse_size
from comask.errors import CheckpointError, UserError
from comask.export.ort import OnnxBackend, onnx_predictor

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import write_tiny_coco  # noqa: E402

SIZE = 64
TINY_SIZES = [f"input.min_size_train=[{SIZE}]", f"input.max_size_train={SIZE}",
              f"input.min_size_test={SIZE}", f"input.max_size_test={SIZE}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_config) -> dict:
    from comask.engine.train import train

    root = tmp_path_factory.mktemp("export")
    data = write_tiny_coco(root / "data", num_train=8, num_val=3, size=SIZE)
    cfg = tiny_config("comask", 2, "model.collab_head.num_convs=2", *TINY_SIZES,
        f"data.train={{ann: {data}/annotations/train.json, images: {data}/train}}",
        f"data.val={{ann: {data}/annotations/val.json, images: {data}/val}}",
        "data.num_workers=0", "schedule.ims_per_batch=2", "schedule.base_batch=2", "schedule.base_lr=0.005",
        "schedule.max_iter=16", "schedule.steps=[1000]", "schedule.warmup_iters=4", "schedule.warmup_factor=0.1",
        # no gradient clip: the 16 iterations must leave a model that detects something at the default threshold
        "schedule.clip_grad_norm=null", "runtime.threads=1", "runtime.checkpoint_period=1000", "runtime.final_eval=false",
        "runtime.tensorboard=false", "runtime.progress=false", "runtime.min_free_mb=1",
    )
    res = train(cfg, root / "run")
    ckpt = Path(res["final"])
    # Inputs: the validation images and a resized copy of each (another size for the dynamic graph).
    inputs = root / "inputs"
    inputs.mkdir()
    vals = sorted((data / "val").glob("*.png"))
    for p in vals:
        Image.open(p).save(inputs / p.name)
        Image.open(p).resize((88, 56), Image.BILINEAR).save(inputs / f"wide_{p.name}")
    return {"root": root, "ckpt": ckpt, "inputs": inputs}


def _rows_by_file(path: Path) -> dict[str, list[dict]]:
    rows = json.loads(path.read_text())
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(Path(r["file_name"]).name, []).append(r)
    return out


def _assert_same_detections(ref_json: Path, onnx_json: Path) -> int:
    ref, got = _rows_by_file(ref_json), _rows_by_file(onnx_json)
    assert ref.keys() == got.keys()
    n = 0
    for name in ref:
        a, b = ref[name], got[name]
        assert len(a) == len(b), name
        free = list(b)
        for ra in a:
            # pair by class and nearest box (near-equal scores may be listed in either order)
            rb = min((r for r in free if r["category_id"] == ra["category_id"]),
                     key=lambda r: float(np.abs(np.subtract(r["bbox"], ra["bbox"])).max()))
            free.remove(rb)
            assert ra["category_id"] == rb["category_id"] and ra["category_name"] == rb["category_name"]
            assert np.allclose(ra["bbox"], rb["bbox"], atol=0.5 + 0.01), (name, ra["bbox"], rb["bbox"])
            assert abs(ra["score"] - rb["score"]) <= 1e-3 + 1e-5
            ma, mb = mask_utils.decode(ra["segmentation"]), mask_utils.decode(rb["segmentation"])
            union = np.logical_or(ma, mb).sum()
            iou = np.logical_and(ma, mb).sum() / union if union else 1.0
            assert iou >= 0.98, (name, iou)
            n += 1
    return n


def test_onnx_runtime_gives_the_pytorch_detections(trained, tmp_path, capsys):
    model_path = tmp_path / "model.onnx"
    assert main(["export", "onnx", "--weights", str(trained["ckpt"]), "--out", str(model_path), "--dynamic"]) == 0
    assert "ONNX Runtime check" in capsys.readouterr().out
    graph = onnx.load(str(model_path))
    onnx.checker.check_model(graph)
    assert [o.name for o in graph.graph.output] == ["boxes", "labels", "scores", "masks"]
    assert graph.opset_import[0].version == 18
    dims = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == 3 and all(isinstance(d, str) for d in dims[1:])  # dynamic height and width

    common = [str(trained["inputs"]), "--score-thr", "0.05", "--device", "cpu"]
    assert main(["predict", *common, "--weights", str(trained["ckpt"]), "--out", str(tmp_path / "pt")]) == 0
    assert main(["predict", *common, "--onnx", str(model_path), "--out", str(tmp_path / "ort")]) == 0
    n = _assert_same_detections(tmp_path / "pt" / "predictions.json", tmp_path / "ort" / "predictions.json")
    assert n >= 3, "the trained model should detect something on its own validation images"
    sizes = {Image.open(r["file_name"]).size for r in json.loads((tmp_path / "pt" / "predictions.json").read_text())}
    assert len(sizes) >= 2, f"detections on images of one size only ({sizes}): the dynamic graph is untested"
    names = sorted(p.name for p in (tmp_path / "pt").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ort").iterdir())
    assert "wide_000001.png" in names
    meta = load_checkpoint(trained["ckpt"])["meta"]
    assert OnnxBackend(model_path).classes == meta["classes"]


def test_fixed_size_export_and_images_without_detections(trained, tmp_path):
    # The same weights with a test score threshold no class probability can pass: zero detections.
    ckpt = load_checkpoint(trained["ckpt"])
    ckpt["config"]["model"]["test"]["score_thresh"] = 1.0
    ckpt["config"]["model"]["test"]["mask_thresh"] = 0.35
    none_ckpt = save_checkpoint(ckpt, tmp_path / "none.pth")
    model_path = tmp_path / "fixed.onnx"
    assert main(["export", "onnx", "--weights", str(none_ckpt), "--out", str(model_path),
                 "--size", f"{SIZE}x{SIZE}"]) == 0
    backend = OnnxBackend(model_path)
    assert backend.fixed_size == (SIZE, SIZE) and backend.metadata["comask.input"] == f"{SIZE}x{SIZE}"
    assert backend.mask_thresh == 0.35 and onnx_predictor(model_path).mask_thr == 0.35  # the config's, carried

    img = torch.rand(3, SIZE, SIZE)
    other = torch.rand(3, 40, 72)  # resized to the fixed input and mapped back
    for x in (img, other):
        out = backend([x])[0]
        h, w = x.shape[-2:]
        assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,) and out["labels"].shape == (0,)
        assert out["masks"].shape == (0, 1, h, w)
    for flag, value in (("--weights", none_ckpt), ("--onnx", model_path)):
        out_dir = tmp_path / flag.strip("-")
        assert main(["predict", str(trained["inputs"]), flag, str(value), "--out", str(out_dir),
                     "--score-thr", "0", "--device", "cpu"]) == 0
        assert json.loads((out_dir / "predictions.json").read_text()) == []
        assert len(list(out_dir.glob("*.png"))) == len(list(trained["inputs"].glob("*.png")))


def test_fixed_size_graph_resizes_other_images(trained, tmp_path):
    model_path = tmp_path / "fixed.onnx"
    from comask.export.onnx import export_onnx

    info = export_onnx(trained["ckpt"], model_path, size=(SIZE, SIZE), verify=False, quiet=True)
    assert info["input"] == f"{SIZE}x{SIZE}" and info["bytes"] == model_path.stat().st_size
    backend = OnnxBackend(model_path)
    def load(p: Path, side: int) -> torch.Tensor:
        im = Image.open(p).convert("RGB").resize((side, side), Image.BILINEAR)
        return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255

    files = sorted(trained["inputs"].glob("*.png"))
    # the image with the most detections at the graph's own size
    x, same = max(((im, backend([im])[0]) for p in files for im in [load(p, SIZE)]),
                  key=lambda t: len(t[1]["boxes"]))
    # Pixels doubled: the backend's bilinear 2x shrink gives back exactly `x`, so the graph sees the same
    # input and the detections must come back scaled by 2.
    big = x.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    scaled = backend([big])[0]
    assert len(same["boxes"]) > 0 and len(scaled["boxes"]) == len(same["boxes"])
    assert torch.allclose(scaled["boxes"], 2 * same["boxes"], atol=1e-3)
    assert torch.equal(scaled["scores"], same["scores"]) and torch.equal(scaled["labels"], same["labels"])
    assert scaled["masks"].shape == (len(same["boxes"]), 1, 2 * SIZE, 2 * SIZE)


def test_torchscript_trace_matches_eager_at_its_size(trained, tmp_path):
    from comask.engine.predict import load_model
    from comask.export.common import InferenceModule
    from comask.export.torchscript import load_torchscript

    # the input image the model detects most in, at its own size (plain tracing is exact at the traced size)
    eager = InferenceModule(load_model(trained["ckpt"]).model)
    images = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255
              for p in sorted(trained["inputs"].glob("*.png"))]
    with torch.no_grad():
        x, ref = max(((im, eager(im)) for im in images), key=lambda t: len(t[1][0]))
    assert len(ref[0]) > 0
    h, w = x.shape[-2:]
    out = tmp_path / "model.ts"
    assert main(["export", "torchscript", "--weights", str(trained["ckpt"]), "--out", str(out),
                 "--size", f"{h}x{w}"]) == 0
    traced, meta = load_torchscript(out)
    assert meta["classes"] == load_checkpoint(trained["ckpt"])["meta"]["classes"]
    with torch.no_grad():
        got = traced(x)
    for a, b in zip(ref, got):
        assert a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-4)


def test_user_errors(tmp_path, trained):
    with pytest.raises(UserError, match="HxW"):
        parse_size("64by64")
    with pytest.raises(UserError, match="16..8192"):
        parse_size("8x8")
    with pytest.raises(CheckpointError, match="file not found"):
        OnnxBackend(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not onnx")
    with pytest.raises(CheckpointError, match="cannot load"):
        OnnxBackend(junk)
    assert main(["predict", str(trained["inputs"]), "--onnx", str(junk), "--out", str(tmp_path / "o")]) == 2
    assert main(["export", "onnx", "--weights", str(trained["ckpt"]), "--out", str(tmp_path), "--size", "64x64"]) == 2
