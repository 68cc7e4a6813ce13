"""Process-group helpers for DDP launched by `torchrun` (env:// rendezvous).

Every helper also works in a plain single process (no process group): rank 0 of a world of 1,
so callers never branch on whether they run distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from comask.data.sampler import dist_info


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    initialized_here: bool  # True when init_distributed() created the group (so cleanup() may destroy it)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


# the data layer's query (the samplers shard with it), so rank and world have one source
def get_rank() -> int:
    return dist_info()[0]


def get_world_size() -> int:
    return dist_info()[1]


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_dist() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def launched_distributed() -> bool:
    """True when a launcher (torchrun) asked for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's env vars (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    NCCL when the ranks use CUDA, gloo otherwise. A no-op (world of 1) when not launched
    distributed; an existing group is reused as is.
    """
    if is_dist():
        return DistInfo(get_rank(), get_world_size(), get_local_rank(), dist.get_backend(), False)
    if not launched_distributed():
        return DistInfo(0, 1, 0, None, False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        # Before init so NCCL binds each rank to its own GPU.
        torch.cuda.set_device(local_rank)
    from datetime import timedelta

    dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, True)


def barrier() -> None:
    if is_dist() and get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order ([obj] in a single process)."""
    if not is_dist() or get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not is_dist() or get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (e.g. BatchNorm running statistics) to every rank.

    DDP syncs buffers at the start of each forward only, so after the last step each rank holds the
    statistics of its own last batch; evaluation and the saved model must all use rank 0's.
    """
    if not is_dist() or get_world_size() == 1:
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=src)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks, in place (used so all ranks take the same stop/skip decision)."""
    if is_dist() and get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if is_dist() and get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= get_world_size()
    return t


def cleanup(info: DistInfo | None = None) -> None:
    """Destroy the process group if it exists (and, given `info`, only if init_distributed made it)."""
    if info is not None and not info.initialized_here:
        return
    if is_dist():
        dist.destroy_process_group()
