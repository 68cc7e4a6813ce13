"""Aspect-grouped infinite sampler, its distributed sharding, and the loaders built on it."""

from __future__ import annotations

import itertools

import pytest
import torch

from comask.config import Config
from comask.data.coco import CocoDataset
from comask.data.loader import build_test_loader, build_train_loader, collate
from comask.data.sampler import GroupedInfiniteBatchSampler, InferenceSampler
from comask.errors import DataError


def test_batches_share_one_aspect_group() -> None:
    groups = [0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 0, 1]
    s = GroupedInfiniteBatchSampler(groups, 3, seed=0)
    batches = list(itertools.islice(iter(s), 40))
    assert all(len(b) == 3 for b in batches)
    for b in batches:
        assert len({groups[i] for i in b}) == 1
    seen = set(itertools.chain.from_iterable(batches))
    assert seen == set(range(len(groups)))  # infinite and covers everything


def test_seeded_and_seed_sensitive() -> None:
    groups = [i % 2 for i in range(50)]

    def first(seed: int) -> list[list[int]]:
        return list(itertools.islice(iter(GroupedInfiniteBatchSampler(groups, 4, seed=seed)), 10))

    assert first(3) == first(3)
    assert first(3) != first(4)


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_shards_are_disjoint_and_cover(world: int) -> None:
    n = 31
    groups = [int(i % 3 == 0) for i in range(n)]
    shards = []
    for r in range(world):
        s = GroupedInfiniteBatchSampler(groups, 2, seed=7, rank=r, world_size=world)
        per = len(range(r, n, world))
        shards.append(list(itertools.islice(s.indices(), per)))  # exactly one epoch of this rank
    for a, b in itertools.combinations(shards, 2):
        assert not set(a) & set(b)
    assert sorted(itertools.chain.from_iterable(shards)) == list(range(n))


def test_inference_sampler_shards_once() -> None:
    parts = [list(InferenceSampler(10, rank=r, world_size=3)) for r in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(InferenceSampler(2, rank=2, world_size=3)) == []


def _cfg(ims: int = 2, workers: int = 0, grouping: bool = True) -> Config:
    return Config({"schedule": {"ims_per_batch": ims},
                   "data": {"num_workers": workers, "aspect_ratio_grouping": grouping}})


def test_train_loader_batches_and_determinism(tiny_coco) -> None:
    ds = CocoDataset(tiny_coco.ann, tiny_coco.images, train=True, min_sizes=(24, 32), max_size=64)
    groups = ds.aspect_groups()

    def run(seed: int) -> list:
        torch.manual_seed(123)
        out = []
        for images, targets in itertools.islice(iter(build_train_loader(_cfg(2), ds, seed=seed)), 4):
            assert len(images) == 2 and len(targets) == 2
            assert len({groups[ds.image_ids.index(t["image_id"])] for t in targets}) == 1
            out.append([(t["image_id"], tuple(im.shape)) for im, t in zip(images, targets)])
        return out

    assert run(0) == run(0)


def test_train_loader_workers_reproducible(tiny_coco) -> None:
    ds = CocoDataset(tiny_coco.ann, tiny_coco.images, train=True, min_sizes=(16, 24, 32), max_size=64)

    def run() -> list:
        loader = build_train_loader(_cfg(2, workers=1), ds, seed=5)
        return [[tuple(im.shape) for im in images] + [float(images[0].sum())]
                for images, _ in itertools.islice(iter(loader), 3)]

    assert run() == run()


def test_batch_must_divide_world(tiny_coco) -> None:
    ds = CocoDataset(tiny_coco.ann, tiny_coco.images, train=True)
    with pytest.raises(DataError, match="ims_per_batch"):
        build_train_loader(_cfg(0), ds)


def test_test_loader_visits_each_image_once(tiny_coco) -> None:
    ds = CocoDataset(tiny_coco.ann, tiny_coco.images, train=False)
    ids = [t["image_id"] for _, targets in build_test_loader(ds, 3) for t in targets]
    assert ids == [1, 2, 3, 4]


def test_collate_keeps_lists() -> None:
    a, b = (torch.zeros(3, 4, 5), {"x": 1}), (torch.zeros(3, 6, 2), {"x": 2})
    images, targets = collate([a, b])
    assert [tuple(i.shape) for i in images] == [(3, 4, 5), (3, 6, 2)] and targets == [{"x": 1}, {"x": 2}]


def test_train_loader_uses_torch_distributed_rank(tiny_coco, monkeypatch) -> None:
    """With torch.distributed initialised, each rank gets ims_per_batch // world images from a disjoint shard."""
    import torch.distributed as dist

    ds = CocoDataset(tiny_coco.ann, tiny_coco.images, train=True, min_sizes=(16,), max_size=64)
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_rank", lambda r=rank: r)
        loader = build_train_loader(_cfg(4, grouping=False), ds, distributed=True, seed=3)
        sampler = loader.batch_sampler
        assert (sampler.rank, sampler.world_size, sampler.batch_size) == (rank, 2, 2)
        seen.append(set(itertools.islice(sampler.indices(), 2)))  # one epoch: 4 images / 2 ranks
        test_ids = [t["image_id"] for _, ts in build_test_loader(ds, 1, distributed=True) for t in ts]
        assert len(test_ids) == 2
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(len(ds)))
    # without distributed=True the same process sees the whole data set
    assert build_train_loader(_cfg(4), ds).batch_sampler.world_size == 1
