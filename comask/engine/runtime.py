"""Run plumbing shared by train, eval, predict, serve and bench: the device, the AMP dtype and autocast,
the output folder, the RNG streams. Imports nothing else of `comask.engine`, so every entry point can
use it without importing another."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from comask.config import ConfigError
from comask.errors import UserError


def parse_size(size: str | tuple[int, int] | list[int] | None, flag: str = "--size") -> tuple[int, int] | None:
    """'HxW', one number for a square, or (H, W) -> (H, W), each side 16..8192 pixels; None stays None.
    A one-line ConfigError (a UserError) naming `flag` otherwise. Used by export, bench and the load test."""
    if size is None:
        return None
    if isinstance(size, (tuple, list)):
        parts = [str(v) for v in size]
    else:
        parts = str(size).strip().lower().split("x")
        parts = parts * 2 if len(parts) == 1 else parts
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"{flag} must be HxW in pixels (or one number for a square), e.g. 512x512; got {size!r}")
    h, w = (int(p) for p in parts)
    if not (16 <= h <= 8192 and 16 <= w <= 8192):
        raise ConfigError(f"{flag} {h}x{w}: height and width must be within 16..8192 pixels")
    return h, w


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Device and AMP
# ---------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None, *, local_rank: int | None = None,
                   setting: str = "--device") -> torch.device:
    """auto (CUDA when available), cpu, cuda or cuda:N -> a torch.device; the one device rule of the
    package. Under DDP (`local_rank` given) every CUDA rank uses its own GPU, whatever index was
    asked. Errors are UserErrors naming `setting` (the flag or config key the value came from)."""
    if device is None or str(device).lower() == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(str(device).lower() if isinstance(device, str) else device)
    except RuntimeError:
        raise UserError(f"{setting}: unknown device {str(device)!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"{setting}: device {str(device)!r} is not supported; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{setting}={device} but CUDA is not available here; use cpu (or auto)")
        if local_rank is not None:
            return torch.device("cuda", local_rank)
    return dev


def amp_dtype(amp: str | None, *, setting: str = "runtime.amp", off: str = "null") -> torch.dtype | None:
    """`runtime.amp` / `--amp`: None (float32), bf16 or fp16 -> None or the autocast dtype. CPU autocast runs
    both dtypes (bf16 is the one CPUs accelerate); fp16 adds a GradScaler when training, on either device.
    A ConfigError names `setting` and says how float32 is asked for (`off`)."""
    if amp in (None, "", "none", False):
        return None
    if amp not in AMP_DTYPES:
        raise ConfigError(f"{setting} must be {off}, bf16 or fp16, got {amp!r}")
    return AMP_DTYPES[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """torch.autocast on `device` with `dtype`; nothing (float32) when dtype is None."""
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Output directory
# ---------------------------------------------------------------------------------------------


class OutputDirError(UserError):
    """The run directory cannot be used (not writable, no free space, already holds a run)."""


def check_output_dir(out_dir: str | Path, min_free_mb: float) -> None:
    """Create `out_dir` if needed and prove it is writable with `min_free_mb` free, or raise OutputDirError."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(
            f"output directory {out}: cannot create it ({e.strerror or e}); choose a writable --out"
        ) from None
    if not out.is_dir():
        raise OutputDirError(f"output directory {out}: exists and is not a directory; choose another --out")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise OutputDirError(
            f"output directory {out}: not writable ({e.strerror or e}); fix its permissions or choose another --out"
        ) from None
    free_mb = shutil.disk_usage(out).free / 2**20
    if min_free_mb and free_mb < float(min_free_mb):
        raise OutputDirError(
            f"output directory {out}: only {free_mb:.0f} MB free, runtime.min_free_mb asks for "
            f"{float(min_free_mb):.0f} MB (checkpoints and logs); free some space or choose another --out"
        )


# ---------------------------------------------------------------------------------------------
# RNG state: saved as tensors / lists so torch.load(weights_only=True) accepts it
# ---------------------------------------------------------------------------------------------


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    version, py_state, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        ("MT19937", npst["keys"].numpy().astype(np.uint32), int(npst["pos"]), int(npst["has_gauss"]),
         float(npst["cached_gaussian"]))
    )
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu().to(torch.uint8) for s in cuda_states])


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (evaluation) without moving the training RNG streams, so evaluating or not
    evaluating at some iteration never changes the training that follows."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
