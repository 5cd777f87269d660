"""Pre-training data: multi-crop views, a drawn task and the teacher's pseudo-labels per image,
in an order that a resumed run replays exactly.

Every random choice for a sample (its crops, colour jitter, task) comes from a seed derived
from (run seed, epoch, index), not from a worker's RNG stream: the batch at a given
(epoch, step) is the same whatever the number of workers, and after a restart.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from clasp.data.build import build_dataset
from clasp.data.transforms import MultiCrop, collate_samples

log = logging.getLogger("clasp.train")

PARTS_KEY = "pseudo_parts"


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


class PretrainDataset(Dataset):
    """Wraps a person dataset. Index with (epoch, i); returns a dict with
    "crops" (list of n_global + n_local float tensors), "task" (int), "index",
    PARTS_KEY (list of per-crop (gh, gw) int64 pseudo part labels, -1 = none) and
    "pseudo_attributes" (A,) float (NaN when the image is not in the label cache) when a
    label cache is given."""

    def __init__(
        self,
        dataset,
        crop: MultiCrop,
        task_probs: torch.Tensor,
        seed: int,
        cache=None,
        keys: list[str] | None = None,
    ):
        self.dataset = dataset
        self.crop = crop
        self.task_probs = task_probs
        self.seed = seed
        self.cache = cache
        self.keys = keys
        if cache is not None:
            self.num_attributes = len(cache.attribute_names)
            self.grid = cache.grid_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, index = item
        seed = sample_seed(self.seed, epoch, index)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                return self._load(index, seed)
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)

    def _load(self, index: int, seed: int) -> dict:
        sample = self.dataset[index]
        index = sample["index"]  # the dataset may have replaced an unreadable file
        task = int(torch.multinomial(self.task_probs, 1))
        view = {"image": sample["image"]}
        attributes = None
        if self.cache is not None:
            labels = self.cache.get(self.keys[index])
            if labels is None:
                view[PARTS_KEY] = torch.full(self.grid, -1, dtype=torch.int64)
                attributes = torch.full((self.num_attributes,), float("nan"))
            else:
                view[PARTS_KEY] = labels["parts"]
                attributes = labels["attributes"].float()
        out = self.crop(view)
        result = {"crops": out["crops"], "task": task, "index": index}
        if self.cache is not None:
            result[PARTS_KEY] = out["crop_labels"][PARTS_KEY]
            result["pseudo_attributes"] = attributes
        if "skipped" in sample:
            result["skipped"] = sample["skipped"]
        return result


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


def build_pretrain_data(config: dict, rank: int, world_size: int, patch_size: int):
    """(PretrainDataset, ResumableSampler, label cache or None) from a training config."""
    data, crops, model = config["data"], config["crops"], config["model"]
    if not data["root"]:
        raise ValueError("data.root is not set: point it at a folder of person images")
    dataset = build_dataset(data["format"], data["root"], data["split"], on_error="replace")
    cache = keys = None
    if data["labels"]:
        from clasp.teacher.cache import LabelCache, file_sha256

        cache = LabelCache(data["labels"])
        keys = [file_sha256(path) for path in dataset.paths]
        covered = sum(key in cache for key in keys)
        log.info(
            "pseudo-labels from %s: %d of %d images labelled (%d parts, %d attributes)",
            data["labels"], covered, len(keys), len(cache.part_names), len(cache.attribute_names),
        )  # fmt: skip
        if covered == 0:
            raise ValueError(
                f"none of the {len(keys)} images under {data['root']} is in the label cache "
                f"{data['labels']}; run `clasp label --images {data['root']} --out CACHE` first"
            )
    else:
        log.info(
            "no label cache (data.labels): training self-distillation only; the part and "
            "attribute pseudo-label losses are off"
        )
    tasks = config["model"]["tasks"]
    sampling = config["tasks"]["sampling"]
    probs = torch.tensor([float(sampling.get(t, 0.0)) for t in tasks])
    if (probs < 0).any() or probs.sum() <= 0:
        raise ValueError(
            f"tasks.sampling must give non-negative weights, some positive: {sampling}"
        )
    crop = MultiCrop(
        global_size=tuple(model["img_size"]),
        local_size=tuple(crops["local_size"]),
        n_global=crops["n_global"],
        n_local=crops["n_local"],
        global_scale=tuple(crops["global_scale"]),
        local_scale=tuple(crops["local_scale"]),
        flip_p=crops["flip_p"],
        color_jitter=tuple(crops["color_jitter"]) if crops["color_jitter"] else None,
        jitter_p=crops["jitter_p"],
        grayscale_p=crops["grayscale_p"],
        label_keys={PARTS_KEY: "patch"} if cache is not None else {},
        patch_size=patch_size,
        focus_key=PARTS_KEY if crops["locals_on_person"] else None,
    )
    pretrain = PretrainDataset(dataset, crop, probs / probs.sum(), config["seed"], cache, keys)
    sampler = ResumableSampler(pretrain, data["batch_size"], world_size, rank, config["seed"])
    return pretrain, sampler, cache


def make_loader(
    dataset: PretrainDataset, sampler: ResumableSampler, config: dict, epoch: int
) -> DataLoader:
    workers = config["data"]["num_workers"]
    # Its own generator: creating a loader must not draw from the global RNG, or a resumed
    # run (which creates one mid-epoch) would shift the model's random stream.
    generator = torch.Generator().manual_seed(config["seed"] * 1_000_003 + epoch)
    return DataLoader(
        dataset,
        batch_size=sampler.batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_samples,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        generator=generator,
    )
