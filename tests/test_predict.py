"""Predictor API, `comask predict` over files/folders with bad inputs, output naming, overlays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from comask.cli import main as cli_main
from comask.config import CONFIG_DIR, load_config
from comask.engine.predict import OutputNames, Predictor, predict_paths, safe_stem
from comask.engine.visualize import draw_instances
from comask.errors import CheckpointError, UserError

CLASSES, CAT_IDS = ["tri", "box"], [3, 7]


def _tiny_cfg_file(root: Path) -> Path:
    base = CONFIG_DIR / "_base_"
    text = f"""_base_:
  - {base / 'models' / 'maskrcnn_r18_cpu.yaml'}
  - {base / 'datasets' / 'coco_instance.yaml'}
  - {base / 'schedules' / 'schedule_1x.yaml'}
  - {base / 'default_runtime.yaml'}
model:
  num_classes: 2
  rpn: {{post_nms_top_n_test: 20, pre_nms_top_n_test: 50}}
  test: {{detections_per_img: 4, score_thresh: 0.0}}
input: {{min_size_test: 64, max_size_test: 96}}
"""
    p = root / "tiny.yaml"
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from comask.modeling.build import build_model

    root = tmp_path_factory.mktemp("ckpt")
    cfg = load_config(_tiny_cfg_file(root))
    torch.manual_seed(0)
    model = build_model(cfg)
    path = root / "model_final.pth"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(),
                "meta": {"classes": CLASSES, "cat_ids": CAT_IDS}, "iter": 0}, path)
    return path


@pytest.fixture(scope="module")
def predictor(ckpt) -> Predictor:
    return Predictor(ckpt, device="cpu", score_thr=0.0)


def _img(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_predictor_instances_contract(predictor, tmp_path):
    assert predictor.classes == CLASSES
    arr = _img()
    Image.fromarray(arr).save(tmp_path / "x.png")
    for image in (arr, Image.fromarray(arr), tmp_path / "x.png", str(tmp_path / "x.png")):
        inst = predictor(image)
        n = len(inst["scores"])
        assert n > 0  # score_thresh 0: random weights still produce detections
        assert inst["boxes"].shape == (n, 4) and inst["boxes"].dtype == np.float32
        assert inst["masks"].shape == (n, 48, 64) and inst["masks"].dtype == bool
        assert inst["labels"].dtype == np.int64 and set(inst["labels"]) <= {1, 2}
        assert [CAT_IDS[i - 1] for i in inst["labels"]] == list(inst["category_ids"])
        assert inst["class_names"] == [CLASSES[i - 1] for i in inst["labels"]]
    # grayscale arrays and batches of different sizes work; a high threshold filters everything
    outs = predictor.predict_batch([_img()[:, :, 0], _img(30, 20, 1)])
    assert outs[1]["masks"].shape[1:] == (30, 20)
    predictor.score_thr = 1.01
    try:
        none = predictor(_img())
    finally:
        predictor.score_thr = 0.0
    assert len(none["scores"]) == 0 and none["masks"].shape == (0, 48, 64)


def test_checkpoint_without_config_is_explained(tmp_path, ckpt):
    sd = torch.load(ckpt, weights_only=True)["model"]
    bare = tmp_path / "bare.pth"
    torch.save(sd, bare)
    with pytest.raises(CheckpointError, match="--config"):
        Predictor(bare)


def test_safe_names():
    assert safe_stem("a/b/photo.JPG") == "photo"
    assert safe_stem("../../etc/passwd.png") == "passwd"
    assert safe_stem("..") == "image"
    assert safe_stem("...png") == "image"
    assert safe_stem("we ird$na\nme.png") == "we_ird_na_me"
    assert safe_stem("CON.png") == "_CON"
    assert len(safe_stem("x" * 500 + ".png")) <= 100
    names = OutputNames()
    assert [names.take(p) for p in ["d1/a.png", "d2/a.png", "d3/A.jpg", "a_2.png"]] == ["a", "a_2", "A_3", "a_2_2"]


def test_predict_paths_skips_bad_inputs(predictor, tmp_path, capsys):
    d1, d2, out = tmp_path / "d1", tmp_path / "d2", tmp_path / "out"
    d1.mkdir()
    d2.mkdir()
    Image.fromarray(_img()).save(d1 / "a.png")
    Image.fromarray(_img(40, 30, 2)[:, :, 0]).save(d1 / "b gray.jpg")
    good = (d1 / "a.png").read_bytes()
    (d1 / "c_truncated.png").write_bytes(good[: len(good) // 2])
    (d1 / "d_empty.jpg").write_bytes(b"")
    (d1 / "e_text.png").write_text("not an image")
    (d1 / "notes.txt").write_text("ignored")
    Image.fromarray(_img(seed=3)).save(d2 / "a.png")  # same stem as d1/a.png
    rc = predict_paths([str(d1), str(d2), str(tmp_path / "missing.png")], out, predictor=predictor, batch_size=2)
    assert rc == 1
    cap = capsys.readouterr()
    err_lines = [ln for ln in cap.err.splitlines() if ln.startswith("comask: skipped")]
    assert len(err_lines) == 4
    assert any("c_truncated.png" in ln for ln in err_lines)
    assert any("d_empty.jpg" in ln for ln in err_lines)
    assert any("e_text.png" in ln for ln in err_lines)
    assert any("missing.png" in ln for ln in err_lines)
    assert "predicted 3 image(s)" in cap.out and "skipped 4 bad" in cap.out and "ignored 1 non-image" in cap.out
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_2.png", "b_gray.png", "predictions.json"]
    overlay = np.asarray(Image.open(out / "b_gray.png"))
    assert overlay.shape == (40, 30, 3)
    rows = json.loads((out / "predictions.json").read_text())
    assert {r["file_name"] for r in rows} == {str(d1 / "a.png"), str(d1 / "b gray.jpg"), str(d2 / "a.png")}
    assert {r["category_id"] for r in rows} <= set(CAT_IDS)
    gray = [r for r in rows if r["file_name"].endswith("b gray.jpg")]
    assert gray and mask_util.decode({**gray[0]["segmentation"],
                                      "counts": gray[0]["segmentation"]["counts"].encode()}).shape == (40, 30)


def test_predict_cli_round_trip(ckpt, tmp_path, capsys):
    img = tmp_path / "one.png"
    Image.fromarray(_img()).save(img)
    rc = cli_main(["predict", str(img), "--weights", str(ckpt), "--out", str(tmp_path / "o"), "--score-thr", "0",
                   "--device", "cpu"])
    assert rc == 0
    assert (tmp_path / "o" / "one.png").is_file()
    assert json.loads((tmp_path / "o" / "predictions.json").read_text())
    # nothing to do and no model: one-line errors, exit 2
    assert cli_main(["predict", str(tmp_path / "empty_dir_missing"), "--out", str(tmp_path / "o2")]) == 2
    assert cli_main(["predict", str(img), "--onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "o3")]) == 2
    assert "error" in capsys.readouterr().err


def test_no_images_found(predictor, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.md").write_text("x")
    with pytest.raises(UserError, match="no images found"):
        predict_paths([tmp_path / "in"], tmp_path / "out", predictor=predictor)


def test_draw_instances():
    img = np.full((60, 80, 3), 100, dtype=np.uint8)
    mask = np.zeros((1, 60, 80), dtype=bool)
    mask[0, 30:50, 20:40] = True
    inst = {"boxes": np.array([[20, 30, 40, 50]], np.float32), "scores": np.array([0.87], np.float32),
            "labels": np.array([2]), "masks": mask}
    out = draw_instances(img, inst, ["tri", "box"])
    assert out.shape == img.shape and out.dtype == np.uint8
    assert (out[40, 30] != 100).any()  # mask interior tinted
    assert (out[5, 70] == 100).all()  # far from the instance: untouched
    assert (out[20:30, 20:60] != 100).any()  # the label sits above the box
    assert (img == 100).all()  # input not modified
    empty = draw_instances(img, {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0),
                                 "masks": np.zeros((0, 60, 80), bool)})
    assert (empty == img).all()


def test_eval_checkpoint_cli(ckpt, tmp_path, capsys):
    """`comask eval` with the stored config pointed at a tiny data set: metrics.json in the eval form."""
    from test_evaluate import _write_coco

    ann = _write_coco(tmp_path)
    out = tmp_path / "ev"
    rc = cli_main(["eval", "--weights", str(ckpt), "--out", str(out), "--device", "cpu", "--opts",
                   f"data.val.ann={ann}", f"data.val.images={tmp_path}", "data.num_workers=0"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"} and "segm" in m
    assert 0.0 <= m["segm"]["AP"] <= 1.0
    assert set(m["per_category"]["segm"]) <= set(CLASSES)
    assert m["num_images"] == 3
    rows = json.loads((out / "results.json").read_text())
    assert {r["category_id"] for r in rows} <= set(CAT_IDS)
    assert "AP50" in capsys.readouterr().out
    # a data set with other categories than the checkpoint's is refused with a clear message
    data = json.loads(ann.read_text())
    data["categories"][0]["id"] = 4
    for a in data["annotations"]:
        a["category_id"] = 4 if a["category_id"] == 3 else a["category_id"]
    ann.write_text(json.dumps(data))
    rc = cli_main(["eval", "--weights", str(ckpt), "--out", str(out), "--device", "cpu", "--opts",
                   f"data.val.ann={ann}", f"data.val.images={tmp_path}", "data.num_workers=0"])
    assert rc == 2
    assert "category ids" in capsys.readouterr().err


def test_model_failure_on_one_image_skips_only_that_image(tmp_path, capsys):
    """A batch the model cannot run is retried image by image; only the failing image is skipped."""
    calls = []

    def backend(images):
        calls.append(len(images))
        if any(im.shape[-1] == 7 for im in images):
            raise RuntimeError("Input and output sizes should be greater than 0")
        return [{"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([2]),
                 "scores": torch.tensor([0.9]), "masks": torch.ones(1, 1, *im.shape[-2:])} for im in images]

    pred = Predictor(backend=backend, classes=CLASSES, cat_ids=CAT_IDS)
    for name, w in [("a", 20), ("b", 7), ("c", 20)]:
        Image.fromarray(_img(10, w)).save(tmp_path / f"{name}.png")
    rc = predict_paths([tmp_path], tmp_path / "out", predictor=pred, batch_size=3)
    assert rc == 1
    assert calls == [3, 1, 1, 1]
    assert "b.png" in capsys.readouterr().err
    rows = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [Path(r["file_name"]).name for r in rows] == ["a.png", "c.png"]
    assert [r["category_id"] for r in rows] == [7, 7] and rows[0]["category_name"] == "box"


def test_resolve_device_one_rule_for_train_eval_predict(monkeypatch: pytest.MonkeyPatch) -> None:
    from comask.engine.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(UserError, match=r"^runtime.device=cuda but CUDA is not available"):
        resolve_device("cuda", setting="runtime.device")
    with pytest.raises(UserError, match="--device: unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(UserError, match="not supported"):
        resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    # under DDP each rank takes its own GPU
    assert resolve_device("cuda", local_rank=3) == resolve_device("auto", local_rank=3) == torch.device("cuda", 3)
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")


def test_mask_threshold_comes_from_config_and_can_be_overridden(ckpt) -> None:
    """`model.test.mask_thresh` decides which mask probabilities are the mask, in predict as in eval."""
    ramp = torch.linspace(0.0, 1.0, 10).reshape(1, 1, 1, 10).expand(1, 1, 10, 10)  # 0.0 .. 1.0 by column

    def backend(images):
        return [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1]),
                 "scores": torch.tensor([0.9]), "masks": ramp.clone()} for _ in images]

    def area(pred: Predictor) -> int:
        return int(pred(_img(10, 10))["masks"].sum())

    assert Predictor(ckpt).mask_thr == 0.5
    assert Predictor(ckpt, mask_thr=0.3).mask_thr == 0.3
    assert area(Predictor(backend=backend, classes=CLASSES)) == 50  # columns 5..9 exceed 0.5
    assert area(Predictor(backend=backend, classes=CLASSES, mask_thr=0.3)) == 70
    assert area(Predictor(backend=backend, classes=CLASSES, mask_thr=0.8)) == 20
