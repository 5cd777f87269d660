"""What every dataset shares: an index of samples in memory, robust loading, the sample dict.

A subclass fills `paths`, `pids` and `cameras` (one entry per sample, -1 where unknown) and
implements `load(index)`, which returns the labelled-sample dict of `clasp.data`. A file that
cannot be decoded never crashes a run: depending on `on_error` the dataset

- "drop" (default): logs the reason, counts it in `failures`, and returns a `FailedSample`
  that `collate_samples` drops from the batch (listing its path in `batch["skipped"]`);
- "replace": logs and counts it, and returns the next readable sample instead, with the
  failed paths in `sample["skipped"]` (a fixed batch size, for training);
- "raise": raises the `ImageReadError` / `LabelReadError`.

Each failure is logged as a warning unless `warn_each_failure` is False: a training run,
which meets the same file again every epoch, reports them once at its end instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from clasp.data.images import ImageReadError, read_rgb

log = logging.getLogger("clasp.data")

ON_ERROR = ("drop", "replace", "raise")
MAX_REPLACEMENTS = 16


class LabelReadError(Exception):
    """A label file (mask, annotation) that exists but cannot be read."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class FailedSample(NamedTuple):
    """Stands in for a sample whose files could not be read; collate_samples drops it."""

    index: int
    path: str
    reason: str


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image as a uint8 (3, H, W) tensor."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def require_dir(path: str, what: str) -> str:
    """`path` if it is a folder, else a FileNotFoundError saying what was expected there."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


class PersonDataset(torch.utils.data.Dataset):
    """Base class; see the module docstring. Metadata left None is not known for the set."""

    format = ""
    attribute_names: list[str] | None = None
    part_names: list[str] | None = None
    keypoint_names: list[str] | None = None
    # The texts describing each sample (a list per sample, in `paths` order), for sets that
    # have them (synth, cuhk-pedes); read without decoding any image.
    captions: list[list[str]] | None = None

    def __init__(
        self,
        root: str,
        split: str,
        *,
        transform: Callable[[dict], dict] | None = None,
        on_error: str = "drop",
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.root = root
        self.split = split
        self.transform = transform
        self.on_error = on_error
        self.paths: list[str] = []
        self.pids: list[int] = []
        self.cameras: list[int] = []
        # unreadable samples met by this process (each DataLoader worker counts its own)
        self.failures = 0
        self.warn_each_failure = True

    # -- to implement -------------------------------------------------------------------------
    def load(self, index: int) -> dict:
        raise NotImplementedError

    # -- metadata -----------------------------------------------------------------------------
    @property
    def num_ids(self) -> int | None:
        """Distinct identities (pid >= 0); None if the set has no identities."""
        ids = {p for p in self.pids if p >= 0}
        return len(ids) if ids else None

    @property
    def num_cameras(self) -> int | None:
        """Distinct cameras (camera >= 0); None if the set has no camera labels."""
        cams = {c for c in self.cameras if c >= 0}
        return len(cams) if cams else None

    def check_not_empty(self, what: str) -> None:
        if not self.paths:
            raise ValueError(f"no {what} found for split {self.split!r} under {self.root}")

    def __repr__(self) -> str:
        parts = [f"{len(self)} images"]
        if self.num_ids:
            parts.append(f"{self.num_ids} ids")
        if self.num_cameras:
            parts.append(f"{self.num_cameras} cameras")
        if self.attribute_names:
            parts.append(f"{len(self.attribute_names)} attributes")
        if self.part_names:
            parts.append(f"{len(self.part_names)} part classes")
        if self.keypoint_names:
            parts.append(f"{len(self.keypoint_names)} keypoints")
        where = f"{self.format} {self.split!r} at {self.root}"
        return f"{type(self).__name__}({where}: {', '.join(parts)})"

    # -- samples ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.paths)

    def base_sample(self, index: int, image: Image.Image | None = None) -> dict:
        """The keys every sample has; reads the image at paths[index] unless one is given."""
        path = self.paths[index]
        image = read_rgb(path) if image is None else image
        return {
            "image": image_tensor(image),
            "index": index,
            "path": path,
            "pid": self.pids[index] if self.pids else -1,
            "camera": self.cameras[index] if self.cameras else -1,
        }

    def __getitem__(self, index: int) -> dict | FailedSample:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        skipped: list[str] = []
        for attempt in range(min(MAX_REPLACEMENTS, len(self))):
            current = (index + attempt) % len(self)
            try:
                sample = self.load(current)
            except (ImageReadError, LabelReadError) as error:
                if self.on_error == "raise":
                    raise
                self.failures += 1
                log.log(
                    logging.WARNING if self.warn_each_failure else logging.DEBUG,
                    "skipping unreadable sample %d (%s): %s", current, error.path, error.reason,
                )  # fmt: skip
                if self.on_error == "drop":
                    return FailedSample(current, error.path, error.reason)
                skipped.append(error.path)
                continue
            if skipped:
                sample["skipped"] = skipped
            return self.transform(sample) if self.transform is not None else sample
        raise RuntimeError(
            f"{len(skipped)} consecutive samples from index {index} of {self.root} are unreadable "
            f"(last: {skipped[-1]}); check the data"
        )
