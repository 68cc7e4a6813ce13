"""Batch samplers: infinite, seeded, aspect-ratio grouped training batches; sharded test order.

Training: every "epoch" is a permutation of all indices drawn from `seed + epoch` (identical on all
ranks); rank r takes positions r, r + world, r + 2*world, ... so ranks see disjoint shards of each
epoch. Indices are then bucketed by aspect group (w >= h, w < h) and a batch is emitted whenever a
bucket holds `batch_size` indices, so every batch has a single orientation (less padding).
`start_iter` starts the stream at that batch of the same sequence (a resumed run): the earlier
batches are formed from indices only and dropped, so no data is loaded for them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist


def dist_info(distributed: bool = True) -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when it is initialised, else (0, 1)."""
    if distributed and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GroupedInfiniteBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Infinite stream of batches whose members share an aspect group; seeded and shardable."""

    def __init__(
        self,
        group_ids: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        start_iter: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if len(group_ids) == 0:
            raise ValueError("cannot sample batches from an empty data set")
        if start_iter < 0:
            raise ValueError(f"start_iter must be >= 0, got {start_iter}")
        self.group_ids = torch.as_tensor(list(group_ids), dtype=torch.int64)
        self.batch_size = batch_size
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.start_iter = int(start_iter)

    def indices(self) -> Iterator[int]:
        """This rank's infinite index stream (before grouping)."""
        n = len(self.group_ids)
        epoch = 0
        while True:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(n, generator=g)
            else:
                order = torch.arange(n)
            # a shard smaller than a batch (tiny data set, many ranks) still makes progress: it wraps.
            yield from order[self.rank :: self.world_size].tolist()
            epoch += 1

    def __iter__(self) -> Iterator[list[int]]:
        buckets: dict[int, list[int]] = {}
        groups = self.group_ids.tolist()
        skip = self.start_iter  # the batches before start_iter: formed (the buckets carry over), not yielded
        for idx in self.indices():
            b = buckets.setdefault(groups[idx], [])
            b.append(idx)
            if len(b) == self.batch_size:
                if skip:
                    skip -= 1
                else:
                    yield list(b)
                b.clear()


class InferenceSampler(torch.utils.data.Sampler[int]):
    """Each index exactly once over all ranks: rank r gets a contiguous slice (for gathered evaluation)."""

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1):
        per = (size + world_size - 1) // world_size if world_size else size
        self.start = min(size, rank * per)
        self.end = min(size, self.start + per)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end))

    def __len__(self) -> int:
        return self.end - self.start
