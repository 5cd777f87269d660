"""One entry point for every dataset format: `build_dataset(format, root, split)`."""

from __future__ import annotations

import os

from clasp.data.base import PersonDataset

# format -> (module, class, default split)
FORMATS = {
    "folder": ("clasp.data.reid", "FolderDataset", "all"),
    "synth": ("clasp.data.synthetic", "SyntheticDataset", "all"),
    "market": ("clasp.data.reid", "MarketDataset", "train"),
    "idfolder": ("clasp.data.reid", "IdFolderDataset", "train"),
    "peta": ("clasp.data.peta", "PetaDataset", "all"),
    "ccp": ("clasp.data.ccp", "CCPDataset", "all"),
    "coco": ("clasp.data.coco", "CocoKeypointDataset", "train"),
    "msmt17": ("clasp.data.msmt17", "MSMT17Dataset", "train"),
    "pa100k": ("clasp.data.pa100k", "PA100KDataset", "trainval"),
    "lip": ("clasp.data.lip", "LIPDataset", "train"),
    "cuhk-pedes": ("clasp.data.cuhk_pedes", "CuhkPedesDataset", "train"),
}


def dataset_class(format: str) -> type[PersonDataset]:
    import importlib

    if format not in FORMATS:
        raise ValueError(f"unknown dataset format {format!r}; choose one of {', '.join(FORMATS)}")
    module, name, _ = FORMATS[format]
    return getattr(importlib.import_module(module), name)


def build_dataset(format: str, root: str, split: str | None = None, **kwargs) -> PersonDataset:
    """The dataset of `format` at `root`; split None means the format's default.

    Formats and splits: folder (all, or a subfolder name), synth (all, train, test, query,
    gallery), market (train, query, gallery), idfolder (train, val, query, gallery, all),
    peta (all, train, test, or a subset name), ccp (all, train, test), coco (train, val),
    msmt17 (train, val, query, gallery), pa100k (train, val, trainval, test), lip (train, val),
    cuhk-pedes (train, val, test, all).
    Keyword arguments go to the dataset (transform=, on_error=, and format options)."""
    cls = dataset_class(format)
    if not os.path.exists(root):
        raise FileNotFoundError(f"{format} dataset root not found: {root}")
    return cls(root, split if split is not None else FORMATS[format][2], **kwargs)
