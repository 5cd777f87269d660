"""PA-100K pedestrian attributes: `annotation.mat` in the root and the images beside it.

`annotation.mat` holds `attributes` (the 26 names), `<split>_images_name` (file names) and
`<split>_label` (0/1, one row per image) for split train, val and test; it is read with
scipy. Images are looked for in `data/`, `release_data/release_data/`, `release_data/`,
`images/` or the root. Splits: "train", "val", "test", and "trainval" (train + val, what the
attribute baselines train on). Identities and cameras are not labelled (-1).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from clasp.data.base import LabelReadError, PersonDataset, require_file

SPLITS = {"train": ("train",), "val": ("val",), "test": ("test",), "trainval": ("train", "val")}
IMAGE_DIRS = ("data", os.path.join("release_data", "release_data"), "release_data", "images")


def _strings(cells) -> list[str]:
    return [str(np.asarray(c).ravel()[0]) if np.asarray(c).size else "" for c in cells.ravel()]


def read_annotation(path: str) -> dict:
    """{"attributes": names, "<split>": (file names, (N, A) float32 labels)}."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
        out = {"attributes": _strings(mat["attributes"])}
        for split in ("train", "val", "test"):
            names = _strings(mat[f"{split}_images_name"])
            labels = np.asarray(mat[f"{split}_label"], dtype=np.float32)
            if labels.shape != (len(names), len(out["attributes"])):
                raise ValueError(f"{split}_label is {labels.shape} for {len(names)} images")
            out[split] = (names, labels)
    except (KeyError, ValueError, OSError) as error:
        raise LabelReadError(path, f"not a PA-100K annotation file: {error}") from error
    return out


class PA100KDataset(PersonDataset):
    """PA-100K; see the module docstring."""

    format = "pa100k"

    def __init__(self, root: str, split: str = "trainval", **kwargs):
        super().__init__(root, split, **kwargs)
        if split not in SPLITS:
            raise ValueError(f"PA-100K split must be one of {list(SPLITS)}, got {split!r}")
        annotation = read_annotation(
            require_file(os.path.join(root, "annotation.mat"), "PA-100K annotation.mat")
        )
        self.attribute_names = annotation["attributes"]
        folder = next(
            (os.path.join(root, d) for d in IMAGE_DIRS if os.path.isdir(os.path.join(root, d))),
            root,
        )
        rows = []
        for part in SPLITS[split]:
            names, labels = annotation[part]
            self.paths += [os.path.join(folder, n) for n in names]
            rows.append(labels)
        self.labels = np.concatenate(rows) if rows else np.zeros((0, len(self.attribute_names)))
        self.pids = [-1] * len(self.paths)
        self.cameras = [-1] * len(self.paths)
        self.check_not_empty("PA-100K images")

    def load(self, index: int) -> dict:
        sample = self.base_sample(index)
        sample["attributes"] = torch.from_numpy(self.labels[index].copy())
        return sample
