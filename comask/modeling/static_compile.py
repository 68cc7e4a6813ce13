"""`torch.compile` of an inference model's static part, chosen by `model.test.compile`.

The static part (backbone with FPN and MSFEMs, RPN head) has shapes fixed by the input size alone; the
RoI stage's shapes depend on the detections and stays eager. Modes are torch.compile's: `default`,
`reduce-overhead` (CUDA graphs on a GPU: one launch for the whole static part) and `max-autotune`;
`eager` compiles nothing. Compiling costs tens of seconds to minutes on the first image, and again on most
images of a new padded size (torch's automatic dynamic shapes cover some sizes, not most), so it pays for a
camera, video, a benchmark or a data set at one size, not for a single `comask predict` or COCO's mixed sizes.
Padding every input to a few fixed shapes would bound the compiles, but changes CoMask's output: MSFEM's
channel attention averages over the whole map, padding included. Measurements: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("eager", "default", "reduce-overhead", "max-autotune")
STATIC_PART = ("backbone", "rpn.head")


def check_compile_mode(mode: object, source: str = "config") -> None:
    from comask.config import ConfigError

    if mode not in MODES:
        raise ConfigError(f"{source}: model.test.compile must be one of {', '.join(MODES)}, got {mode!r}")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def compile_static_part(model: nn.Module, mode: str = "default") -> dict[str, nn.Module]:
    """Replace the static part by `torch.compile`d versions in place (nothing compiles until the first call);
    returns the eager modules by name, for `restore_eager`."""
    check_compile_mode(mode)
    if mode == "eager":
        return {}
    eager = {}
    for name in STATIC_PART:
        module = model.get_submodule(name)
        eager[name] = module
        _set_module(model, name, torch.compile(module, mode=mode))
    return eager


def restore_eager(model: nn.Module, eager: dict[str, nn.Module]) -> None:
    for name, module in eager.items():
        _set_module(model, name, module)


def compile_for_inference(model: nn.Module, cfg) -> dict[str, nn.Module]:
    """Compile `model`'s static part as the config's `model.test.compile` asks (after folding, on its device)."""
    return compile_static_part(model, str(cfg.model.test.get("compile", "eager")))
