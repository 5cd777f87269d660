"""A tiny CUHK-PEDES-style set written by the tests: every person's top and trousers are flat
colours named in its captions, so what a caption says is what its images show."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
# (split, top, trousers) per identity: each colour in each place among the train identities,
# and test identities wearing combinations no train identity wears.
PEOPLE = [
    ("train", "red", "red"), ("train", "green", "green"), ("train", "blue", "blue"),
    ("train", "red", "green"), ("train", "green", "blue"), ("train", "blue", "red"),
    ("val", "red", "red"),
    ("test", "red", "blue"), ("test", "green", "red"), ("test", "blue", "green"),
]  # fmt: skip
IMAGES_PER_PERSON = 2
SIZE = (64, 32)


def captions(top: str, trousers: str) -> list[str]:
    return [
        f"A person in a {top} top and {trousers} trousers.",
        f"Someone wearing {top} on top, {trousers} below.",
    ]


def make_cuhk_pedes(root: str) -> str:
    """reid_raw.json and imgs/<camera folder>/<pid>_<n>.png under root; ids start at 11."""
    records = []
    for index, (split, top, trousers) in enumerate(PEOPLE):
        for n in range(IMAGES_PER_PERSON):
            pixels = np.zeros((*SIZE, 3), np.uint8)
            pixels[: SIZE[0] // 2] = COLORS[top]
            pixels[SIZE[0] // 2 :] = COLORS[trousers]
            path = f"CUHK0{1 + n}/{index:04d}_{n}.png"
            os.makedirs(os.path.join(root, "imgs", os.path.dirname(path)), exist_ok=True)
            Image.fromarray(pixels).save(os.path.join(root, "imgs", path))
            records.append(
                {"split": split, "captions": captions(top, trousers), "file_path": path,
                 "processed_tokens": [], "id": 11 + index}
            )  # fmt: skip
    with open(os.path.join(root, "reid_raw.json"), "w") as f:
        json.dump(records, f)
    return root
