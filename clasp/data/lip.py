"""LIP (Look Into Person) human parsing: images with label PNGs over 20 classes.

Layout: `<split>_images/<id>.jpg`, `<split>_segmentations/<id>.png` (8-bit, one class id per
pixel, 255 = ignore) and `<split>_id.txt` (one id per line; without it every image that has
a segmentation is a sample), for split train and val. Left/right classes are listed in
`flip_pairs` so that a mirrored view swaps them.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image

from clasp.data.base import LabelReadError, PersonDataset, require_dir
from clasp.data.images import IMAGE_EXTENSIONS

LIP_CLASSES = (
    "background", "hat", "hair", "glove", "sunglasses", "upper_clothes", "dress", "coat",
    "socks", "pants", "jumpsuits", "scarf", "skirt", "face", "left_arm", "right_arm",
    "left_leg", "right_leg", "left_shoe", "right_shoe",
)  # fmt: skip
LIP_FLIP_PAIRS = ((14, 15), (16, 17), (18, 19))
IGNORE = 255


class LIPDataset(PersonDataset):
    """LIP; see the module docstring. Splits: train, val."""

    format = "lip"
    part_names = list(LIP_CLASSES)
    flip_pairs = LIP_FLIP_PAIRS

    def __init__(self, root: str, split: str = "train", **kwargs):
        super().__init__(root, split, **kwargs)
        if split not in ("train", "val"):
            raise ValueError(f"LIP split must be train or val, got {split!r}")
        images = require_dir(os.path.join(root, f"{split}_images"), f"LIP {split}_images folder")
        masks = require_dir(
            os.path.join(root, f"{split}_segmentations"), f"LIP {split}_segmentations folder"
        )
        by_stem = {
            os.path.splitext(n)[0]: n for n in os.listdir(images)
            if n.lower().endswith(IMAGE_EXTENSIONS)
        }  # fmt: skip
        ids_file = os.path.join(root, f"{split}_id.txt")
        if os.path.isfile(ids_file):
            with open(ids_file) as f:
                ids = [line.strip() for line in f if line.strip()]
        else:
            ids = sorted(os.path.splitext(n)[0] for n in os.listdir(masks) if n.endswith(".png"))
        missing = [i for i in ids if i not in by_stem]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} LIP {split} ids have no image in {images} (first: {missing[0]})"
            )
        self.paths = [os.path.join(images, by_stem[i]) for i in ids]
        self.mask_paths = [os.path.join(masks, f"{i}.png") for i in ids]
        self.pids = [-1] * len(ids)
        self.cameras = [-1] * len(ids)
        self.check_not_empty("LIP images")

    def load(self, index: int) -> dict:
        sample = self.base_sample(index)
        path = self.mask_paths[index]
        try:
            with open(path, "rb") as f, Image.open(io.BytesIO(f.read())) as mask:
                labels = np.asarray(mask, dtype=np.int64)
        except OSError as error:
            raise LabelReadError(path, f"{type(error).__name__}: {error}") from error
        if labels.shape != tuple(sample["image"].shape[1:]):
            raise LabelReadError(path, f"mask {labels.shape} does not match the image")
        labels = np.where(labels == IGNORE, -1, labels)
        if labels.max() >= len(LIP_CLASSES):
            raise LabelReadError(path, f"labels outside 0..{len(LIP_CLASSES) - 1} and 255")
        sample["parts"] = torch.from_numpy(labels)
        return sample
