"""Issue 5's catalogue, through the real commands (`comask.cli.main`): bad data, bad files, bad
checkpoints, unusable output directories. docs/RELIABILITY.md maps every entry to its test.

Every user error must reach the terminal as exactly one `comask: error: ...` line (exit 2), with no
traceback, also when it happens inside a DataLoader worker process; skipped inputs are counted.
`capfd` captures at the file-descriptor level, so output of worker processes is checked too.
"""

from __future__ import annotations

import errno
import json
import resource
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TinyCoco, make_tiny_coco  # tests/ is on sys.path (rootdir conftest)
from PIL import Image

from comask.cli import main
from comask.config import CONFIG_DIR, load_config
from comask.data.coco import CocoDataset
from comask.data.loader import build_test_loader
from comask.engine.checkpoint import load_checkpoint

CFG = "comask_r18_mfpn_shapes"


def _opts(tc: TinyCoco, *extra: str) -> list[str]:
    """A CoMask small enough for a CPU test: 16-channel FPN, 64 px images, 2 iterations."""
    return [
        f"data.train={{ann: {tc.ann}, images: {tc.images}}}", f"data.val={{ann: {tc.ann}, images: {tc.images}}}",
        "data.synth=null", "data.num_workers=0", "model.num_classes=3", "model.fpn.channels=16",
        "model.collab_head.conv_dim=16", "model.mask_head.conv_dim=16", "model.box_head.fc_dim=32",
        "model.roi.batch_size_per_image=16", "input.min_size_train=[64]", "input.max_size_train=64",
        "input.min_size_test=64", "input.max_size_test=64", "schedule.ims_per_batch=2", "schedule.max_iter=2",
        "schedule.warmup_iters=1", "schedule.steps=[1]", "runtime.final_eval=false", "runtime.tensorboard=false",
        "runtime.progress=false", "runtime.min_free_mb=1", "runtime.threads=1", "runtime.device=cpu", *extra,
    ]


