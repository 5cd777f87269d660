"""Clothing Co-Parsing: street photos with pixel-level labels over 59 clothing names.

Layout: `photos/NNNN.jpg`, `annotations/pixel-level/NNNN.mat` (variable `groundtruth`, one
label index per pixel into `label_list.mat`, 0 = null). Only photos with a pixel-level
annotation are samples. `labels="coarse"` (default) maps the 59 names onto the six part
classes of the teacher (`CCP_TO_PART`); names that span several parts (skin, dress, romper,
suit, swimwear, intimate) or no body part (bags, wallets, loose accessories) become -1, so a
parsing probe is scored only where the coarse class is defined. `labels="fine"` keeps the 59.
Splits: "all", "train", "test" (every fifth annotated photo in name order).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from clasp.data.base import LabelReadError, PersonDataset, require_dir, require_file
from clasp.data.pedestrians import PART_NAMES

CCP_TO_PART = {
    "background": ("null",),
    "head": ("hair", "hat", "sunglasses", "glasses", "earrings"),
    "upper_body": (
        "blazer", "blouse", "bodysuit", "bra", "cape", "cardigan", "coat", "hoodie", "jacket",
        "jumper", "shirt", "sweater", "sweatshirt", "t-shirt", "top", "vest", "tie", "necklace",
        "scarf",
    ),
    "arms": ("gloves", "bracelet", "watch", "ring"),
    "lower_body": (
        "pants", "jeans", "shorts", "skirt", "leggings", "tights", "stockings", "panties", "belt",
    ),
    "feet": (
        "boots", "clogs", "flats", "heels", "loafers", "pumps", "sandals", "shoes", "sneakers",
        "socks", "wedges",
    ),
}  # fmt: skip


def read_label_names(path: str) -> list[str]:
    import scipy.io

    cells = scipy.io.loadmat(require_file(path, "CCP label_list.mat"))["label_list"].ravel()
    return [str(np.asarray(c).ravel()[0]) if np.asarray(c).size else "" for c in cells]


def coarse_lookup(fine_names: list[str], part_names=PART_NAMES) -> np.ndarray:
    """int64 table: CCP label index -> index into part_names, or -1 (not a single part)."""
    part_index = {name: i for i, name in enumerate(part_names)}
    missing = [p for p in CCP_TO_PART if p not in part_index]
    if missing:
        raise ValueError(f"the CCP coarse mapping needs part classes {missing}; have {part_names}")
    table = np.full(len(fine_names), -1, np.int64)
    for part, names in CCP_TO_PART.items():
        for i, name in enumerate(fine_names):
            if name in names:
                table[i] = part_index[part]
    return table


class CCPDataset(PersonDataset):
    """Clothing Co-Parsing pixel-level set; see the module docstring."""

    format = "ccp"
    SPLITS = ("all", "train", "test")

    def __init__(self, root: str, split: str = "all", *, labels: str = "coarse", **kwargs):
        super().__init__(root, split, **kwargs)
        if split not in self.SPLITS:
            raise ValueError(f"CCP split must be one of {self.SPLITS}, got {split!r}")
        if labels not in ("coarse", "fine"):
            raise ValueError(f"labels must be 'coarse' or 'fine', got {labels!r}")
        photos = require_dir(os.path.join(root, "photos"), "CCP photos folder")
        masks = require_dir(
            os.path.join(root, "annotations", "pixel-level"), "CCP pixel-level annotations"
        )
        self.fine_part_names = read_label_names(os.path.join(root, "label_list.mat"))
        self.lookup = coarse_lookup(self.fine_part_names)
        self.labels = labels
        self.part_names = list(PART_NAMES) if labels == "coarse" else list(self.fine_part_names)
        stems = sorted(os.path.splitext(n)[0] for n in os.listdir(masks) if n.endswith(".mat"))
        photo_of = {os.path.splitext(n)[0]: n for n in os.listdir(photos)}
        stems = [s for s in stems if s in photo_of]
        if split != "all":
            stems = [s for i, s in enumerate(stems) if (i % 5 == 4) == (split == "test")]
        self.paths = [os.path.join(photos, photo_of[s]) for s in stems]
        self.mask_paths = [os.path.join(masks, f"{s}.mat") for s in stems]
        self.pids = [-1] * len(stems)
        self.cameras = [-1] * len(stems)
        self.check_not_empty("CCP photos with pixel-level annotations")

    def load(self, index: int) -> dict:
        import scipy.io

        sample = self.base_sample(index)
        path = self.mask_paths[index]
        try:
            mask = np.asarray(scipy.io.loadmat(path)["groundtruth"], dtype=np.int64)
        except Exception as error:  # scipy's parser raises many types on a corrupt file
            if isinstance(error, FileNotFoundError):
                raise
            raise LabelReadError(path, f"{type(error).__name__}: {error}") from error
        if mask.shape != tuple(sample["image"].shape[1:]):
            raise LabelReadError(path, f"mask {mask.shape} does not match the photo")
        if mask.min() < 0 or mask.max() >= len(self.fine_part_names):
            raise LabelReadError(path, f"labels outside 0..{len(self.fine_part_names) - 1}")
        sample["parts"] = torch.from_numpy(self.lookup[mask] if self.labels == "coarse" else mask)
        return sample
