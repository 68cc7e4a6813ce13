"""Reading weights files, below `modeling` and `engine` (both read them): `load_checkpoint` opens a training
checkpoint, slim weights or a bare state_dict with `torch.load(weights_only=True)`, so a file that would need to run
code to unpickle is refused instead of executed; `asset:NAME` names a file shipped in the package.
Writing checkpoints (atomic, pruned) is the engine's: `comask.engine.checkpoint`."""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from comask.errors import CheckpointError

ASSET_PREFIX = "asset:"


def resolve_asset(path: str | Path) -> Path:
    """`asset:NAME` -> the file NAME shipped in the installed package's comask/assets/ (so a config can
    name it whatever the working directory); any other path is returned unchanged."""
    text = str(path)
    if not text.startswith(ASSET_PREFIX):
        return Path(text)
    return Path(str(resources.files("comask").joinpath("assets", text[len(ASSET_PREFIX):]))).resolve()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; CheckpointError if missing, corrupt or unsafe.
    `asset:NAME` names a file shipped in the package (`resolve_asset`).

    A bare state_dict (a mapping of tensors, e.g. a torchvision weights file) is returned as
    `{"model": state_dict}`, and one under 'state_dict' is also given as 'model', so callers can always read
    `ckpt["model"]`.
    """
    path = resolve_asset(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found; check the path (--weights / --out)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (an interrupted copy?); use another checkpoint")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it may not support; the except clauses below
            # turn any such failure into one clear message.
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "weights only load failed" in msg.lower():
            raise CheckpointError(f"{path}: refused to load: {_unsafe_detail(msg)}") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(e)}); use another file") from None
    except Exception as e:  # noqa: BLE001 - any failure of the safe unpickler means "not a checkpoint"
        raise CheckpointError(
            f"{path}: not a valid PyTorch checkpoint (corrupt, truncated or another format: "
            f"{type(e).__name__}: {_first_line(e)}); use another file"
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found {type(obj).__name__}")
    obj = dict(obj)
    if "model" not in obj and isinstance(obj.get("state_dict"), Mapping):
        obj["model"] = obj["state_dict"]  # the layout of mmdetection / Lightning checkpoints
    if "model" not in obj:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {"model": obj}
        raise CheckpointError(
            f"{path}: no 'model' entry (keys: {', '.join(map(str, list(obj)[:8]))}); not a comask checkpoint"
        )
    if not isinstance(obj["model"], Mapping):
        raise CheckpointError(f"{path}: 'model' is not a state_dict")
    return obj


def read_state_dict(path: str | Path, field_name: str) -> dict[str, torch.Tensor]:
    """A state_dict from a weights-only file (read by `load_checkpoint`, so `asset:NAME` works): bare, or
    under 'model' / 'state_dict' (training scripts' checkpoints); a DataParallel 'module.' prefix is removed.
    CheckpointError names `field_name`."""
    try:
        obj: Any = load_checkpoint(path)["model"]
    except CheckpointError as e:
        raise CheckpointError(f"{field_name}: {e}") from None
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{field_name}: {path} is not a state_dict of tensors")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _unsafe_detail(msg: str) -> str:
    # torch's message names the offending global, e.g. "unsupported GLOBAL posix.system".
    m = re.search(r"GLOBAL\s+([\w.]+)", msg)
    if m:
        return (
            f"the file references the Python callable '{m.group(1)}', which would run code when unpickled. "
            "Checkpoints must hold only tensors and plain values; only load files from sources you trust"
        )
    m = re.search(r"WeightsUnpickler error:\s*(.+)", msg)
    detail = m.group(1).strip() if m else "unsupported pickle content"
    return (
        f"it is not a plain-tensor checkpoint that can be read safely with weights_only=True ({detail}); "
        "re-save it with torch.save(state_dict) from a trusted environment"
    )