def _one_error_line(capfd: pytest.CaptureFixture, *needles: str) -> str:
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("comask: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Original" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A valid PNG header claiming w x h with almost no pixel data: decoding it would need w*h*3 bytes."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _corrupt_middle(path: Path, h: int, w: int) -> None:
    """A PNG with intact header and end marker but zeroed compressed data: found only when decoded."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    b = bytearray(path.read_bytes())
    b[len(b) // 2: len(b) // 2 + 200] = bytes(200)
    path.write_bytes(bytes(b))


def _rgb(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save_modes(d: Path) -> list[str]:
    """Grayscale, RGBA, palette, 16-bit and CMYK versions of a 64x48 image; returns the file names."""
    src = Image.fromarray(_rgb())
    src.convert("L").save(d / "m_gray.png")
    src.convert("RGBA").save(d / "m_rgba.png")
    src.convert("P").save(d / "m_palette.png")
    Image.fromarray(np.asarray(src.convert("L")).astype(np.uint16) * 257).save(d / "m_16bit.png")
    src.convert("CMYK").save(d / "m_cmyk.jpg")
    assert Image.open(d / "m_16bit.png").mode.startswith("I") and Image.open(d / "m_cmyk.jpg").mode == "CMYK"
    return ["m_gray.png", "m_rgba.png", "m_palette.png", "m_16bit.png", "m_cmyk.jpg"]


def _add_image(tc: TinyCoco, iid: int, fn: str, w: int = 64, h: int = 48, with_ann: bool = True) -> None:
    tc.data["images"].append({"id": iid, "file_name": fn, "width": w, "height": h})
    if with_ann:
        tc.data["annotations"].append({"id": 1000 + iid, "image_id": iid, "category_id": 12, "iscrowd": 0,
                                       "bbox": [10.0, 10.0, 20.0, 20.0], "area": 400.0,
                                       "segmentation": [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]})


def _messy(root: Path) -> TinyCoco:
    """The tiny set plus one instance of most bad-data kinds; the good part is still trainable."""
    tc = make_tiny_coco(root)
    d = tc.images
    for iid, fn in enumerate(_save_modes(d), start=50):  # good, only unusual colour modes
        _add_image(tc, iid, fn)
    tc.image_path(3).unlink()  # missing_file
    (d / "z.jpg").write_bytes(b"")
    _add_image(tc, 60, "z.jpg")  # empty_file
    (d / "t.png").write_text("not an image")
    _add_image(tc, 61, "t.png")  # not_an_image
    _png_header_only(d / "huge.png", 20000, 20000)
    _add_image(tc, 62, "huge.png", 20000, 20000)  # image_too_large
    Image.fromarray(_rgb()).save(d / "w.png")
    _add_image(tc, 63, "w.png", w=70)  # size_mismatch (stored 70x48, file 64x48)
    Image.fromarray(_rgb()).save(d / "cut.jpg")
    (d / "cut.jpg").write_bytes((d / "cut.jpg").read_bytes()[:-400])
    _add_image(tc, 64, "cut.jpg")  # truncated_image
    Image.new("RGB", (1, 1)).save(d / "one.png")
    _add_image(tc, 65, "one.png", 1, 1, with_ann=False)  # tiny_image: a warning, used as a negative
    tc.data["images"].append({"id": 1, "file_name": "one.png", "width": 1, "height": 1})  # duplicate_image_id
    anns = tc.data["annotations"]
    anns.append({**anns[0]})  # duplicate_annotation_id (id 10 again)
    anns.append({**anns[0], "id": 95, "bbox": [25.0, 4.0, -20.0, 16.0]})  # negative_box (always dropped)
    anns.append({**anns[0], "id": 96, "bbox": [500.0, 4.0, 20.0, 16.0]})  # box_outside_image (always dropped)
    anns.append({**anns[1], "id": 97, "segmentation": {**anns[1]["segmentation"], "size": [40, 64]}})
    anns.append({**anns[0], "id": 90, "category_id": 999})  # unknown_category
    anns.append({**anns[0], "id": 91, "image_id": 777})  # unknown_image
    anns.append({**anns[0], "id": 92, "bbox": [5.0, 4.0, 0.0, 16.0]})  # zero_size_box (always dropped)
    anns.append({**anns[0], "id": 93, "segmentation": [[5.0, float("nan"), 25.0, 4.0, 25.0, 20.0]]})
    anns.append({**anns[0], "id": 94, "segmentation": [[5.0, 4.0, 25.0, 4.0]]})  # degenerate_polygon
    tc.write()
    return tc


SCAN_SKIPS = {"missing_file": 1, "empty_file": 1, "not_an_image": 1, "image_too_large": 1, "size_mismatch": 1,
              "unknown_category": 1, "unknown_image": 1, "zero_size_box": 1, "nan_coordinates": 1,
              "degenerate_polygon": 1, "truncated_image": 1, "duplicate_image_id": 1, "duplicate_annotation_id": 1,
              "negative_box": 1, "box_outside_image": 1, "rle_size_mismatch": 1}


# ---------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------


def test_config_errors_are_one_line(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "run")
    assert main(["train", "--config", "no_such_config", "--out", out]) == 2
    _one_error_line(capfd, "no_such_config", "not found", CFG)
    assert main(["train", "--config", CFG, "--out", out, "--opts", "model.no_such_key=1"]) == 2
    _one_error_line(capfd, "model.no_such_key", "unknown key")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert main(["train", "--config", str(bad), "--out", out]) == 2
    _one_error_line(capfd, str(bad), "not valid YAML")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------
# train on bad data
# ---------------------------------------------------------------------------------------------------


def test_train_without_skip_bad_names_the_file_and_the_fix(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    tc = _messy(tmp_path / "d")
    assert main(["train", "--config", CFG, "--out", str(tmp_path / "run"), "--opts", *_opts(tc)]) == 2
    _one_error_line(capfd, str(tc.ann), "data.skip_bad=true", "comask data check")
    # the annotation file itself: not JSON, lacking keys, wrong types (skip_bad cannot help: one line, exit 2)
    for content, needle in [("{oops", "not valid JSON"), ('{"images": []}', "missing key(s) annotations"),
                            ('{"images": 5, "annotations": [], "categories": []}', "'images' must be a list")]:
        tc.ann.write_text(content)
        assert main(["train", "--config", CFG, "--out", str(tmp_path / "run"), "--opts",
                     *_opts(tc, "data.skip_bad=true")]) == 2
        _one_error_line(capfd, str(tc.ann), needle)


def test_train_with_skip_bad_completes_and_reports_counts(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """Scan-time defects plus an image that is corrupt only inside (found by a DataLoader worker)."""
    tc = _messy(tmp_path / "d")
    _corrupt_middle(tc.image_path(1), 48, 64)
    out = tmp_path / "run"
    rc = main(["train", "--config", CFG, "--out", str(out), "--opts",
               *_opts(tc, "data.skip_bad=true", "data.num_workers=2", "schedule.max_iter=3")])
    err = capfd.readouterr().err
    assert rc == 0, err
    assert load_checkpoint(out / "model_final.pth")["iter"] == 3
    done = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if '"done"' in ln][-1]
    # the corrupt image was drawn in a worker process; its skip still reaches the run's summary
    assert done["skipped_data"] == {**SCAN_SKIPS, "corrupt_image": 1}
    assert "Traceback" not in err


def test_worker_skips_are_counted_once_in_the_main_process(tiny_coco: TinyCoco) -> None:
    _corrupt_middle(tiny_coco.image_path(1), 48, 64)
    ds = CocoDataset(tiny_coco.ann, tiny_coco.images, train=False, skip_bad=True)
    assert not ds.skipped  # the header and the end marker are fine: nothing to see at start-up
    for _ in range(2):  # two passes: the image is drawn twice, decoded (and counted) once
        items = [(im, t) for ims, ts in build_test_loader(ds, 1, num_workers=2) for im, t in zip(ims, ts)]
        # evaluation: no other image stands in; the bad one comes back without pixels, marked skipped
        assert [t["image_id"] for _, t in items] == ds.image_ids
        assert [t["image_id"] for im, t in items if im is None] == [1] and items[0][1]["skipped"] == "corrupt_image"
    assert ds.skipped == {"corrupt_image": 1}
    assert ds.skipped_items == [("image 1 (a.png)", "corrupt_image")]


def test_worker_data_error_is_one_line(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """Without skip_bad, the worker's DataError is printed as the same single line as in-process."""
    tc = make_tiny_coco(tmp_path / "d")
    _corrupt_middle(tc.image_path(1), 48, 64)
    rc = main(["train", "--config", CFG, "--out", str(tmp_path / "run"), "--opts",
               *_opts(tc, "data.num_workers=2", "schedule.max_iter=3")])
    assert rc == 2
    _one_error_line(capfd, "image 1 (a.png)", "corrupt image", "data.skip_bad=true")


def test_checkpoint_write_failure_mid_run_is_one_line(tmp_path: Path, capfd: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full at the second checkpoint: one line, the first checkpoint intact, no temp file left."""
    tc = make_tiny_coco(tmp_path / "d")
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    rc = main(["train", "--config", CFG, "--out", str(out), "--opts", *_opts(tc, "runtime.checkpoint_period=1")])
    monkeypatch.undo()
    assert rc == 2
    _one_error_line(capfd, "model_0000002.pth", "No space left on device", "--resume")
    assert load_checkpoint(out / "model_0000001.pth")["iter"] == 1
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000001.pth"]


# ---------------------------------------------------------------------------------------------------
# checkpoints from another config, eval and predict
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 3-class CoMask checkpoint for the tiny set's categories (ids 3, 7, 12)."""
    from comask.modeling.build import build_model

    root = tmp_path_factory.mktemp("ckpt3")
    tc = make_tiny_coco(root / "d")
    cfg = load_config(CFG, _opts(tc, "model.test.score_thresh=0.0"))
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False)
    path = root / "model_final.pth"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "iter": 0,
                "meta": {"classes": ["triangle", "blob", "square"], "cat_ids": [3, 7, 12]}}, path)
    return path


