"""Pre-training data: multi-crop views, a drawn task and the teacher's pseudo-labels per image,
in an order that a resumed run replays exactly (see `clasp.train.data`)."""

from __future__ import annotations

import logging
from typing import TypedDict

import torch

from clasp.data.build import build_dataset
from clasp.data.images import open_error_reason
from clasp.data.transforms import MultiCrop

from .data import EpochSeededDataset, ResumableSampler

log = logging.getLogger("clasp.train")


class PretrainBatch(TypedDict, total=False):
    """What the pre-training loader yields and `PretrainStep` consumes (B samples)."""

    crops: list[torch.Tensor]  # n_global + n_local crops (B, 3, h, w), normalised, global first
    task: torch.Tensor  # (B,) int64: the task each sample drew
    index: torch.Tensor  # (B,) int64: dataset index of each sample
    pseudo_parts: list[torch.Tensor]  # with labels: per global and local crop (B, gh, gw) int64,
    #                                   -1 = no label
    pseudo_attributes: torch.Tensor  # with labels: (B, A) soft attribute labels, NaN = unknown
    caption_id: torch.Tensor  # with loss.image_text: (B,) int64 row of the caption table,
    #                           -1 = no caption (`clasp.train.captions`)
    skipped: list[str]  # unreadable files that other samples replaced


class PretrainDataset(EpochSeededDataset):
    """Wraps a person dataset. Index with (epoch, i); returns one sample of a `PretrainBatch`:
    "crops" (list of n_global + n_local float tensors), "task" (int), "index", and with a
    label cache "pseudo_parts" (list of per-crop (gh, gw) int64, -1 = none) and
    "pseudo_attributes" (A,) float (NaN when the image is not in the cache), and with
    `caption_ids` (one per image, set by the trainer for image-text alignment) "caption_id"."""

    def __init__(
        self,
        dataset,
        crop: MultiCrop,
        task_probs: torch.Tensor,
        seed: int,
        cache=None,
        keys: list[str] | None = None,
    ):
        super().__init__(seed)
        self.dataset = dataset
        self.crop = crop
        self.task_probs = task_probs
        self.cache = cache
        self.keys = keys
        self.caption_ids: torch.Tensor | None = None
        if cache is not None:
            self.num_attributes = len(cache.attribute_names)
            self.grid = cache.grid_size

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> dict:
        sample = self.dataset[index]
        index = sample["index"]  # the dataset may have replaced an unreadable file
        task = int(torch.multinomial(self.task_probs, 1))
        view = {"image": sample["image"]}
        attributes = None
        if self.cache is not None:
            labels = self.cache.get(self.keys[index])
            if labels is None:
                view["pseudo_parts"] = torch.full(self.grid, -1, dtype=torch.int64)
                attributes = torch.full((self.num_attributes,), float("nan"))
            else:
                view["pseudo_parts"] = labels["parts"]
                attributes = labels["attributes"].float()
        out = self.crop(view)
        result = {"crops": out["crops"], "task": task, "index": index}
        if self.cache is not None:
            result["pseudo_parts"] = out["crop_labels"]["pseudo_parts"]
            result["pseudo_attributes"] = attributes
        if self.caption_ids is not None:
            result["caption_id"] = int(self.caption_ids[index])
        if "skipped" in sample:
            result["skipped"] = sample["skipped"]
        return result


def check_data_config(config: dict) -> None:
    """Raise ValueError naming the key when a data or crops setting cannot work."""
    data, crops = config["data"], config["crops"]
    for key, value, minimum in (
        ("data.batch_size", data["batch_size"], 1),
        ("data.num_workers", data["num_workers"], 0),
        ("crops.n_global", crops["n_global"], 1),
        ("crops.n_local", crops["n_local"], 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{key} must be a whole number >= {minimum}, got {value!r}")
    if not data["root"]:
        raise ValueError("data.root is not set: point it at a folder of person images")


def label_keys(paths: list[str]) -> tuple[list[str | None], dict[str, str]]:
    """The label-cache key (sha256) of each file, None for a file that cannot be read, and
    {path: reason} of those: the dataset replaces them when they come round."""
    from clasp.teacher.cache import file_sha256

    keys, unreadable = [], {}
    for path in paths:
        try:
            keys.append(file_sha256(path))
        except OSError as error:
            keys.append(None)
            unreadable[path] = open_error_reason(path, error)
    return keys, unreadable


def build_pretrain_data(config: dict, rank: int, world_size: int, patch_size: int):
    """(PretrainDataset, ResumableSampler, label cache or None) from a training config.
    Unreadable images are replaced by readable ones when they come round, without a warning
    each time (the training loop reports them at the end of the run)."""
    data, crops, model = config["data"], config["crops"], config["model"]
    check_data_config(config)
    dataset = build_dataset(data["format"], data["root"], data["split"], on_error="replace")
    dataset.warn_each_failure = False
    cache = keys = None
    if data["labels"]:
        from clasp.teacher.cache import LabelCache

        cache = LabelCache(data["labels"])
        keys, unreadable = label_keys(dataset.paths)
        if unreadable and rank == 0:
            shown = "; ".join(f"{p} ({r})" for p, r in list(unreadable.items())[:5])
            more = f"; and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
            log.warning(
                "%d of %d images under %s cannot be read and will be replaced by others: "
                "%s%s", len(unreadable), len(keys), data["root"], shown, more,
            )  # fmt: skip
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
        label_keys={"pseudo_parts": "patch"} if cache is not None else {},
        patch_size=patch_size,
        focus_key="pseudo_parts" if crops["locals_on_person"] else None,
    )
    pretrain = PretrainDataset(dataset, crop, probs / probs.sum(), config["seed"], cache, keys)
    sampler = ResumableSampler(pretrain, data["batch_size"], world_size, rank, config["seed"])
    return pretrain, sampler, cache
