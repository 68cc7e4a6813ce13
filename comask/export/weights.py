"""`comask export weights`: a slim, weights-only checkpoint for inference, evaluation and fine-tuning.

A training run's files carry what resuming needs (optimizer momenta, scheduler, RNG states), which
doubles or triples their size. The exported file keeps only what every consumer of a checkpoint reads:
the model state_dict, the resolved config (so `comask eval`/`predict`/`serve` and `Predictor` need no
--config) and the class metadata (names and COCO category ids). With `half`, floating-point tensors are
stored as float16, halving the file again; `load_state_dict` copies them into the float32 model
(`Tensor.copy_` converts the dtype), so the file loads wherever a checkpoint is accepted, including
`runtime.load_from`. It cannot be resumed from (`--resume` needs the optimizer state).

The file is a plain dict of tensors and plain values (loads with `torch.load(weights_only=True)`) and
is written atomically by `save_checkpoint`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from comask.engine.checkpoint import checkpoint_config, load_checkpoint, load_model_weights, save_checkpoint
from comask.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = "comask-weights-1"
# float16's largest finite value; a tensor with larger magnitudes would turn into inf, so it stays float32.
_FP16_MAX = float(torch.finfo(torch.float16).max)


def _plain_state(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    prefix = "module."  # a DDP-wrapped model's keys; the exported file is always the bare model's
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def slim_state_dict(state: Mapping[str, torch.Tensor], half: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Detached, compact copies of `state`'s tensors (float16 where `half` and the values fit).

    Returns the new state and the names of floating tensors kept in float32 because float16 would
    overflow them. Integer tensors (e.g. BatchNorm's num_batches_tracked) are never converted.
    Every tensor gets its own storage: torch.save writes a view's whole underlying storage.
    """
    out: dict[str, torch.Tensor] = {}
    kept_fp32: list[str] = []
    for name, t in _plain_state(state).items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"state_dict entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu()
        if half and t.is_floating_point() and t.dtype != torch.float16:
            finite = t[torch.isfinite(t)]
            if finite.numel() and float(finite.abs().max()) > _FP16_MAX:
                kept_fp32.append(name)
                out[name] = t.clone().contiguous()
            else:
                out[name] = t.to(torch.float16).contiguous()
        else:
            out[name] = t.clone().contiguous()
    return out, kept_fp32


def export_weights(weights: str | Path, out: str | Path, *, half: bool = False, config: str | Path | None = None,
                   opts: list[str] | None = None, quiet: bool = False) -> dict[str, Any]:
    """Write the weights-only checkpoint of `weights` to `out` (float16 with `half`).

    The config stored is the checkpoint's own, or `config` (+ `opts`) when given, e.g. for a bare
    state_dict. Before writing, the slimmed weights are loaded (strictly) into a model built from that
    config, so a file that `comask eval`/`predict` or `runtime.load_from` would reject is never written.
    Returns {"path", "bytes", "source_bytes", "tensors", "params", "dtype", "kept_fp32"}.
    """
    from comask.modeling.build import build_model

    src = Path(weights)
    out = Path(out)
    if out.resolve() == src.resolve():
        raise CheckpointError(f"{out}: --out is the input checkpoint; choose another file name")
    ckpt = load_checkpoint(src, map_location="cpu")
    cfg = checkpoint_config(ckpt, src, config, opts)

    state, kept_fp32 = slim_state_dict(ckpt["model"], half=half)
    model = build_model(cfg, pretrained=False)
    load_model_weights(model, state, strict=True, source=str(src))
    if kept_fp32:
        log.warning("%d tensors kept in float32 (values beyond float16's range): %s", len(kept_fp32),
                    ", ".join(kept_fp32[:5]))

    meta = ckpt.get("meta") or {}
    obj: dict[str, Any] = {
        "model": state,
        "config": cfg.to_dict(),
        "meta": dict(meta),
        "iter": int(ckpt.get("iter", 0) or 0),
        "export": {
            "format": FORMAT,
            "source": src.name,
            "dtype": "float16" if half else "float32",
            "kept_fp32": kept_fp32,
        },
    }
    save_checkpoint(obj, out)
    n_bytes = out.stat().st_size
    params = sum(t.numel() for t in model.parameters())
    info = {
        "path": str(out), "bytes": n_bytes, "source_bytes": src.stat().st_size, "tensors": len(state),
        "params": params, "dtype": obj["export"]["dtype"], "kept_fp32": kept_fp32,
    }
    if not quiet:
        print(f"wrote {out}: {n_bytes / 1e6:.2f} MB ({n_bytes} bytes; {len(state)} tensors, {params / 1e6:.2f}M "
              f"parameters, {info['dtype']}) from {src} ({info['source_bytes'] / 1e6:.2f} MB)")
    return info
