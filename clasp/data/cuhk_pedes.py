"""CUHK-PEDES text-based person search: person crops with natural-language captions.

Layout: `reid_raw.json` in root, a list of records
    {"file_path": "CUHK01/0363004.png", "captions": ["A man wearing ...", ...],
     "split": "train" | "val" | "test", "id": 1, ...}
with the images under `root/imgs/<file_path>` (or `root/<file_path>` when there is no `imgs`
folder). `id` is the identity (numbered from 0 in the order of first appearance); a record
without one is an identity of its own. Splits: train, val, test (the records' own), all.
`captions` holds every caption of each image; a sample's "caption" is its first.
Cameras are not labelled (-1).
"""

from __future__ import annotations

import json
import os

from clasp.data.base import LabelReadError, PersonDataset, require_file

SPLITS = ("train", "val", "test", "all")
ANNOTATIONS = "reid_raw.json"


class CuhkPedesDataset(PersonDataset):
    """CUHK-PEDES; see the module docstring."""

    format = "cuhk-pedes"

    def __init__(self, root: str, split: str = "train", **kwargs):
        super().__init__(root, split, **kwargs)
        if split not in SPLITS:
            raise ValueError(f"CUHK-PEDES split must be one of {SPLITS}, got {split!r}")
        path = require_file(
            os.path.join(root, ANNOTATIONS), f"CUHK-PEDES annotations ({ANNOTATIONS})"
        )
        try:
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
        except (OSError, ValueError) as error:
            raise LabelReadError(path, str(error)) from error
        if not isinstance(records, list):
            raise LabelReadError(path, "expected a JSON list of image records")
        images = os.path.join(root, "imgs")
        folder = images if os.path.isdir(images) else root
        problems = [
            i for i, r in enumerate(records)
            if not isinstance(r, dict) or not {"file_path", "captions", "split"} <= set(r)
        ]  # fmt: skip
        if problems:
            raise LabelReadError(
                path, f"record {problems[0]} lacks file_path, captions or split "
                f"({len(problems)} such records)"
            )  # fmt: skip
        kept = [r for r in records if split == "all" or r["split"] == split]
        ids: dict[tuple, int] = {}
        self.captions = []
        for record in kept:
            key = ("id", record["id"]) if "id" in record else ("file", record["file_path"])
            self.paths.append(os.path.join(folder, record["file_path"]))
            self.pids.append(ids.setdefault(key, len(ids)))
            self.captions.append([str(c) for c in record["captions"]])
        self.cameras = [-1] * len(self.paths)
        self.check_not_empty("CUHK-PEDES images")

    def load(self, index: int) -> dict:
        sample = self.base_sample(index)
        sample["caption"] = self.captions[index][0] if self.captions[index] else ""
        return sample
