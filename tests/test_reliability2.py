"""Reliability, second round (issue 24): evaluation scores each image once, the validation categories
are checked against the model's, file modes without the process umask, file names that leave the image
folder, and skip counts merged over DDP ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import tiny_cfg, tiny_maskrcnn, write_tiny_coco  # noqa: E402
from test_evaluate import _OracleModel, _write_coco  # noqa: E402

from comask.data.coco import CocoDataset  # noqa: E402
from comask.engine.evaluate import check_categories, evaluate_model  # noqa: E402
from comask.errors import DataError  # noqa: E402

TESTS = Path(__file__).parent


# ---------------------------------------------------------------------------------------------------
# Evaluation with data.skip_bad: an unreadable image is skipped, never replaced by another image
# ---------------------------------------------------------------------------------------------------


def test_eval_skips_an_unreadable_image_without_scoring_another_twice(tmp_path: Path) -> None:
    """3 images, image 1 unreadable only when decoded: ids [2, 3] are scored once each (the old
    stand-in gave [2, 2, 3], and image 2's detections counted twice as false positives)."""
    ann = _write_coco(tmp_path)
    oracle = _OracleModel(CocoDataset(ann, tmp_path, train=False))
    (tmp_path / "im1.png").write_text("not an image")
    ds = CocoDataset(ann, tmp_path, train=False, skip_bad=True, check_files=False)
    seen = [t["image_id"] for _, t in (ds[i] for i in range(len(ds)))]
    assert seen == [1, 2, 3] and ds[0][0] is None and ds[0][1]["skipped"] == "not_an_image"
    m = evaluate_model(oracle, ds, device="cpu", batch_size=2, out_dir=tmp_path / "ev", verbose=False)
    assert m["num_images"] == 2 and m["num_detections"] == 1  # image 2's one object, once
    assert m["bbox"]["AP"] == pytest.approx(1.0) and m["segm"]["AP"] == pytest.approx(1.0)
    assert m["skipped_data"] == {"not_an_image": 1}
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["skipped_data"] == {"not_an_image": 1}
    rows = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert [r["image_id"] for r in rows] == [2]
    assert ds.skipped_items == [("image 1 (im1.png)", "not_an_image")]  # named once, however often read


def test_eval_batch_of_only_skipped_images(tmp_path: Path) -> None:
    ann = _write_coco(tmp_path)
    oracle = _OracleModel(CocoDataset(ann, tmp_path, train=False))
    for n in (1, 2):
        (tmp_path / f"im{n}.png").write_bytes(b"")
    ds = CocoDataset(ann, tmp_path, train=False, skip_bad=True, check_files=False)
    m = evaluate_model(oracle, ds, device="cpu", batch_size=2, verbose=False)  # first batch: both skipped
    assert m["num_images"] == 1 and m["skipped_data"] == {"empty_file": 2}


# ---------------------------------------------------------------------------------------------------
# Training-time evaluation: the validation categories against the model's
# ---------------------------------------------------------------------------------------------------


def test_check_categories_names_the_first_mismatch(tmp_path: Path) -> None:
    ann = _write_coco(tmp_path)  # categories 3 "tri", 7 "box"
    ds = CocoDataset(ann, tmp_path, train=False)
    check_categories([(3, "tri"), (7, "box")], ds)
    with pytest.raises(DataError, match=r"category id 3 is 'tri' there but 'box' for the model"):
        check_categories([(3, "box"), (7, "tri")], ds, "val.json")
    with pytest.raises(DataError, match=r"the model's category id 9 \('star'\) is not in its categories"):
        check_categories([(3, "tri"), (7, "box"), (9, "star")], ds)
    with pytest.raises(DataError, match=r"category id 7 \('box'\) is unknown to the model") as ei:
        check_categories([(3, "tri")], ds)
    assert "\n" not in str(ei.value) and "data.val" in str(ei.value)


def _val_opts(ann: Path, images: Path) -> list[str]:
    return [f"data.val={{ann: {ann}, images: {images}}}", "runtime.final_eval=true"]


def test_train_eval_with_categories_listed_in_another_order(tmp_path: Path) -> None:
    """The same categories in another order in the val file: the final evaluation maps labels through
    the model's (training set's) category ids, so it scores what evaluating on the train file scores."""
    from comask.engine.train import train

    root = write_tiny_coco(tmp_path / "data")
    plain_ann = root / "annotations" / "val.json"
    data = json.loads(plain_ann.read_text())
    data["categories"] = list(reversed(data["categories"]))
    val_ann = root / "annotations" / "val_reordered.json"
    val_ann.write_text(json.dumps(data))
    results = {}
    for name, ann in (("same", plain_ann), ("reordered", val_ann)):
        cfg = tiny_cfg(root, "schedule.max_iter=2", *_val_opts(ann, root / "val"))
        res = train(cfg, tmp_path / name, model_factory=tiny_maskrcnn)
        results[name] = res["metrics"]
    for t in ("bbox", "segm"):
        assert results["reordered"][t] == results["same"][t]


def test_train_refuses_a_val_set_numbered_differently(tmp_path: Path) -> None:
    from comask.engine.train import train

    root = write_tiny_coco(tmp_path / "data")
    data = json.loads((root / "annotations" / "val.json").read_text())
    # swap the names of the first two categories: same ids, other meaning
    a, b = data["categories"][0], data["categories"][1]
    a["name"], b["name"] = b["name"], a["name"]
    val_ann = root / "annotations" / "val_swapped.json"
    val_ann.write_text(json.dumps(data))
    cfg = tiny_cfg(root, "schedule.max_iter=2", *_val_opts(val_ann, root / "val"))
    with pytest.raises(DataError, match=r"val_swapped.json: category id \d+ is '.+' there but '.+' for the model"):
        train(cfg, tmp_path / "run", model_factory=tiny_maskrcnn)
    assert not (tmp_path / "run" / "model_final.pth").exists()  # refused before training


# ---------------------------------------------------------------------------------------------------
# DDP: skip counts merged over ranks
# ---------------------------------------------------------------------------------------------------

_DDP_EVAL = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from comask.engine import dist
    from comask.data.coco import CocoDataset
    from comask.engine.evaluate import evaluate_model
    from test_evaluate import _OracleModel
    root = Path({root!r})
    info = dist.init_distributed("cpu")
    oracle = _OracleModel(CocoDataset(root / "ann.json", root, train=False))
    dist.barrier()
    if info.rank == 0:
        (root / "im2.png").write_text("not an image")  # on rank 1's shard only (strided: index 1)
    dist.barrier()
    ds = CocoDataset(root / "ann.json", root, train=False, skip_bad=True, check_files=False)
    m = evaluate_model(oracle, ds, distributed=True, verbose=False)
    Path(root, f"rank{{info.rank}}.json").write_text(json.dumps({{"metrics": m.get("skipped_data"),
        "dataset": dict(ds.skipped), "images": m["num_images"]}}))
    dist.cleanup(info)
    """
)


def _torchrun(script: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_ddp_eval_merges_skips_found_on_another_rank(tmp_path: Path) -> None:
    _write_coco(tmp_path)
    script = tmp_path / "run.py"
    script.write_text(_DDP_EVAL.format(tests=str(TESTS), root=str(tmp_path)))
    proc = _torchrun(script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # rank 1 found the bad image; rank 0 (which scores and writes metrics.json) counts it too
    assert r0["metrics"] == r1["metrics"] == {"not_an_image": 1}
    assert r0["dataset"] == r1["dataset"] == {"not_an_image": 1}
    assert r0["images"] == 2


_DDP_TRAIN = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from _train_helpers import tiny_cfg, tiny_maskrcnn
    from comask.engine.train import train
    cfg = tiny_cfg(Path({root!r}), "schedule.max_iter=4", "schedule.ims_per_batch=2", "data.skip_bad=true",
                   "data.check_files=false", "data.num_workers=0", "data.aspect_ratio_grouping=false")
    res = train(cfg, sys.argv[1], model_factory=tiny_maskrcnn)
    Path(sys.argv[1], "rank%s.json" % os.environ["RANK"]).write_text(json.dumps(res["skipped_data"]))
    sys.exit(res["exit_code"])
    """
)


