"""Data order for training runs that a resumed run replays exactly.

Every random choice for a sample (its crops, colour jitter, task) comes from a seed derived
from (run seed, epoch, index), not from a worker's RNG stream: the batch at a given
(epoch, step) is the same whatever the number of workers, and after a restart.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from clasp.data.collate import collate_samples


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


class EpochSeededDataset(Dataset):
    """Indexed by (epoch, i): `load(i)` runs with torch, random and numpy seeded from
    (seed, epoch, i), and the caller's random streams are left as they were."""

    def __init__(self, seed: int):
        self.seed = seed

    def load(self, index: int):
        raise NotImplementedError

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        seed = sample_seed(self.seed, epoch, index)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone: torch.manual_seed would also (lazily) seed CUDA, which
            # fork_rng(devices=[]) does not restore, and costs milliseconds per sample.
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                return self.load(index)
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded per-epoch shuffle, sharded over ranks, tail dropped) that
    yields (epoch, index) pairs and can start an epoch after `start_batch` batches."""

    def __init__(self, dataset, batch_size: int, num_replicas: int, rank: int, seed: int):
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.start_batch = 0
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{len(dataset)} images cannot fill one batch of {batch_size} on each of "
                f"{num_replicas} process(es); lower data.batch_size or add images"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.set_epoch(epoch)
        # A run resumed on fewer processes has fewer, longer epochs: never start past the end.
        self.start_batch = min(start_batch, self.batches_per_epoch)

    def __iter__(self):
        indices = list(super().__iter__())[: self.batches_per_epoch * self.batch_size]
        for index in indices[self.start_batch * self.batch_size :]:
            yield self.epoch, index

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


def make_loader(
    dataset: Dataset,
    sampler: ResumableSampler,
    config: dict,
    epoch: int,
    collate: Callable | None = None,
) -> DataLoader:
    """The loader of one epoch from the sampler's position; config data.num_workers and seed."""
    workers = config["data"]["num_workers"]
    # Its own generator: creating a loader must not draw from the global RNG, or a resumed
    # run (which creates one mid-epoch) would shift the model's random stream.
    generator = torch.Generator().manual_seed(config["seed"] * 1_000_003 + epoch)
    return DataLoader(
        dataset,
        batch_size=sampler.batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate or collate_samples,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        generator=generator,
    )
