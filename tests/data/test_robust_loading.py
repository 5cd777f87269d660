"""Unreadable files are skipped, logged and counted, never crash a run; bad inputs fail
early with the path named. Corrupt files are planted in tmp_path copies only."""

import logging
import os
import shutil

import pytest
from torch.utils.data import DataLoader

from clasp.data.base import FailedSample, LabelReadError
from clasp.data.build import build_dataset
from clasp.data.collate import collate_samples
from clasp.data.images import ImageReadError
from clasp.data.synthetic import generate
from clasp.data.transforms import MultiCrop

BAD = ("0998_c1s1_000001_01.jpg", "0999_c2s1_000001_01.jpg")  # Market names, broken content


@pytest.fixture
def market_with_corrupt_files(shared_data, tmp_path):
    source = os.path.join(shared_data, "mini_market1501", "bounding_box_train")
    train = tmp_path / "bounding_box_train"
    shutil.copytree(source, train)
    good = sorted(os.listdir(train))[0]
    data = (train / good).read_bytes()
    (train / BAD[0]).write_bytes(data[: len(data) // 3])  # truncated JPEG
    (train / BAD[1]).write_bytes(b"\x00" * 100)  # not an image at all
    return str(tmp_path), len(os.listdir(source)), {str(train / name) for name in BAD}


def iterate(dataset, workers: int, batch_size: int = 8):
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_samples
    )
    return list(loader)


@pytest.mark.parametrize(
    "workers", [pytest.param(0, id="main-process"), pytest.param(2, id="2-workers")]
)
def test_corrupt_images_are_dropped_and_reported(market_with_corrupt_files, workers, caplog):
    root, good, bad = market_with_corrupt_files
    dataset = build_dataset("market", root, "train")
    assert len(dataset) == good + 2
    with caplog.at_level(logging.WARNING, logger="clasp.data"):
        batches = iterate(dataset, workers)
    assert sum(len(b["index"]) for b in batches) == good
    assert {p for b in batches for p in b["skipped"]} == bad
    assert not any(p in bad for b in batches for p in b.get("path", []))
    if workers == 0:
        assert dataset.failures == 2
        logged = " ".join(r.getMessage() for r in caplog.records)
        assert all(p in logged for p in bad) and "skipping" in logged


def test_replace_keeps_batches_full(market_with_corrupt_files):
    root, good, bad = market_with_corrupt_files
    dataset = build_dataset("market", root, "train", on_error="replace")
    batches = iterate(dataset, 0, batch_size=good + 2)
    assert len(batches) == 1 and len(batches[0]["index"]) == good + 2
    assert set(batches[0]["skipped"]) == bad
    assert dataset.failures == len(batches[0]["skipped"])  # failed reads, retries included


def test_raise_mode_raises(market_with_corrupt_files):
    root, _, bad = market_with_corrupt_files
    dataset = build_dataset("market", root, "train", on_error="raise")
    index = next(i for i, p in enumerate(dataset.paths) if p in bad)
    with pytest.raises(ImageReadError):
        dataset[index]
    with pytest.raises(ValueError, match="on_error"):
        build_dataset("market", root, "train", on_error="ignore")


def test_corrupt_label_files_are_skipped(tmp_path, shared_data):
    generate(str(tmp_path / "synth"), 3, 2, 2, (64, 32), seed=1)
    parts = tmp_path / "synth" / "parts" / "00001_c01_000.png"
    parts.write_bytes(b"broken")
    dataset = build_dataset("synth", str(tmp_path / "synth"))
    failed = [s for s in (dataset[i] for i in range(len(dataset))) if isinstance(s, FailedSample)]
    assert [f.path for f in failed] == [str(parts)]
    ccp = tmp_path / "ccp"
    (ccp / "photos").mkdir(parents=True)
    (ccp / "annotations" / "pixel-level").mkdir(parents=True)
    source = os.path.join(shared_data, "ccp")
    shutil.copy(os.path.join(source, "label_list.mat"), ccp)
    for stem in ("0001", "0002"):
        shutil.copy(os.path.join(source, "photos", f"{stem}.jpg"), ccp / "photos")
        shutil.copy(
            os.path.join(source, "annotations", "pixel-level", f"{stem}.mat"),
            ccp / "annotations" / "pixel-level",
        )
    (ccp / "annotations" / "pixel-level" / "0002.mat").write_bytes(b"MATLAB 5.0 but cut short")
    dataset = build_dataset("ccp", str(ccp), on_error="raise")
    assert dataset[0]["parts"].shape == dataset[0]["image"].shape[1:]
    with pytest.raises(LabelReadError, match="0002.mat"):
        dataset[1]


def test_loader_with_workers_feeds_multicrop(tmp_path):
    generate(str(tmp_path), 4, 3, 2, (64, 32), seed=2)
    transform = MultiCrop(
        (64, 32), (32, 16), n_local=2, label_keys={"parts": "patch"}, patch_size=8
    )
    dataset = build_dataset("synth", str(tmp_path), transform=transform)
    batches = iterate(dataset, 2, batch_size=6)
    assert [len(b["index"]) for b in batches] == [6, 6]
    batch = batches[0]
    assert [tuple(c.shape) for c in batch["crops"]] == [(6, 3, 64, 32)] * 2 + [(6, 3, 32, 16)] * 2
    assert [tuple(p.shape) for p in batch["crop_labels"]["parts"]] == [(6, 8, 4)] * 2 + [
        (6, 4, 2)
    ] * 2
    assert batch["crop_keypoints"][0].shape == (6, 17, 3) and batch["attributes"].shape == (6, 31)
    assert len(batch["caption"]) == 6 and batch["skipped"] == []


@pytest.mark.parametrize(
    "format,layout,message",
    [
        pytest.param("market", {}, "bounding_box_train", id="market-no-folders"),
        pytest.param("market", {"bounding_box_train/readme.txt": b"x"}, "Market-1501 images",
                     id="market-wrong-names"),
        pytest.param("folder", {"notes.txt": b"x"}, "no images", id="folder-empty"),
        pytest.param("synth", {}, "meta.json", id="synth-no-meta"),
        pytest.param("idfolder", {"train/readme.txt": b"x"}, "identity folders",
                     id="idfolder-empty"),
        pytest.param("peta", {"GRID/readme.txt": b"x"}, "Label.txt", id="peta-no-labels"),
        pytest.param("ccp", {"photos/a.jpg": b"x"}, "pixel-level", id="ccp-no-annotations"),
        pytest.param("coco", {}, "person_keypoints_train2017.json", id="coco-no-annotations"),
        pytest.param("coco", {"annotations/person_keypoints_train2017.json": b"{}",
                              "train2017/a.jpg": b""},
                     "not a COCO keypoint file", id="coco-wrong-json"),
    ],
)  # fmt: skip
def test_wrong_layouts_fail_naming_the_path(tmp_path, format, layout, message):
    for relative, content in layout.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(content)
    with pytest.raises((FileNotFoundError, ValueError)) as error:
        build_dataset(format, str(tmp_path))
    assert message in str(error.value) and str(tmp_path) in str(error.value)


def test_unknown_format_and_missing_root(tmp_path):
    with pytest.raises(ValueError, match="market"):
        build_dataset("cityscapes", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset("market", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="split"):
        build_dataset("synth", str(tmp_path), "validation")
