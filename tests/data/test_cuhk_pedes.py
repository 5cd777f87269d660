"""CUHK-PEDES: splits, identities, every caption of each image, and clear errors."""

import json
import os

import pytest

from clasp.data.base import LabelReadError
from clasp.data.build import build_dataset
from tests.utils import IMAGES_PER_PERSON, PEOPLE, captions


def test_splits_identities_and_captions_follow_the_records(cuhk_pedes_set):
    everything = build_dataset("cuhk-pedes", cuhk_pedes_set, "all")
    assert len(everything) == len(PEOPLE) * IMAGES_PER_PERSON
    for split in ("train", "val", "test"):
        data = build_dataset("cuhk-pedes", cuhk_pedes_set, split)
        people = [p for p in PEOPLE if p[0] == split]
        assert len(data) == len(people) * IMAGES_PER_PERSON and data.num_ids == len(people)
        assert data.cameras == [-1] * len(data)
        for i, (_, top, trousers) in enumerate(people):
            assert data.captions[2 * i] == captions(top, trousers)
        sample = data[0]
        assert sample["image"].shape == (3, 64, 32) and sample["caption"] == data.captions[0][0]
        assert sample["path"].startswith(os.path.join(cuhk_pedes_set, "imgs", "CUHK01"))
    assert build_dataset("cuhk-pedes", cuhk_pedes_set).split == "train"  # the default split
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset("cuhk-pedes", cuhk_pedes_set, "query")


def test_broken_annotations_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="reid_raw.json"):
        build_dataset("cuhk-pedes", str(tmp_path))
    (tmp_path / "reid_raw.json").write_text("[{")
    with pytest.raises(LabelReadError, match="reid_raw.json"):
        build_dataset("cuhk-pedes", str(tmp_path))
    (tmp_path / "reid_raw.json").write_text(json.dumps([{"file_path": "a.png", "split": "train"}]))
    with pytest.raises(LabelReadError, match="lacks file_path, captions or split"):
        build_dataset("cuhk-pedes", str(tmp_path))
