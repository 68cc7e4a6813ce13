"""`comask export weights`: slim weights-only checkpoints (float16 with --half).

A small MobileNetV3 CoMask (the demo checkpoint's architecture) is trained for a few iterations; its full
periodic checkpoint (optimizer state included) is exported and the exported file must
- hold only model/config/meta (+ export info), load with weights_only=True, be much smaller;
- load into the float32 model (fp16 -> fp32 by load_state_dict) with outputs close to the source model's;
- be accepted by `comask eval` and by `runtime.load_from` (training starts from exactly its weights).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

from comask.cli import main
from comask.config import load_config
from comask.engine.checkpoint import checkpoint_name, load_checkpoint, save_checkpoint
from comask.errors import CheckpointError
from comask.export.weights import export_weights, slim_state_dict

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import NUM_CLASSES, write_tiny_coco  # noqa: E402

SIZE = 64


def _cfg_opts(data: Path) -> list[str]:
    return [
        f"model.num_classes={NUM_CLASSES}", "model.rpn.anchor_sizes=[8,16,32,64,128]",
        "model.rpn.pre_nms_top_n_test=100", "model.rpn.post_nms_top_n_test=50",
        "model.test.detections_per_img=20", "model.test.score_thresh=0.0",
        f"input.min_size_train=[{SIZE}]", f"input.max_size_train={SIZE}",
        f"input.min_size_test={SIZE}", f"input.max_size_test={SIZE}",
        f"data.train={{ann: {data}/annotations/train.json, images: {data}/train}}",
        f"data.val={{ann: {data}/annotations/val.json, images: {data}/val}}", "data.synth=null",
        "data.num_workers=0", "schedule.ims_per_batch=2", "schedule.base_batch=2", "schedule.base_lr=0.005",
        "schedule.by_time=false", "schedule.max_iter=6", "schedule.steps=[1000]", "schedule.warmup_iters=2",
        "schedule.warmup_factor=0.1", "runtime.max_minutes=null", "runtime.threads=1",
        "runtime.checkpoint_period=6", "runtime.final_eval=false", "runtime.tensorboard=false",
        "runtime.progress=false", "runtime.min_free_mb=1",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    from comask.engine.train import train

    root = tmp_path_factory.mktemp("export_weights")
    data = write_tiny_coco(root / "data", num_train=6, num_val=2, size=SIZE)
    opts = _cfg_opts(data)
    res = train(load_config("comask_mnv3_mfpn_demo", opts), root / "run")
    full = root / "run" / checkpoint_name(int(res["iter"]))
    assert "optimizer" in load_checkpoint(full), "the fixture needs a full (resumable) checkpoint"
    return {"root": root, "data": data, "opts": opts, "full": full}


def _image(data: Path) -> torch.Tensor:
    from comask.data.images import read_image

    img = read_image(sorted((data / "val").glob("*.png"))[0])
    return torch.from_numpy(img).permute(2, 0, 1).float() / 255.0


def test_half_export_is_slim_safe_and_matches_the_fp32_model(trained, tmp_path, capsys):
    from comask.engine.predict import load_model

    out = tmp_path / "slim.pth"
    assert main(["export", "weights", "--weights", str(trained["full"]), "--out", str(out), "--half"]) == 0
    printed = capsys.readouterr().out
    assert f"{out.stat().st_size} bytes" in printed and "MB" in printed and "float16" in printed
    assert not list(tmp_path.glob(".tmp-ckpt-*")), "atomic write leaves no temp file"

    full = load_checkpoint(trained["full"])
    # Loads with the safe unpickler, directly through torch too.
    raw = torch.load(out, map_location="cpu", weights_only=True)
    assert set(raw) == {"model", "config", "meta", "iter", "export"}
    assert raw["config"] == full["config"] and raw["meta"] == full["meta"] and raw["iter"] == full["iter"]
    assert raw["export"]["dtype"] == "float16" and raw["export"]["kept_fp32"] == []
    assert raw["model"].keys() == full["model"].keys()
    for k, t in raw["model"].items():
        src = full["model"][k]
        if src.is_floating_point():
            assert t.dtype == torch.float16, k
        else:
            assert t.dtype == src.dtype and torch.equal(t, src), k  # e.g. BN num_batches_tracked
    # No optimizer momenta, and half the bytes per weight: well under a third of the training file.
    assert out.stat().st_size < 0.3 * trained["full"].stat().st_size

    fp32 = load_model(trained["full"]).model
    fp16 = load_model(out).model
    for (name, a), (_, b) in zip(fp32.state_dict().items(), fp16.state_dict().items(), strict=True):
        assert b.dtype == a.dtype, f"{name}: loaded as {b.dtype}, the model's dtype is {a.dtype}"
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), name
    x = _image(trained["data"])
    with torch.no_grad():
        fa, fb = fp32.backbone(x[None]), fp16.backbone(x[None])
        for level in fa:
            scale = fa[level].abs().max().clamp_min(1e-6)
            assert ((fa[level] - fb[level]).abs().max() / scale) < 1e-2, level
        da, db = fp32([x])[0], fp16([x])[0]
    # The detections survive the rounding (score_thresh 0: the few-iteration model's scores are low): each of
    # the 8 top fp32 detections has an fp16 twin of the same class, a box of IoU > 0.95, a close score and mask.
    assert len(da["scores"]) >= 8
    iou = box_iou(da["boxes"][:8], db["boxes"])
    for i in range(8):
        twins = [j for j in range(len(db["scores"])) if iou[i, j] > 0.95 and db["labels"][j] == da["labels"][i]
                 and abs(float(db["scores"][j] - da["scores"][i])) < 2e-3]
        assert twins, f"detection {i} ({da['labels'][i]}, {float(da['scores'][i]):.4f}) has no fp16 twin"
        ma, mb = da["masks"][i, 0] > 0.5, db["masks"][twins[0], 0] > 0.5
        union = (ma | mb).sum()
        assert union == 0 or (ma & mb).sum() / union > 0.9, f"detection {i}: masks differ"

def test_fp32_export_keeps_exact_weights(trained, tmp_path, capsys):
    out = tmp_path / "slim32.pth"
    info = export_weights(trained["full"], out)
    full = load_checkpoint(trained["full"])
    slim = load_checkpoint(out)
    assert info["dtype"] == "float32" and info["bytes"] == out.stat().st_size
    assert all(torch.equal(slim["model"][k], v) for k, v in full["model"].items())
    assert out.stat().st_size < 0.6 * trained["full"].stat().st_size  # the optimizer state is gone


def test_exported_file_works_for_eval_and_as_load_from(trained, tmp_path, capsys):
    from comask.engine.train import train

    out = tmp_path / "slim.pth"
    export_weights(trained["full"], out, half=True, quiet=True)
    assert main(["eval", "--weights", str(out), "--out", str(tmp_path / "ev"), "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert 0.0 <= metrics["segm"]["AP"] <= 1.0

    # runtime.load_from: with LR 0 one iteration changes no parameter, so the run ends with exactly the
    # exported float16 weights, upcast.
    cfg = load_config("comask_mnv3_mfpn_demo", trained["opts"] + [
        f"runtime.load_from={json.dumps(str(out))}", "schedule.base_lr=0.0", "schedule.max_iter=1",
        "runtime.checkpoint_period=1000"])
    res = train(cfg, tmp_path / "ft")
    final = load_checkpoint(res["final"])["model"]
    exported = load_checkpoint(out)["model"]
    params = dict(torch.nn.Module.named_parameters(_built(cfg)))
    for name in params:
        assert final[name].dtype == torch.float32
        assert torch.equal(final[name], exported[name].float()), name


def _built(cfg) -> torch.nn.Module:
    from comask.modeling.build import build_model

    return build_model(cfg, pretrained=False)


def test_bare_state_dict_needs_a_config_and_bad_outputs_are_refused(trained, tmp_path):
    state = load_checkpoint(trained["full"])["model"]
    bare = tmp_path / "bare.pth"
    save_checkpoint(state, bare)  # a plain mapping of tensors: what a foreign tool might save
    with pytest.raises(CheckpointError, match="pass --config"):
        export_weights(bare, tmp_path / "x.pth")
    info = export_weights(bare, tmp_path / "x.pth", config="comask_mnv3_mfpn_demo", opts=trained["opts"],
                          half=True, quiet=True)
    assert load_checkpoint(info["path"])["config"]["model"]["num_classes"] == NUM_CLASSES
    with pytest.raises(CheckpointError, match="input checkpoint"):
        export_weights(trained["full"], trained["full"])
    # Weights that do not fit the stored config are refused before anything is written.
    with pytest.raises(CheckpointError, match="does not match the model"):
        export_weights(trained["full"], tmp_path / "y.pth", opts=["model.num_classes=7"])
    assert not (tmp_path / "y.pth").exists()


def test_half_keeps_tensors_float16_cannot_hold():
    state = {"w": torch.tensor([1.0, -2.5]), "big": torch.tensor([1e6, 1.0]), "n": torch.tensor(3),
             "inf_ok": torch.tensor([float("inf"), 1.0])}
    slim, kept = slim_state_dict(state, half=True)
    assert kept == ["big"]
    assert slim["w"].dtype == torch.float16 and slim["big"].dtype == torch.float32
    assert slim["n"].dtype == torch.int64 and slim["inf_ok"].dtype == torch.float16
    view = torch.arange(1000.0)[:3]
    assert slim_state_dict({"v": view})[0]["v"].untyped_storage().nbytes() == 3 * 4, "a view is not saved whole"
