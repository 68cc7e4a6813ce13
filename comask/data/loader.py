"""DataLoaders for training (infinite, grouped, seeded) and testing (sharded across ranks)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from comask.data.coco import CocoDataset
from comask.data.images import MAX_PIXELS
from comask.data.sampler import GroupedInfiniteBatchSampler, InferenceSampler, dist_info
from comask.errors import DataError


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Images differ in size, so a batch stays a list (the model pads)."""
    return [b[0] for b in batch], [b[1] for b in batch]


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker as base_seed + worker_id (base_seed from the loader's generator);
    # derive numpy's and random's seeds from it so every library is reproducible too.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def build_dataset(cfg: Any, split: str = "train", *, train: bool | None = None, **kwargs: Any) -> CocoDataset:
    """A CocoDataset for `cfg.data[split]` ({ann, images}) with the config's input/data settings."""
    train = (split == "train") if train is None else train
    d, inp = cfg.data, cfg.input
    if split not in d or not isinstance(d[split], dict) or "ann" not in d[split] or "images" not in d[split]:
        raise DataError(f"config data.{split} must be {{ann: FILE, images: DIR}}")
    args: dict[str, Any] = dict(
        train=train,
        min_sizes=inp.min_size_train if train else [inp.min_size_test],
        max_size=inp.max_size_train if train else inp.max_size_test,
        flip_prob=d.get("flip_prob", 0.5),
        photometric=d.get("photometric", False),
        keep_empty=d.get("keep_empty", True),
        skip_bad=d.get("skip_bad", False),
        check_files=d.get("check_files", True),
        max_pixels=d.get("max_image_pixels", None) or MAX_PIXELS,
        allow_outside_paths=bool(d.get("allow_outside_paths", False)),
    )
    args.update(kwargs)
    return CocoDataset(d[split]["ann"], d[split]["images"], **args)


def build_train_loader(
    cfg: Any, dataset: torch.utils.data.Dataset, *, distributed: bool = False, seed: int = 0, start_iter: int = 0
) -> torch.utils.data.DataLoader:
    """Infinite loader of aspect-grouped batches of ims_per_batch // world_size images per rank.

    The batch sequence is a function of `seed`; `start_iter` starts it at that batch (a resumed run)
    without loading the images of the earlier ones."""
    rank, world = dist_info(distributed)
    ims = int(cfg.schedule.ims_per_batch)
    if ims % world or ims < world:
        raise DataError(f"schedule.ims_per_batch={ims} must be a multiple of the number of processes ({world})")
    batch = ims // world
    grouping = bool(cfg.data.get("aspect_ratio_grouping", True))
    if grouping and hasattr(dataset, "aspect_groups"):
        groups = dataset.aspect_groups()
    else:
        groups = [0] * len(dataset)
    sampler = GroupedInfiniteBatchSampler(groups, batch, seed=seed, rank=rank, world_size=world,
                                          start_iter=start_iter)
    workers = int(cfg.data.get("num_workers", 0) or 0)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        worker_init_fn=_seed_worker,
        # per-rank generator: worker seeds (and so augmentations) differ across ranks yet repeat across runs
        generator=torch.Generator().manual_seed(seed + 1000003 * rank),
        persistent_workers=workers > 0,
    )


def build_test_loader(
    dataset: torch.utils.data.Dataset, batch_size: int = 1, *, distributed: bool = False, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """Each image once, in order; with `distributed`, each rank gets a contiguous shard."""
    rank, world = dist_info(distributed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=max(1, int(batch_size)),
        sampler=InferenceSampler(len(dataset), rank=rank, world_size=world),
        num_workers=num_workers,
        collate_fn=collate,
        worker_init_fn=_seed_worker,
    )
