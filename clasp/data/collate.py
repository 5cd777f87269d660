"""Batching person samples: stacked tensors, ragged values as lists, unreadable samples dropped."""

from __future__ import annotations

import torch

from clasp.data.base import FailedSample


def collate_samples(samples: list) -> dict:
    """Batch sample dicts: tensors of one shape are stacked, numbers become tensors, strings
    and anything ragged stay lists (None where a sample lacks the key), lists of crops become
    lists of stacked crops, and dicts recurse.

    Unreadable samples (FailedSample) are dropped; their paths, and those a dataset with
    on_error="replace" skipped, are listed in batch["skipped"]. When every sample of a batch
    failed, the batch is {"index": empty tensor, "skipped": [...]}: skip it when
    `len(batch["index"]) == 0`."""
    kept = [s for s in samples if not isinstance(s, FailedSample)]
    skipped = [s.path for s in samples if isinstance(s, FailedSample)]
    for s in kept:
        skipped += s.get("skipped", [])
    if not kept:
        return {"index": torch.zeros(0, dtype=torch.int64), "skipped": skipped}
    keys = list(dict.fromkeys(k for s in kept for k in s if k != "skipped"))
    batch = {k: _collate([s.get(k) for s in kept]) for k in keys}
    batch["skipped"] = skipped
    return batch


def _collate(values: list):
    first = values[0]
    if any(v is None for v in values):
        return values
    if isinstance(first, torch.Tensor):
        if not all(v.shape == first.shape and v.dtype == first.dtype for v in values):
            return values
        out = None
        if torch.utils.data.get_worker_info() is not None:
            # Stack straight into shared memory: the batch then crosses to the main process
            # without another copy.
            storage = first._typed_storage()._new_shared(len(values) * first.numel())
            out = first.new(storage).resize_(len(values), *first.shape)
        return torch.stack(values, out=out)
    if isinstance(first, bool | int) and all(isinstance(v, bool | int) for v in values):
        return torch.tensor(values, dtype=torch.int64)
    if isinstance(first, float) and all(isinstance(v, int | float) for v in values):
        return torch.tensor(values, dtype=torch.float32)
    if isinstance(first, list | tuple) and all(
        isinstance(v, list | tuple) and len(v) == len(first) for v in values
    ):
        return [_collate(list(items)) for items in zip(*values, strict=True)]
    if isinstance(first, dict) and all(isinstance(v, dict) for v in values):
        keys = list(dict.fromkeys(k for v in values for k in v))
        return {k: _collate([v.get(k) for v in values]) for k in keys}
    return values
