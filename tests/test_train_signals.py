"""Real process kills: SIGTERM writes a checkpoint and exits 143; SIGKILL never leaves a torn checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import write_tiny_coco  # noqa: E402

from comask.engine.checkpoint import TMP_PREFIX, list_checkpoints, load_checkpoint  # noqa: E402

TESTS = Path(__file__).parent

WORKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from _train_helpers import tiny_cfg, tiny_maskrcnn
    from comask.engine.train import train
    from pathlib import Path
    res = train(tiny_cfg(Path({root!r}), *sys.argv[3:]), sys.argv[1], resume=sys.argv[2] == "resume",
                model_factory=tiny_maskrcnn)
    sys.exit(res["exit_code"])
    """
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_coco(tmp_path_factory.mktemp("tiny_coco_sig"))


def _start(tmp_path: Path, data_root: Path, out: Path, resume: bool, *opts: str) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(TESTS), root=str(data_root)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), str(out), "resume" if resume else "new", *opts],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
    )


def _iters_logged(out: Path) -> int:
    p = out / "log.jsonl"
    if not p.exists():
        return 0
    return sum(1 for line in p.read_text().splitlines() if '"loss"' in line)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("worker made no progress")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_143(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start(tmp_path, data_root, out, False, "schedule.max_iter=10000", "runtime.checkpoint_period=10000")
    _wait_for(lambda: _iters_logged(out) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output
    assert "SIGTERM" in output and "--resume" in output
    ckpts = list_checkpoints(out)
    assert len(ckpts) == 1
    it, path = ckpts[0]
    ck = load_checkpoint(path)
    assert ck["iter"] == it >= 2 and "optimizer" in ck
    # Every finished step was kept: the checkpoint is at the last logged iteration.
    assert it == _iters_logged(out)
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"event"' in line]
    assert events[-1]["event"] == "interrupted" and events[-1]["signal"] == "SIGTERM"
    assert not (out / "model_final.pth").exists()


@pytest.mark.slow
def test_sigkill_loses_at_most_one_period_and_resumes(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # A checkpoint after every step so the kill has a good chance of landing inside a write.
    proc = _start(tmp_path, data_root, out, False, "schedule.max_iter=10000", "runtime.checkpoint_period=1",
                  "runtime.keep_last=2")
    _wait_for(lambda: len(list_checkpoints(out)) >= 2, proc)
    time.sleep(random.uniform(0.0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    ckpts = list_checkpoints(out)
    assert ckpts, "checkpoints written before the kill must survive"
    for it, path in ckpts:  # none is torn
        assert load_checkpoint(path)["iter"] == it
    last = ckpts[-1][0]
    # At most the step in flight is lost (checkpoint_period=1).
    assert last >= _iters_logged(out) - 1

    proc = _start(tmp_path, data_root, out, True, f"schedule.max_iter={last + 2}", "runtime.checkpoint_period=1",
                  "runtime.keep_last=2")
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output
    assert load_checkpoint(out / "model_final.pth")["iter"] == last + 2
    resumed = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"resumed"' in line]
    assert resumed and resumed[-1]["iter"] == last
    assert not list(out.glob(f"{TMP_PREFIX}*")), "temp files of the killed writer are cleaned up on resume"
