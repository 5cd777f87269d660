"""The teacher fit's training data: images at the teacher's input size with their captions,
attribute targets per prompt group and part grids, from a synthetic set or PETA.

A synthetic set (`clasp synth`) brings its own captions, one-hot attributes and part masks;
a PETA person gets a caption built from the names of its attributes
(`clasp.vocabulary.attribute_caption`) and targets through `PETA_TO_GROUP`, and no part grid.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image

from clasp.data.build import build_dataset
from clasp.data.grids import grid_labels
from clasp.vocabulary import Prompts, attribute_caption


def group_targets(vector, groups: dict[str, list[str]]) -> list[int]:
    """Flat 0/1 attribute vector (NaN unknown) -> value index per group (-1: unknown or not
    exactly one value set)."""
    out, start = [], 0
    for values in groups.values():
        chunk = vector[start : start + len(values)]
        start += len(values)
        known = [v for v in chunk if not (isinstance(v, float) and math.isnan(v))]
        ones = [i for i, v in enumerate(chunk) if v == 1]
        out.append(ones[0] if len(ones) == 1 and len(known) == len(values) else -1)
    return out


# PETA attribute -> (group, value) of the packaged prompts; colours are read per body part.
PETA_TO_GROUP = {
    "personalMale": ("gender", "male"), "personalFemale": ("gender", "female"),
    "personalLess15": ("age", "child"), "personalLess30": ("age", "adult"),
    "personalLess45": ("age", "adult"), "personalLess60": ("age", "adult"),
    "personalLarger60": ("age", "elderly"), "hairLong": ("hair", "long"),
    "hairShort": ("hair", "short"), "upperBodyShortSleeve": ("upper_type", "short_sleeve"),
    "upperBodyLongSleeve": ("upper_type", "long_sleeve"),
    "lowerBodyTrousers": ("lower_type", "trousers"), "lowerBodyJeans": ("lower_type", "trousers"),
    "lowerBodyShorts": ("lower_type", "shorts"), "lowerBodyShortSkirt": ("lower_type", "skirt"),
    "lowerBodyLongSkirt": ("lower_type", "skirt"), "carryingBackpack": ("bag", "backpack"),
    "carryingNothing": ("bag", "none"), "accessoryHat": ("hat", "hat"),
    **{f"upperBody{c}": ("upper_color", c.lower().replace("grey", "gray"))
       for c in ("Black", "White", "Red", "Blue", "Green", "Yellow", "Grey")},
    **{f"lowerBody{c}": ("lower_color", c.lower().replace("grey", "gray"))
       for c in ("Black", "White", "Red", "Blue", "Green", "Yellow", "Grey")},
}  # fmt: skip


def peta_targets(names: list[str], groups: dict[str, list[str]]) -> list[int]:
    """PETA attribute names of one person -> value index per prompt group (-1 unknown: no
    mapped attribute, or several values of one group). PETA lists what is present, so a
    person without accessoryHat has no hat."""
    found: dict[str, set[str]] = {g: set() for g in groups}
    for name in names:
        if name in PETA_TO_GROUP:
            group, value = PETA_TO_GROUP[name]
            if group in found:
                found[group].add(value)
    if "hat" in found and not found["hat"] and "none" in groups["hat"]:
        found["hat"].add("none")
    return [
        groups[g].index(next(iter(v))) if len(v) == 1 and next(iter(v)) in groups[g] else -1
        for g, v in found.items()
    ]


class _Example:
    """Dataset index -> (pixels, caption, pid, group targets, part grid or None); runs in
    DataLoader workers."""

    def __init__(self, dataset, format, prompts: Prompts, image_size, grid_size):
        self.dataset, self.format = dataset, format
        self.groups = {g: list(v) for g, v in prompts.attributes.items()}
        self.num_parts = len(prompts.part_names)
        self.image_size, self.grid_size = tuple(image_size), tuple(grid_size)

    def __call__(self, index: int):
        sample = self.dataset.load(index)
        height, width = self.image_size
        image = Image.fromarray(sample["image"].permute(1, 2, 0).numpy())
        resized = image.resize((width, height), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)
        if self.format == "synth":
            targets = group_targets(sample["attributes"].tolist(), self.groups)
            grid = grid_labels(sample["parts"], self.grid_size, self.num_parts)
            return pixels, sample["caption"], int(sample["pid"]), targets, grid
        flags = sample["attributes"].tolist()
        names = self.dataset.attribute_names
        present = [n for n, v in zip(names, flags, strict=True) if v == 1]
        caption = attribute_caption(present)
        return pixels, caption, int(sample["pid"]), peta_targets(present, self.groups), None


class _Examples(torch.utils.data.Dataset):
    def __init__(self, indices: list[int], example: _Example):
        self.indices, self.example = indices, example

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.example(self.indices[i])


class CaptionedImages:
    """A training set in memory: pixels (N, 3, H, W) uint8 at the teacher's input size,
    captions, pids, attribute targets (N, G) per prompt group (-1 unknown) and part grids
    (N, gh, gw) (-1 unknown) or None."""

    def __init__(
        self, root, format, split, prompts: Prompts, image_size, grid_size, *,
        max_images: int | None = None, workers: int = 0,
    ):  # fmt: skip
        self.dataset = build_dataset(format, root, split)
        indices = list(range(len(self.dataset)))
        if max_images is not None and len(indices) > max_images:
            indices = [int(i * len(indices) / max_images) for i in range(max_images)]
        example = _Example(self.dataset, format, prompts, image_size, grid_size)
        loader = torch.utils.data.DataLoader(
            _Examples(indices, example), batch_size=64, num_workers=workers, collate_fn=list
        )
        items = [item for batch in loader for item in batch]
        self.pixels = torch.stack([item[0] for item in items])
        self.captions = [item[1] for item in items]
        self.pids = torch.tensor([item[2] for item in items])
        self.targets = torch.tensor([item[3] for item in items], dtype=torch.long)
        self.grids = torch.stack([item[4] for item in items]) if format == "synth" else None

    def __len__(self) -> int:
        return len(self.captions)


def detect_format(root: str) -> str:
    """A folder with meta.json is a synthetic set; anything else is read as PETA."""
    return "synth" if os.path.isfile(os.path.join(root, "meta.json")) else "peta"


def identity_batches(pids: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless batches of image indices, at most one image per identity in a batch."""
    by_pid: dict[int, list[int]] = {}
    for i, pid in enumerate(pids.tolist()):
        by_pid.setdefault(pid, []).append(i)
    groups = list(by_pid.values())
    batch_size = min(batch_size, len(groups))
    while True:
        order = torch.randperm(len(groups), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chosen = [groups[g] for g in order[start : start + batch_size]]
            yield [g[int(torch.randint(len(g), (1,), generator=generator))] for g in chosen]
