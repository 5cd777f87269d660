"""MSMT17 re-identification lists: `list_train.txt`, `list_val.txt`, `list_query.txt` and
`list_gallery.txt` in the root, one `<path> <pid>` line per image.

Paths are relative to the images folder of their split: `train/` (or `mask_train_v2/`) for
the train and val lists, `test/` (or `mask_test_v2/`) for query and gallery, else the root.
The camera is the third `_`-separated field of the file name
(`<pid>_<n>_<camera>_<date><time>_<frame>_<k>.jpg`, cameras 1-15, numbered from 0 here).
Splits: "train" reads list_train and list_val together (the usual training set), "query",
"gallery", and "val" alone.
"""

from __future__ import annotations

import os

from clasp.data.base import LabelReadError, PersonDataset, require_file

LISTS = {
    "train": ("list_train.txt", "list_val.txt"),
    "val": ("list_val.txt",),
    "query": ("list_query.txt",),
    "gallery": ("list_gallery.txt",),
}
IMAGE_DIRS = {
    "train": ("train", "mask_train_v2"),
    "val": ("train", "mask_train_v2"),
    "query": ("test", "mask_test_v2"),
    "gallery": ("test", "mask_test_v2"),
}


def camera_of(name: str) -> int:
    """Camera (from 0) of an MSMT17 file name, -1 when the name has no camera field."""
    fields = os.path.splitext(os.path.basename(name))[0].split("_")
    return int(fields[2]) - 1 if len(fields) > 2 and fields[2].isdigit() else -1


def read_list(path: str) -> list[tuple[str, int]]:
    """(relative path, pid) per line of an MSMT17 list file."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2 or not fields[1].lstrip("-").isdigit():
                raise LabelReadError(path, f"line {number} is not '<path> <pid>': {line.strip()!r}")
            entries.append((fields[0], int(fields[1])))
    return entries


class MSMT17Dataset(PersonDataset):
    """MSMT17 list files; see the module docstring."""

    format = "msmt17"

    def __init__(self, root: str, split: str = "train", **kwargs):
        super().__init__(root, split, **kwargs)
        if split not in LISTS:
            raise ValueError(f"MSMT17 split must be one of {list(LISTS)}, got {split!r}")
        folders = [os.path.join(root, d) for d in IMAGE_DIRS[split]]
        folder = next((f for f in folders if os.path.isdir(f)), root)
        names = LISTS[split]
        for i, name in enumerate(names):
            path = os.path.join(root, name)
            if i > 0 and not os.path.isfile(path):
                continue  # list_val.txt is optional for "train"
            for relative, pid in read_list(require_file(path, f"MSMT17 {name}")):
                self.paths.append(os.path.join(folder, relative))
                self.pids.append(pid)
                self.cameras.append(camera_of(relative))
        self.check_not_empty("MSMT17 list entries")

    def load(self, index: int) -> dict:
        return self.base_sample(index)