@pytest.mark.slow
def test_ddp_train_reduces_skip_counts_over_ranks(tmp_path: Path) -> None:
    """Each rank draws its own images; a bad file found by either rank is in every rank's summary once."""
    root = write_tiny_coco(tmp_path / "data")
    data = json.loads((root / "annotations" / "train.json").read_text())
    bad = [root / "train" / im["file_name"] for im in data["images"][:2]]
    for p in bad:
        p.write_text("not an image")
    script = tmp_path / "w.py"
    script.write_text(_DDP_TRAIN.format(tests=str(TESTS), root=str(root)))
    proc = _torchrun(script, str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 == {"not_an_image": 2}
    done = [json.loads(ln) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"done"' in ln]
    assert done[-1]["skipped_data"] == {"not_an_image": 2}


# ---------------------------------------------------------------------------------------------------
# File modes without the process umask
# ---------------------------------------------------------------------------------------------------


def test_no_code_touches_the_process_umask() -> None:
    """os.umask is process-wide: setting it (even to read it back) races with every other thread's files."""
    pkg = TESTS.parent / "comask"
    offenders = [str(p.relative_to(pkg)) for p in pkg.rglob("*.py") if "os.umask(" in p.read_text()]
    assert offenders == []


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_checkpoint_writes_do_not_change_another_threads_file_modes(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread creating files while checkpoints are written: every one of its files gets the usual mode."""
    import stat
    import threading

    from comask.engine.checkpoint import create_temp_file, save_checkpoint

    def refuse(*_: object) -> int:
        raise AssertionError("os.umask called")

    ref = tmp_path / "ref"
    ref.write_text("x")
    want = stat.S_IMODE(ref.stat().st_mode)
    monkeypatch.setattr(os, "umask", refuse)
    other = tmp_path / "other"
    other.mkdir()
    stop, modes = threading.Event(), []

    def make_files() -> None:
        i = 0
        while not stop.is_set():
            p = other / f"f{i}"
            with open(p, "w") as f:
                f.write("x")
            modes.append(stat.S_IMODE(p.stat().st_mode))
            i += 1

    t = threading.Thread(target=make_files)
    t.start()
    try:
        for i in range(30):
            p = save_checkpoint({"model": {"w": torch.zeros(64)}, "iter": i}, tmp_path / "ck" / "m.pth")
            assert stat.S_IMODE(p.stat().st_mode) == want
    finally:
        stop.set()
        t.join()
    assert modes and set(modes) == {want}
    fd, p = create_temp_file(tmp_path, ".x-", ".tmp")
    os.close(fd)
    assert stat.S_IMODE(p.stat().st_mode) == want and p.name.startswith(".x-") and p.suffix == ".tmp"


# ---------------------------------------------------------------------------------------------------
# file_names that leave the image folder
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "/abs/outside.png", "..\\outside.png",
                                  "C:/data/outside.png"])
def test_path_leaves_folder(name: str) -> None:
    from comask.data.coco import path_leaves_folder

    assert path_leaves_folder(name)


@pytest.mark.parametrize("name", ["a.png", "sub/a.png", "./a.png", "a..b.png", "..a.png"])
def test_path_inside_folder(name: str) -> None:
    from comask.data.coco import path_leaves_folder

    assert not path_leaves_folder(name)


def _outside_set(tmp_path: Path) -> tuple[Path, Path]:
    """write_tiny_coco's training set with image 0 moved next to the image folder (../name) and image 1
    named by its absolute path."""
    root = write_tiny_coco(tmp_path / "data")
    ann = root / "annotations" / "train.json"
    data = json.loads(ann.read_text())
    im0, im1 = data["images"][0], data["images"][1]
    (root / "train" / im0["file_name"]).rename(root / im0["file_name"])
    im0["file_name"] = f"../{im0['file_name']}"
    im1["file_name"] = str((root / "train" / im1["file_name"]).resolve())
    ann.write_text(json.dumps(data))
    return root, ann


def test_data_check_names_file_names_outside_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from comask.cli import main

    root, ann = _outside_set(tmp_path)
    assert main(["data", "check", "--ann", str(ann), "--images", str(root / "train"), "--json"]) == 1
    r = json.loads(capsys.readouterr().out)
    outside = [e for e in r["errors"] if e["kind"] == "path_outside_images"]
    assert len(outside) == 2 and len(r["errors"]) == 2, r["errors"]
    assert "../" in outside[0]["file"] and "data.allow_outside_paths=true" in outside[0]["fix"]
    assert main(["data", "check", "--ann", str(ann), "--images", str(root / "train"), "--json",
                 "--allow-outside-paths"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [w["kind"] for w in r["warnings"]].count("path_outside_images") == 2 and not r["errors"]


def test_training_refuses_file_names_outside_the_folder_unless_allowed(tmp_path: Path) -> None:
    from comask.data.loader import build_dataset

    root, ann = _outside_set(tmp_path)
    with pytest.raises(DataError, match=r"file_name '\.\./.*' leaves the image folder.*data\.allow_outside_paths=true") as ei:
        build_dataset(tiny_cfg(root), "train")
    assert "\n" not in str(ei.value)
    n = len(json.loads(ann.read_text())["images"])
    ds = build_dataset(tiny_cfg(root, "data.allow_outside_paths=true"), "train")
    assert len(ds) == n and not ds.skipped
    for i in range(len(ds)):  # the files outside the folder are read when allowed; no stand-ins
        img, t = ds[i]
        assert img.shape[0] == 3 and t["image_id"] == ds.image_ids[i]
    assert not ds.skipped
    skipped = build_dataset(tiny_cfg(root, "data.skip_bad=true"), "train")
    assert skipped.skipped == {"path_outside_images": 2} and len(skipped) == n - 2