def test_checkpoint_from_another_class_count(ckpt3: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    tc = make_tiny_coco(tmp_path / "d")
    rc = main(["eval", "--weights", str(ckpt3), "--out", str(tmp_path / "ev"), "--device", "cpu",
               "--opts", "model.num_classes=5"])
    assert rc == 2
    line = _one_error_line(capfd, str(ckpt3), "does not match the model", "different shapes", "load_strict=false")
    assert "cls_score" in line or "predictor" in line, line  # the mismatching keys are named
    five = tmp_path / "five.yaml"
    five.write_text(f"_base_: {CONFIG_DIR / (CFG + '.yaml')}\nmodel: {{num_classes: 5, fpn: {{channels: 16}}}}\n")
    rc = main(["predict", str(tc.image_path(1)), "--weights", str(ckpt3), "--config", str(five),
               "--out", str(tmp_path / "pr"), "--device", "cpu"])
    assert rc == 2
    _one_error_line(capfd, "does not match the model", "different shapes")


def test_eval_on_bad_validation_data(ckpt3: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    tc = make_tiny_coco(tmp_path / "d")
    for iid, fn in enumerate(_save_modes(tc.images), start=50):
        _add_image(tc, iid, fn)
    tc.write()
    tc.image_path(3).unlink()
    val = [f"data.val={{ann: {tc.ann}, images: {tc.images}}}"]
    assert main(["eval", "--weights", str(ckpt3), "--out", str(tmp_path / "e1"), "--device", "cpu",
                 "--opts", *val]) == 2
    _one_error_line(capfd, "image 3 (c.png)", "image file not found", "data.skip_bad=true")
    rc = main(["eval", "--weights", str(ckpt3), "--out", str(tmp_path / "e2"), "--device", "cpu",
               "--opts", *val, "data.skip_bad=true"])
    err = capfd.readouterr().err
    assert rc == 0, err
    m = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    # the five unusual-mode images are evaluated; the missing one is counted, not scored as a miss
    assert m["num_images"] == 8 and m["skipped_data"] == {"missing_file": 1}
    assert "skipped bad validation data" in err
    # a 300x2 strip passes the data checks but the model's resize (64, max 64) would make it 0 px high
    Image.fromarray(_rgb(2, 300)).save(tc.images / "thin.png")
    _add_image(tc, 70, "thin.png", 300, 2, with_ann=False)
    tc.write()
    assert main(["eval", "--weights", str(ckpt3), "--out", str(tmp_path / "e3"), "--device", "cpu",
                 "--opts", *val, "data.skip_bad=true"]) == 2
    _one_error_line(capfd, "image 70", "300x2", "too thin")


def test_unwritable_output_dirs_fail_before_work(ckpt3: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    img = tmp_path / "x.png"
    Image.fromarray(_rgb()).save(img)
    assert main(["predict", str(img), "--weights", str(ckpt3), "--out", str(blocker / "o"), "--device", "cpu"]) == 2
    _one_error_line(capfd, "output directory", str(blocker / "o"))
    assert main(["eval", "--weights", str(ckpt3), "--out", str(blocker / "e"), "--device", "cpu"]) == 2
    _one_error_line(capfd, "output directory", str(blocker / "e"))


def test_predict_over_a_messy_folder(ckpt3: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """Unusual modes and a 1x1 image are predicted; every unusable file is one counted `skipped` line,
    and a 20000x20000 header is refused before decoding (no 1.2 GB allocation)."""
    d = tmp_path / "in"
    d.mkdir()
    good = _save_modes(d)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(d / "one.png")
    Image.fromarray(_rgb(2, 300)).save(d / "thin.png")  # the model's resize would make it 0 px high
    _png_header_only(d / "huge.png", 20000, 20000)
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.png").write_text("not an image")
    Image.fromarray(_rgb()).save(d / "cut.jpg")
    (d / "cut.jpg").write_bytes((d / "cut.jpg").read_bytes()[:300])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rc = main(["predict", str(d), "--weights", str(ckpt3), "--out", str(tmp_path / "out"), "--device", "cpu",
               "--score-thr", "0", "--batch-size", "3"])
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    cap = capfd.readouterr()
    assert rc == 1
    skipped = {ln.split()[2].rstrip(":").rsplit("/", 1)[-1]: ln for ln in cap.err.splitlines()
               if ln.startswith("comask: skipped")}
    assert set(skipped) == {"thin.png", "huge.png", "zero.jpg", "text.png", "cut.jpg"}, cap.err
    assert "too large" in skipped["huge.png"] and "too thin" in skipped["thin.png"]
    assert "zero-byte" in skipped["zero.jpg"] and "not an image" in skipped["text.png"]
    assert "truncated" in skipped["cut.jpg"].lower()
    assert "predicted 6 image(s)" in cap.out and "skipped 5 bad input(s)" in cap.out
    assert "Traceback" not in cap.err
    rows = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert {Path(r["file_name"]).name for r in rows} == {*good, "one.png"}
    assert grown_mb < 400, f"peak RSS grew by {grown_mb:.0f} MB"


# ---------------------------------------------------------------------------------------------------
# comask evaluate and comask data check
# ---------------------------------------------------------------------------------------------------


def test_evaluate_bad_files_are_one_line(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    tc = make_tiny_coco(tmp_path / "d")
    dt = tmp_path / "dt.json"
    dt.write_text(json.dumps([{"image_id": 1, "category_id": 7, "bbox": [5, 4, 20, 16], "score": 0.9}]))
    bad_gt = tmp_path / "gt_bad.json"
    cases = [
        ("{not json", dt, "not valid JSON"),
        (json.dumps({"images": [], "annotations": []}), dt, "not a COCO instances file"),
    ]
    for content, dtp, needle in cases:
        bad_gt.write_text(content)
        assert main(["evaluate", "--gt", str(bad_gt), "--dt", str(dtp), "--iou-type", "bbox"]) == 2
        _one_error_line(capfd, str(bad_gt), needle)
    junk = tmp_path / "junk.json"
    junk.write_bytes(b"\x00\x01binary")
    assert main(["evaluate", "--gt", str(tc.ann), "--dt", str(junk), "--iou-type", "bbox"]) == 2
    _one_error_line(capfd, str(junk))
    assert main(["evaluate", "--gt", str(tc.ann), "--dt", str(tmp_path / "missing.json")]) == 2
    _one_error_line(capfd, "missing.json", "not found")
    assert main(["evaluate", "--gt", str(tc.ann), "--dt", str(dt), "--iou-type", "bbox"]) == 0


def test_data_check_accepts_unusual_modes_and_lists_the_messy_set(tmp_path: Path, capfd) -> None:
    tc = make_tiny_coco(tmp_path / "ok")
    for iid, fn in enumerate(_save_modes(tc.images), start=50):
        _add_image(tc, iid, fn)
    tc.write()
    assert main(["data", "check", "--ann", str(tc.ann), "--images", str(tc.images), "--deep"]) == 0
    assert "OK: 0 error(s), 0 warning(s)" in capfd.readouterr().out
    bad = _messy(tmp_path / "bad")
    assert main(["data", "check", "--ann", str(bad.ann), "--images", str(bad.images), "--json"]) == 1
    r = json.loads(capfd.readouterr().out)
    kinds = sorted(p["kind"] for p in r["errors"] + r["warnings"])
    assert kinds == sorted([*SCAN_SKIPS, "tiny_image"])


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_checkpoint_refused_by_every_command(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "iter": 1, "x": _Evil(marker)}, evil)
    img = tmp_path / "x.png"
    Image.fromarray(_rgb()).save(img)
    tc = make_tiny_coco(tmp_path / "d")
    for argv in (["predict", str(img), "--weights", str(evil), "--out", str(tmp_path / "p"), "--device", "cpu"],
                 ["eval", "--weights", str(evil), "--out", str(tmp_path / "e"), "--device", "cpu"],
                 ["train", "--config", CFG, "--out", str(tmp_path / "t"), "--opts",
                  *_opts(tc, f"runtime.load_from={evil}")]):
        assert main(argv) == 2
        _one_error_line(capfd, str(evil), "refused", "run code")
    assert not marker.exists(), "the payload must never run"
