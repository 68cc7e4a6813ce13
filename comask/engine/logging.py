"""Training progress: a tqdm bar (ETA, loss, LR), JSON lines in DIR/log.jsonl, TensorBoard under DIR/tb.

Only the main process writes; on other ranks every method is a no-op, so the training loop calls
them unconditionally.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

log = logging.getLogger("comask.train")


def format_seconds(s: float) -> str:
    if not math.isfinite(s) or s < 0:
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}"


def setup_console_logging(level: int = logging.INFO) -> None:
    """Route comask's log records to stderr through tqdm.write so they do not break the bar."""
    root = logging.getLogger("comask")
    if any(getattr(h, "_comask_console", False) for h in root.handlers):
        return
    if logging.getLogger().handlers:
        return  # the application (or pytest) configured logging: leave it alone

    class _TqdmHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                from tqdm import tqdm

                tqdm.write(self.format(record), file=sys.stderr)
            except Exception:  # noqa: BLE001 - logging must never crash training
                self.handleError(record)

    h = _TqdmHandler()
    h._comask_console = True  # type: ignore[attr-defined]
    h.setFormatter(logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%H:%M:%S"))
    root.addHandler(h)
    root.setLevel(level)


class TrainLogger:
    """Writes one JSON object per log step and mirrors the scalars to TensorBoard and the bar."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        max_iter: int,
        start_iter: int = 0,
        enabled: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
        window: int = 20,
    ):
        self.enabled = enabled
        self.max_iter = max_iter
        self.out_dir = Path(out_dir)
        self._times: deque[float] = deque(maxlen=window)
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Line-buffered append: a resumed run continues the same file, a killed run loses at most a line.
        self._jsonl = open(self.out_dir / "log.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tb"), purge_step=start_iter or None)
            except Exception as e:  # noqa: BLE001 - TensorBoard is optional; the JSON log stays
                log.warning("TensorBoard logging disabled: %s", e)
        if progress:
            from tqdm import tqdm

            tty = sys.stderr.isatty()
            self._bar = tqdm(
                total=max_iter, initial=start_iter, desc="train", unit="it", dynamic_ncols=True,
                # In a log file a bar line per update would flood it: refresh rarely there.
                mininterval=0.5 if tty else 30.0, file=sys.stderr, leave=True,
            )

    def set_max_iter(self, max_iter: int) -> None:
        """Move the end point (a time-based schedule's estimate); the ETA and the bar follow it."""
        self.max_iter = max_iter
        if self._bar is not None:
            self._bar.total = max_iter

    def iter_time(self, seconds: float) -> None:
        """Record one iteration's wall time (feeds the ETA)."""
        self._times.append(seconds)

    def seconds_per_iter(self) -> float:
        if not self._times:
            return float("nan")
        # Median of the recent window: robust to the slow first step and to evaluation pauses.
        return sorted(self._times)[len(self._times) // 2]

    def eta_seconds(self, it: int) -> float:
        return self.seconds_per_iter() * max(self.max_iter - it, 0)

    def step(self, it: int, *, lr: float, losses: dict[str, float], data_time: float | None = None,
             extra: dict[str, Any] | None = None) -> None:
        """A log step after iteration `it` (1-based count of finished iterations)."""
        if not self.enabled:
            return
        total = losses.get("loss", sum(v for k, v in losses.items() if k != "loss"))
        eta = self.eta_seconds(it)
        rec: dict[str, Any] = {
            "iter": it,
            "lr": lr,
            "loss": total,
            **{k: v for k, v in losses.items() if k != "loss"},
            "time": self.seconds_per_iter(),
            "eta_seconds": eta if math.isfinite(eta) else None,
            "eta": format_seconds(eta),
            "wall": time.time(),
        }
        if data_time is not None:
            rec["data_time"] = data_time
        if extra:
            rec.update(extra)
        self.write(rec)
        if self._tb is not None:
            self._tb.add_scalar("train/lr", lr, it)
            self._tb.add_scalar("train/loss", total, it)
            for k, v in losses.items():
                if k != "loss" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"train/{k}", v, it)
            if math.isfinite(rec["time"]):
                self._tb.add_scalar("train/time_per_iter", rec["time"], it)
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss={total:.4g} lr={lr:.3g} eta={rec['eta']}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def eval(self, it: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.write({"iter": it, "eval": metrics, "wall": time.time()})
        if self._tb is not None:
            for task, vals in metrics.items():
                if isinstance(vals, dict):
                    for k, v in vals.items():
                        if isinstance(v, (int, float)) and math.isfinite(v):
                            self._tb.add_scalar(f"eval/{task}/{k}", v, it)

    def event(self, it: int, name: str, **fields: Any) -> None:
        """A one-off record (interrupted, non-finite skip, resumed, ...)."""
        if not self.enabled:
            return
        self.write({"iter": it, "event": name, **fields, "wall": time.time()})

    def write(self, rec: dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(_finite(rec), default=_json_default) + "\n")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _finite(o: Any) -> Any:
    # JSON has no NaN/inf: write them as strings so the file stays parseable by strict readers.
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if hasattr(o, "item"):
        return o.item()
    return str(o)
