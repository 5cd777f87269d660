"""Batching: stacked tensors, ragged values as lists, unreadable samples dropped and listed."""

import torch

from clasp.data.base import FailedSample
from clasp.data.collate import collate_samples


def test_collate():
    def sample(value, pid, caption, score, **extra):
        return {
            "image": torch.full((3, 4, 2), value),
            "pid": pid,
            "caption": caption,
            "crops": [torch.full((3, 2, 2), value), torch.ones(3, 1, 1)],
            "crop_labels": {"parts": [torch.full((2, 2), int(value))]},
            "score": score,
            **extra,
        }

    samples = [
        sample(0.0, 1, "a", 0.5),
        FailedSample(7, "/data/bad.jpg", "truncated"),
        sample(1.0, 2, "b", 1, skipped=["/data/x.jpg"]),
    ]
    batch = collate_samples(samples)
    assert batch["image"].shape == (2, 3, 4, 2)
    assert batch["pid"].tolist() == [1, 2] and batch["pid"].dtype == torch.int64
    assert batch["caption"] == ["a", "b"]
    assert [c.shape for c in batch["crops"]] == [(2, 3, 2, 2), (2, 3, 1, 1)]
    assert batch["crop_labels"]["parts"][0].tolist() == [[[0, 0], [0, 0]], [[1, 1], [1, 1]]]
    assert batch["score"].dtype == torch.float32
    assert batch["skipped"] == ["/data/bad.jpg", "/data/x.jpg"]
    ragged = collate_samples(
        [{"image": torch.zeros(3, 4, 2)}, {"image": torch.zeros(3, 5, 2), "caption": "c"}]
    )
    assert isinstance(ragged["image"], list) and ragged["caption"] == [None, "c"]
    empty = collate_samples([FailedSample(0, "p", "r")])
    assert len(empty["index"]) == 0 and empty["skipped"] == ["p"]
