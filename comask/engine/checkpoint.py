"""Checkpoint files: atomic writes, safe loads (`comask.checkpoint_io.load_checkpoint`, re-exported here), clear
mismatch reports.

A checkpoint is a plain dict (see docs/DESIGN.md) holding only tensors and plain Python values,
so it loads with `torch.load(weights_only=True)`: a file that would need to run code to unpickle
is refused instead of executed. Writes go to a temporary file in the same directory, are fsynced,
then renamed over the target, so a crash or SIGKILL leaves either the old file or the new one,
never a torn one.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from comask.checkpoint_io import load_checkpoint  # noqa: F401 - the reader lives below modeling; engine callers use it here
from comask.errors import CheckpointError

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^model_(\d{7,})\.pth$")
TMP_PREFIX = ".tmp-ckpt-"


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (e.g. disk full); an OSError too, for callers that handle I/O errors."""


def checkpoint_name(iteration: int) -> str:
    return f"model_{iteration:07d}.pth"


def create_temp_file(directory: str | Path, prefix: str, suffix: str = "") -> tuple[int, Path]:
    """A new, uniquely named file in `directory`, opened for writing -> (fd, path).

    Unlike `tempfile.mkstemp` (always 0600), the file gets the mode any new file gets there (0644 under
    the usual umask; default ACLs too): the kernel applies the process umask at creation, so the umask
    is never read or changed (`os.umask` is process-wide and would race with other threads' files).
    O_EXCL | O_NOFOLLOW: never opens an existing file or a planted symlink.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_BINARY", 0)
    for _ in range(100):
        p = Path(directory) / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(p, flags, 0o666), p
        except FileExistsError:
            continue
    raise FileExistsError(f"{directory}: no unused temporary file name found (prefix {prefix!r})")


def save_checkpoint(obj: Mapping[str, Any], path: str | Path) -> Path:
    """Write `obj` with torch.save atomically: temp file in the same dir + fsync + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the usual new-file mode, not mkstemp's 0600: a shared run folder or an exported file stays readable
    fd, tmp = create_temp_file(path.parent, TMP_PREFIX, ".pth")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(obj), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # Also on KeyboardInterrupt: never leave a half-written temp file behind.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not isinstance(e, CheckpointError):
            # disk full / quota / I/O error mid-run: one line for the user, the old file is untouched
            raise CheckpointWriteError(
                f"{path}: cannot write checkpoint ({e.strerror or e}); any previous checkpoint is intact; "
                "free disk space (or choose another --out) and continue with --resume"
            ) from None
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(d: Path) -> None:
    # Makes the rename itself durable; not supported everywhere (e.g. Windows), where it is skipped.
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete temp files left by a writer that was killed mid-save (only our own prefix)."""
    removed = []
    for p in Path(directory).glob(f"{TMP_PREFIX}*"):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Periodic checkpoints `model_XXXXXXX.pth` in `directory`, sorted by iteration."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_last_checkpoint(directory: str | Path) -> Path | None:
    """The periodic checkpoint with the highest iteration in `directory`, or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def prune_checkpoints(directory: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` periodic checkpoints (final/best files are never touched)."""
    if keep_last is None or keep_last <= 0:
        return []
    found = list_checkpoints(directory)
    removed = []
    for _, p in found[:-keep_last]:
        try:
            p.unlink()
            removed.append(p)
        except OSError as e:
            log.warning("could not delete old checkpoint %s: %s", p, e)
    return removed


def checkpoint_config(ckpt: Mapping[str, Any], source: str | Path, config: str | Path | None = None,
                      opts: list[str] | None = None):
    """The config to build a checkpoint's model with: `config` (+ `opts`) when given, else the resolved config
    the checkpoint stores (+ `opts`); a bare state_dict without `config` is a CheckpointError."""
    from comask.config import config_from_dict, load_config

    if config is not None:
        return load_config(config, opts)
    if isinstance(ckpt.get("config"), dict):
        return config_from_dict(ckpt["config"], opts)
    raise CheckpointError(f"{source}: checkpoint stores no config (a bare state_dict?); pass --config")


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _preview(keys: list[str], n: int = 6) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def load_model_weights(
    model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True, source: str = "checkpoint"
) -> dict[str, list[str]]:
    """Copy `state` into `model`.

    strict=True: any missing, unexpected or shape-mismatched key raises one CheckpointError that
    lists all three groups. strict=False: loads only the tensors whose name and shape match
    (e.g. a backbone trained on another class set) and returns/logs what was skipped.
    Returns {"loaded", "missing", "unexpected", "shape_mismatch"} lists of key names.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    state = _strip_prefix(state)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(
        k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    )
    mismatch_desc = [
        f"{k}: {source} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched
    ]
    report = {
        "loaded": sorted(k for k in own if k in state and k not in set(mismatched)),
        "missing": missing,
        "unexpected": unexpected,
        "shape_mismatch": mismatch_desc,
    }
    if strict and (missing or unexpected or mismatched):
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} with different shapes [{_preview(mismatch_desc, 4)}]")
        if missing:
            parts.append(f"{len(missing)} missing from the {source} [{_preview(missing)}]")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected [{_preview(unexpected)}]")
        raise CheckpointError(
            f"{source} does not match the model: " + "; ".join(parts) + ". It was made for another config "
            "or class count: use the matching --config / model.num_classes, or load only the matching "
            "weights explicitly (runtime.load_strict=false / strict=False) to fine-tune on a new class set"
        )
    to_load = {k: state[k] for k in report["loaded"]}
    # strict=False here because the filtering above already decided what is loaded.
    model.load_state_dict(to_load, strict=False)
    if not strict and (missing or unexpected or mismatched):
        log.warning(
            "%s: loaded %d tensors; skipped %d missing, %d unexpected, %d shape-mismatched (%s)",
            source, len(report["loaded"]), len(missing), len(unexpected), len(mismatched),
            _preview(mismatch_desc + missing, 4),
        )
    return report
