"""Checkpoint files: atomic writes, refusing unsafe pickles, clear mismatch reports."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from comask.engine import checkpoint as ck
from comask.engine.checkpoint import (
    find_last_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    prune_checkpoints,
    save_checkpoint,
)
from comask.engine.runtime import get_rng_state, set_rng_state
from comask.errors import CheckpointError


def _ckpt(value: float) -> dict:
    return {"model": {"w": torch.full((3, 2), value)}, "iter": int(value), "config": {"a": [1, 2]},
            "meta": {"classes": ["x"], "cat_ids": [7]}}


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    p = save_checkpoint(_ckpt(1.0), tmp_path / "sub" / "model_0000001.pth")
    got = load_checkpoint(p)
    assert torch.equal(got["model"]["w"], torch.full((3, 2), 1.0))
    assert got["meta"] == {"classes": ["x"], "cat_ids": [7]}
    assert not list((tmp_path / "sub").glob(f"{ck.TMP_PREFIX}*"))


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_checkpoint_gets_the_usual_file_mode(tmp_path: Path) -> None:
    """Not the temp file's owner-only 0600: an exported or shared checkpoint is readable like any new file."""
    ref = tmp_path / "ref.txt"
    ref.write_text("x")  # the mode any new file gets here (0644 under the usual umask 022)
    p = save_checkpoint(_ckpt(1.0), tmp_path / "m.pth")
    assert stat.S_IMODE(p.stat().st_mode) == stat.S_IMODE(ref.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    # read without os.umask (which sets it process-wide): Linux reports it in /proc/self/status
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    pytest.skip("no Umask line in /proc/self/status")


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model_0000002.pth"
    save_checkpoint(_ckpt(1.0), target)
    real_save = torch.save

    def torn_save(obj, f, *a, **k):
        # Write the start of a real checkpoint, then die as if the process were killed.
        real_save(obj, f, *a, **k)
        f.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(_ckpt(2.0), target)
    monkeypatch.undo()
    got = load_checkpoint(target)
    assert torch.equal(got["model"]["w"], torch.full((3, 2), 1.0)), "previous checkpoint must survive"
    assert not list(tmp_path.glob(f"{ck.TMP_PREFIX}*")), "temp file must be cleaned up"


def test_truncated_and_junk_files_are_clear_errors(tmp_path: Path) -> None:
    good = save_checkpoint(_ckpt(1.0), tmp_path / "good.pth")
    torn = tmp_path / "torn.pth"
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a checkpoint")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    for p in (torn, junk, empty):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(p)
        assert str(p) in str(e.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["legacy_pickle", "torch_zip"])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if fmt == "legacy_pickle":
        # Plain pickle of plain values (a pickled tensor would be refused before reaching the payload).
        with open(path, "wb") as f:
            pickle.dump({"model": {}, "iter": 1, "x": _Evil(marker)}, f, protocol=2)
    else:
        torch.save({"model": {"w": torch.zeros(1)}, "iter": 1, "x": _Evil(marker)}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert not marker.exists(), "loading must never execute the payload"
    msg = str(e.value)
    assert str(path) in msg and "refused" in msg
    assert "system" in msg and "run code" in msg
    # Control: the payload is live, an unsafe load does run it.
    if fmt == "legacy_pickle":
        with open(path, "rb") as f:
            pickle.load(f)
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


def test_bare_state_dict_is_accepted(tmp_path: Path) -> None:
    p = tmp_path / "weights.pth"
    torch.save({"a.weight": torch.ones(2)}, p)
    assert set(load_checkpoint(p)["model"]) == {"a.weight"}


def test_find_last_and_prune(tmp_path: Path) -> None:
    assert find_last_checkpoint(tmp_path) is None
    for it in (5, 10, 20, 15):
        save_checkpoint(_ckpt(float(it)), tmp_path / ck.checkpoint_name(it))
    (tmp_path / "model_final.pth").write_bytes(b"x")
    (tmp_path / "model_best.pth").write_bytes(b"x")
    (tmp_path / f"{ck.TMP_PREFIX}abc.pth").write_bytes(b"half")
    assert find_last_checkpoint(tmp_path).name == "model_0000020.pth"
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["model_0000005.pth", "model_0000010.pth"]
    assert [it for it, _ in list_checkpoints(tmp_path)] == [15, 20]
    assert (tmp_path / "model_final.pth").exists() and (tmp_path / "model_best.pth").exists()
    assert ck.remove_stale_temp_files(tmp_path) and not list(tmp_path.glob(f"{ck.TMP_PREFIX}*"))


def _net(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, num_classes))


def test_mismatch_lists_every_kind_of_problem() -> None:
    src = _net(5).state_dict()
    src["extra.weight"] = torch.zeros(1)
    del src["1.running_mean"]
    with pytest.raises(CheckpointError) as e:
        load_model_weights(_net(9), src, source="ck.pth")
    msg = str(e.value)
    assert "3.weight: ck.pth (5, 4) vs model (9, 4)" in msg
    assert "3.bias" in msg
    assert "1.running_mean" in msg and "missing" in msg
    assert "extra.weight" in msg and "unexpected" in msg
    assert "strict=False" in msg


def test_non_strict_loads_what_matches() -> None:
    src_model, dst = _net(5), _net(9)
    with torch.no_grad():
        for p in src_model.parameters():
            p.fill_(0.5)
    before_head = dst[3].weight.clone()
    report = load_model_weights(dst, src_model.state_dict(), strict=False)
    assert torch.equal(dst[0].weight, src_model[0].weight)
    assert torch.equal(dst[3].weight, before_head), "mismatched head must stay as initialised"
    assert sorted(k.split(":")[0] for k in report["shape_mismatch"]) == ["3.bias", "3.weight"]
    assert "0.weight" in report["loaded"] and "3.weight" not in report["loaded"]


def test_ddp_prefix_is_stripped() -> None:
    src = {f"module.{k}": v for k, v in _net(2).state_dict().items()}
    report = load_model_weights(_net(2), src)
    assert not report["missing"] and not report["unexpected"]


def test_rng_state_survives_weights_only_round_trip(tmp_path: Path) -> None:
    import random

    import numpy as np

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # exercise numpy's cached-gaussian field
    state = get_rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    p = save_checkpoint({"model": {}, "rng": state}, tmp_path / "rng.pth")
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(load_checkpoint(p)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]


def test_config_of_a_checkpoint_from_before_a_key_was_added():
    """A checkpoint whose stored config predates model.test.nms_after_vote and model.collab_head.mask_skip
    still builds, gets the values such checkpoints were made with, accepts --opts for them, and is not
    modified in place."""
    import copy

    from comask.config import load_config

    saved = load_config("comask_r18_mfpn_shapes").to_dict()
    del saved["model"]["test"]["nms_after_vote"]
    del saved["model"]["collab_head"]["mask_skip"]
    ckpt = {"model": {}, "config": saved}
    before = copy.deepcopy(saved)
    cfg = ck.checkpoint_config(ckpt, "old.pth")
    assert cfg.model.test.nms_after_vote is True and cfg.model.collab_head.mask_skip is False
    cfg = ck.checkpoint_config(ckpt, "old.pth", opts=["model.test.nms_after_vote=false", "model.test.nms_thresh=0.4"])
    assert cfg.model.test.nms_after_vote is False and cfg.model.test.nms_thresh == 0.4
    assert saved == before
