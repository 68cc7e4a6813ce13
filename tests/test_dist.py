"""Distributed helpers alone, and a real 2-process gloo DDP training run launched by torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import write_tiny_coco  # noqa: E402

from comask.engine import dist  # noqa: E402
from comask.engine.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402

TESTS = Path(__file__).parent


def test_single_process_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = dist.init_distributed("cpu")
    assert (info.rank, info.world_size, info.backend, info.initialized_here) == (0, 1, None, False)
    assert dist.get_rank() == 0 and dist.get_world_size() == 1 and dist.is_main_process()
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object("x") == "x"
    dist.barrier()
    dist.cleanup(info)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not dist.launched_distributed()


WORKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from _train_helpers import tiny_cfg, tiny_maskrcnn
    from comask.engine import dist
    from comask.engine.train import train
    res = train(tiny_cfg(Path({root!r}), "schedule.max_iter=4", "runtime.checkpoint_period=2"), sys.argv[1],
                model_factory=tiny_maskrcnn)
    # The process group is gone after train(); report this rank's view for the test.
    import hashlib, torch
    h = hashlib.sha256()
    for k, v in sorted(res["model"].state_dict().items()):
        h.update(k.encode()); h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    Path(sys.argv[1], "rank%s.txt" % __import__("os").environ["RANK"]).write_text(h.hexdigest())
    sys.exit(res["exit_code"])
    """
)


@pytest.mark.slow
def test_two_process_gloo_ddp_run(tmp_path: Path) -> None:
    root = write_tiny_coco(tmp_path / "data")
    script = tmp_path / "ddp_worker.py"
    script.write_text(WORKER.format(tests=str(TESTS), root=str(root)))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)],
        capture_output=True, text=True, env=env, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Both ranks ended with bit-identical weights.
    digests = [(out / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    sync = [r for r in recs if r.get("event") == "ddp_sync"]
    assert len(sync) == 1 and sync[0]["in_sync"] and len(sync[0]["digests"]) == 2
    # Only rank 0 writes: one log record per iteration, not two.
    assert [r["iter"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    ck = load_checkpoint(out / "model_0000004.pth")
    assert ck["rng"]["world_size"] == 2 and len(ck["rng"]["ranks"]) == 2
    assert [it for it, _ in list_checkpoints(out)] == [2, 4]
    assert load_checkpoint(out / "model_final.pth")["iter"] == 4
