"""ImageNet weights for the backbone body: a local file or `torchvision:WEIGHTS_NAME`.

`torchvision:IMAGENET1K_V1` is resolved through torchvision's weight enums (ResNet18_Weights, ...,
MobileNet_V3_Large_Weights) to the file torch.hub keeps in `$TORCH_HOME/hub/checkpoints`: taken from
there when present, downloaded (with a progress bar) when not, and without a network a one-line error
that names the file and the folder to put it in. `COMASK_OFFLINE=1` never tries the network (the tests set it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torchvision import models

from comask.errors import CheckpointError

log = logging.getLogger("comask.imagenet")

PREFIX = "torchvision:"
_ENUMS = {
    ("resnet", 18): models.ResNet18_Weights,
    ("resnet", 34): models.ResNet34_Weights,
    ("resnet", 50): models.ResNet50_Weights,
    ("resnet", 101): models.ResNet101_Weights,
    ("resnet", 152): models.ResNet152_Weights,
    ("mobilenet_v3_large", None): models.MobileNet_V3_Large_Weights,
    ("mobilenet_v3_small", None): models.MobileNet_V3_Small_Weights,
}


def _enum(name: str, depth: int) -> type:
    key = (name, depth if name == "resnet" else None)
    if key not in _ENUMS:
        raise CheckpointError(f"model.backbone.weights: torchvision has no ImageNet weights for {name} {depth}")
    return _ENUMS[key]


def hub_file(spec: str, name: str, depth: int) -> tuple[str, Path]:
    """(download url, cache path) of `torchvision:WEIGHTS_NAME` for this backbone."""
    enum = _enum(name, depth)
    tag = spec[len(PREFIX):]
    if tag not in enum.__members__:
        raise CheckpointError(
            f"model.backbone.weights: {spec!r} is not one of {', '.join(PREFIX + k for k in enum.__members__)}"
        )
    url = enum[tag].url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def resolve_weights(spec: str | Path, name: str, depth: int) -> Path:
    """A local path for `model.backbone.weights`: the path itself, or the torch.hub cache file of a
    `torchvision:` name, downloaded there first when it is missing."""
    if not str(spec).startswith(PREFIX):
        return Path(spec)
    url, path = hub_file(str(spec), name, depth)
    if path.is_file():
        return path
    advice = (f"model.backbone.weights: {spec} needs {path.name} in {path.parent}, which is not there and "
              f"{{why}}; download {url} into that folder (or set TORCH_HOME), or set model.backbone.weights=null "
              "to train from scratch")
    if os.environ.get("COMASK_OFFLINE", "") not in ("", "0"):
        raise CheckpointError(advice.format(why="COMASK_OFFLINE is set"))
    log.info("downloading %s to %s", url, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=True)
    except Exception as e:  # no network, proxy, disk: the same advice
        raise CheckpointError(advice.format(why=f"could not be downloaded ({type(e).__name__})")) from None
    return path
