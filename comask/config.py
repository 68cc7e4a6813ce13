"""YAML configs with `_base_` inheritance, `key=value` overrides and validation.

A config is a nested dict with attribute access (`cfg.model.msfem.branches`). Files name their
parents in `_base_` (a path relative to the file, or a list of them); later bases and the file
itself override earlier ones key by key. Built-in configs live in `comask/configs/` and are found
by name (`comask_r50_mfpn_2x_coco`) or by path.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from comask.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(UserError, ValueError):
    """A config file or override is wrong; the message names the file/key and the fix."""


class Config(dict):
    """A dict whose keys are also attributes; nested dicts become Configs."""

    def __init__(self, data: dict | None = None):
        super().__init__()
        for k, v in (data or {}).items():
            self[k] = _wrap(v)

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"config has no key '{key}' (known: {', '.join(sorted(self))})") from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = _wrap(value)

    def __deepcopy__(self, memo):
        return Config(copy.deepcopy(dict(self), memo))

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in self.items()}

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def changed_sections(saved: Any, cfg: Config, sections: tuple[str, ...]) -> list[str]:
    """The top-level `sections` in which `cfg` differs from `saved` (a resolved config as a plain dict, e.g. a
    checkpoint's or a run folder's config.yaml; anything else counts as differing everywhere)."""
    old = saved if isinstance(saved, dict) else {}
    new = cfg.to_dict()
    return [s for s in sections if old.get(s) != new.get(s)]


def _wrap(v: Any) -> Any:
    if isinstance(v, Config):
        return v
    if isinstance(v, dict):
        return Config(v)
    if isinstance(v, list):
        return [_wrap(x) for x in v]
    return v


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if k == "_delete_":
            continue
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not v.get("_delete_", False):
            out[k] = _merge(out[k], v)
        else:
            out[k] = {kk: vv for kk, vv in v.items() if kk != "_delete_"} if isinstance(v, dict) else v
    return out


def resolve_path(name_or_path: str | Path) -> Path:
    """A built-in config name, or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    for cand in (CONFIG_DIR / f"{name_or_path}.yaml", CONFIG_DIR / str(name_or_path)):
        if cand.is_file():
            return cand
    known = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config '{name_or_path}' not found: give a YAML path or one of: {', '.join(known)}")


def _load_file(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: _base_ cycle ({' -> '.join(str(s) for s in seen)})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (model, data, schedule, runtime)")
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for b in bases:
        bp = (path.parent / b) if not Path(b).is_absolute() else Path(b)
        if not bp.is_file():
            # a user's file may inherit the built-in configs by name: `_base_: comask_r50_mfpn_2x_coco.yaml`
            builtin = CONFIG_DIR / b
            if builtin.is_file():
                bp = builtin
            else:
                raise ConfigError(f"{path}: _base_ '{b}' is neither a file next to it nor a built-in config")
        merged = _merge(merged, _load_file(bp, seen + (path,)))
    return _merge(merged, data)


def apply_overrides(cfg: dict, overrides: list[str] | None) -> dict:
    """Apply `a.b.c=value` strings; the value is parsed as YAML (`1e-3`, `[1, 2]`, `null`)."""
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' must look like key.sub=value")
        key, raw = ov.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = cfg
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override '{ov}': '{'.'.join(parts[: i + 1])}' is not a section of the config")
            node = node[part]
        if parts[-1] not in node:
            near = ", ".join(sorted(node)) or "(none)"
            raise ConfigError(f"override '{ov}': unknown key '{key}' (keys here: {near})")
        node[parts[-1]] = value
    return cfg


_REQUIRED = {
    "model": ["type", "num_classes", "backbone", "fpn", "msfem", "rpn", "roi", "test"],
    "input": ["min_size_train", "max_size_train", "min_size_test", "max_size_test"],
    "data": ["train", "val"],
    "schedule": ["ims_per_batch", "base_lr", "max_iter"],
    "runtime": ["seed"],
}


# Checks of the keys a module reads, registered by that module (comask.modeling registers the model's
# vocabulary): each runs on every config loaded once its module is imported, and the module runs it again
# when it builds, so a config is checked even where nothing imported the module before loading it.
_VALIDATORS: list[Callable[[Config, str], None]] = []


def register_validator(fn: Callable[[Config, str], None]) -> Callable[[Config, str], None]:
    """Add `fn(cfg, source)`, raising ConfigError, to the checks `validate` runs (a decorator)."""
    if fn not in _VALIDATORS:
        _VALIDATORS.append(fn)
    return fn


def validate(cfg: Config, source: str = "config") -> Config:
    for section, keys in _REQUIRED.items():
        if section not in cfg:
            raise ConfigError(f"{source}: missing section '{section}' (inherit a _base_ that defines it)")
        for k in keys:
            if k not in cfg[section]:
                raise ConfigError(f"{source}: missing key '{section}.{k}'")
    m = cfg.model
    if not isinstance(m.num_classes, int) or m.num_classes < 1:
        raise ConfigError(f"{source}: model.num_classes must be a positive integer, got {m.num_classes!r}")
    if cfg.schedule.ims_per_batch < 1 or cfg.schedule.max_iter < 1:
        raise ConfigError(f"{source}: schedule.ims_per_batch and schedule.max_iter must be >= 1")
    for check in _VALIDATORS:
        check(cfg, source)
    return cfg


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a built-in config by name or a YAML file, apply overrides, validate."""
    path = resolve_path(name_or_path)
    data = apply_overrides(_load_file(path), overrides)
    cfg = Config(data)
    cfg.setdefault("name", path.stem)
    return validate(cfg, str(path))


# Keys added after checkpoints were first written, with the value a checkpoint without them gets: its stored
# config then still builds a model, and `--opts` can still set them.
_ADDED_KEYS: dict[str, Any] = {
    "model.msfem.placement": "after_fpn",  # the layout older checkpoints were trained with
    "model.collab_head.mask_skip": False,  # older checkpoints were trained without the skip conv
    "model.test.nms_after_vote": True,  # NMS again on CoMask's voted boxes (test time only)
    "model.msfem.fusion_init": "kaiming",  # initialisation only, the loaded weights replace it
    "data.allow_outside_paths": False,  # file_names leaving the image folder are refused
    "data.test": None,  # the held-out test split; older checkpoints name none
    "model.test.fold_bn": True,  # test time only: fold BatchNorm into the convs of an inference model
    "model.test.compile": "eager",  # test time only: torch.compile of the static part (modeling.static_compile)
}


def config_from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    """Rebuild a config saved in a checkpoint (already resolved, no _base_), then apply `overrides`."""
    data = copy.deepcopy(data)
    for dotted, value in _ADDED_KEYS.items():
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(leaf, value)
    return validate(Config(apply_overrides(data, overrides)), "checkpoint config")
