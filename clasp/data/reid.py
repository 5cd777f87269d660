"""Unlabeled image folders and re-identification sets: Market-1501 names and identity folders.

Cameras are numbered from 0 in every set (Market's c1 is camera 0).
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import torch

from clasp.data.base import PersonDataset, require_dir
from clasp.data.images import IMAGE_EXTENSIONS, list_images

log = logging.getLogger("clasp.data")


class FolderDataset(PersonDataset):
    """Every image under `root` (recursive), no labels: pid and camera are -1.

    split "all" (or "train") reads the whole folder; any other split names a subfolder."""

    format = "folder"

    def __init__(self, root: str, split: str = "all", *, recursive: bool = True, **kwargs):
        super().__init__(root, split, **kwargs)
        folder = root if split in ("all", "train") else os.path.join(root, split)
        self.paths = list_images(folder, recursive=recursive)
        self.pids = [-1] * len(self.paths)
        self.cameras = [-1] * len(self.paths)

    def load(self, index: int) -> dict:
        return self.base_sample(index)


MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)s(\d+)_(\d+)_(\d+)\.(jpe?g|png)$", re.IGNORECASE)
MARKET_SPLITS = {
    "train": "bounding_box_train",
    "query": "query",
    "gallery": "bounding_box_test",
    "test": "bounding_box_test",
}
# market_attribute.mat fields (value 1 = no, 2 = yes, except age) and the names exposed here,
# each saying what 1 means in the binary vector.
MARKET_UP_COLORS = ("black", "white", "red", "purple", "yellow", "gray", "blue", "green")
MARKET_DOWN_COLORS = (
    "black",
    "white",
    "pink",
    "purple",
    "yellow",
    "gray",
    "blue",
    "green",
    "brown",
)
MARKET_BINARY = {
    "backpack": "backpack",
    "bag": "bag",
    "handbag": "handbag",
    "clothes": "lower_pants",  # 1 dress, 2 pants
    "down": "lower_short",  # length of lower-body clothing: 1 long, 2 short
    "up": "sleeve_short",  # 1 long sleeve, 2 short sleeve
    "hair": "hair_long",
    "hat": "hat",
    "gender": "female",  # 1 male, 2 female
    **{f"up{c}": f"up{c}" for c in MARKET_UP_COLORS},
    **{f"down{c}": f"down{c}" for c in MARKET_DOWN_COLORS},
}
MARKET_AGES = ("age_young", "age_teenager", "age_adult", "age_old")  # the mat's age 1..4


def read_market_attributes(path: str, split: str) -> dict[int, np.ndarray]:
    """pid -> float32 vector over MARKET_AGES + MARKET_BINARY values (NaN where not 1/2)."""
    import scipy.io

    table = scipy.io.loadmat(path)["market_attribute"][0, 0]
    part = table["train" if split == "train" else "test"][0, 0]
    ids = [int(np.asarray(x).ravel()[0]) for x in part["image_index"][0]]
    columns = []
    age = part["age"][0].astype(np.int64)
    for value in range(1, 5):
        columns.append(np.where((age >= 1) & (age <= 4), (age == value).astype(np.float32), np.nan))
    for field in MARKET_BINARY:
        raw = part[field][0].astype(np.int64)
        columns.append(np.where((raw == 1) | (raw == 2), (raw == 2).astype(np.float32), np.nan))
    matrix = np.stack(columns, axis=1).astype(np.float32)
    return {pid: matrix[i] for i, pid in enumerate(ids)}


class MarketDataset(PersonDataset):
    """Market-1501 layout: `<pid>_c<cam>s<seq>_<frame>_<n>.jpg` in bounding_box_train, query
    and bounding_box_test (splits train, query, gallery).

    As in Market's protocol, junk images (pid -1) are left out (`keep_junk=True` keeps them)
    and distractors (pid 0) stay in the gallery as an identity no query matches; the train
    split holds neither. `num_ids` counts real identities (pid > 0). Attributes come from
    `market_attribute.mat` in root when present (NaN for ids it does not list)."""

    format = "market"

    def __init__(self, root: str, split: str = "train", *, keep_junk: bool = False, **kwargs):
        super().__init__(root, split, **kwargs)
        if split not in MARKET_SPLITS:
            raise ValueError(
                f"Market-1501 split must be one of {list(MARKET_SPLITS)}, got {split!r}"
            )
        folder = require_dir(
            os.path.join(root, MARKET_SPLITS[split]), f"Market-1501 {split} folder"
        )
        unmatched = 0
        for name in sorted(os.listdir(folder)):
            match = MARKET_NAME.match(name)
            if not match:
                unmatched += name.lower().endswith(IMAGE_EXTENSIONS)
                continue
            pid, cam = int(match.group(1)), int(match.group(2)) - 1
            if pid < 0 and not keep_junk or pid <= 0 and split == "train":
                continue
            self.paths.append(os.path.join(folder, name))
            self.pids.append(pid)
            self.cameras.append(cam)
        if unmatched:
            log.warning("%s: %d images without Market-1501 names were left out", folder, unmatched)
        if not self.paths:
            raise ValueError(
                f"no Market-1501 images (<pid>_c<cam>s<seq>_<frame>_<n>.jpg) found in {folder}"
            )
        self.attributes: dict[int, np.ndarray] | None = None
        mat = os.path.join(root, "market_attribute.mat")
        if os.path.isfile(mat):
            self.attributes = read_market_attributes(mat, split)
            self.attribute_names = [*MARKET_AGES, *MARKET_BINARY.values()]

    @property
    def num_ids(self) -> int | None:
        ids = {p for p in self.pids if p > 0}
        return len(ids) if ids else None

    def load(self, index: int) -> dict:
        sample = self.base_sample(index)
        if self.attributes is not None:
            vector = self.attributes.get(self.pids[index])
            if vector is None:
                vector = np.full(len(self.attribute_names), np.nan, np.float32)
            sample["attributes"] = torch.from_numpy(vector.copy())
        return sample


class IdFolderDataset(PersonDataset):
    """Identity folders `<pid>/<cam>_<view>.<ext>`, as in COL780 re-ID.

    Splits: "train" reads `[data/]train`; "val" reads `[data/]val/all_imgs`; "query" and
    "gallery" divide val: the query of each (identity, camera) is its lowest view number, the
    rest is gallery (the shipped val/query and val/gallery folders overlap, so they are not
    used). "all" reads root itself as identity folders. Numeric folder names are the pid,
    other names are numbered in sorted order; cameras are the sorted distinct filename prefixes
    numbered from 0 (-1 for a name without a `<cam>_` prefix)."""

    format = "idfolder"
    SPLITS = ("train", "val", "query", "gallery", "all")

    def __init__(self, root: str, split: str = "train", **kwargs):
        super().__init__(root, split, **kwargs)
        if split not in self.SPLITS:
            raise ValueError(f"identity-folder split must be one of {self.SPLITS}, got {split!r}")
        base = os.path.join(root, "data") if os.path.isdir(os.path.join(root, "data")) else root
        if split == "all":
            folder = require_dir(root, "identity folder root")
        elif split == "train":
            folder = require_dir(os.path.join(base, "train"), "identity-folder train split")
        else:
            val = os.path.join(base, "val", "all_imgs")
            folder = require_dir(
                val if os.path.isdir(val) else os.path.join(base, "val"), "val split"
            )
        entries = []  # (pid name, camera name, view, path)
        for pid_name in sorted(os.listdir(folder)):
            pid_dir = os.path.join(folder, pid_name)
            if not os.path.isdir(pid_dir):
                continue
            for name in sorted(os.listdir(pid_dir)):
                stem, ext = os.path.splitext(name)
                if ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                cam, _, view = stem.partition("_")
                entries.append(
                    (pid_name, cam if view else None, view or stem, os.path.join(pid_dir, name))
                )
        if not entries:
            raise ValueError(
                f"no identity folders (<pid>/<cam>_<view>.<ext>) with images in {folder}"
            )
        names = sorted({e[0] for e in entries})
        numeric = all(n.isdigit() for n in names)
        pid_of = {n: int(n) if numeric else i for i, n in enumerate(names)}
        cam_of = {c: i for i, c in enumerate(sorted({e[1] for e in entries if e[1] is not None}))}
        if split in ("query", "gallery"):
            first_view = {}
            for pid_name, cam, view, _ in entries:
                key = (pid_name, cam)
                first_view[key] = min(first_view.get(key, view), view, key=_natural_key)
            is_query = [first_view[(p, c)] == v for p, c, v, _ in entries]
            entries = [e for e, q in zip(entries, is_query, strict=True) if q == (split == "query")]
        self.paths = [e[3] for e in entries]
        self.pids = [pid_of[e[0]] for e in entries]
        self.cameras = [cam_of[e[1]] if e[1] is not None else -1 for e in entries]
        self.check_not_empty("identity-folder images")

    def load(self, index: int) -> dict:
        return self.base_sample(index)


def _natural_key(text: str):
    return (0, int(text), "") if text.isdigit() else (1, 0, text)
