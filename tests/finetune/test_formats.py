"""The formats the recipes add (MSMT17 lists, PA-100K annotation.mat, LIP label PNGs) on
small sets written here, read by build_dataset and evaluated by `clasp finetune`."""

import os

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from clasp.data.build import build_dataset
from clasp.finetune.augment import swap_labels
from tests.utils import finetune, finetune_argv


def write_image(path, colour, size=(32, 16)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.zeros((*size, 3), np.uint8) + np.array(colour, np.uint8)
    Image.fromarray(pixels).save(path)


def test_msmt17_lists(tmp_path, tiny_model):
    root = tmp_path / "msmt17"
    lines = {"train": [], "val": [], "query": [], "gallery": []}
    for pid in range(4):
        for n, cam in enumerate((1, 5, 12)):
            name = f"{pid:04d}/{pid:04d}_{n:03d}_{cam:02d}_0303morning_0015_0.jpg"
            split = "train" if pid < 2 else ("query" if n == 0 else "gallery")
            if pid == 1 and n == 2:
                split = "val"
            folder = "train" if split in ("train", "val") else "test"
            write_image(str(root / folder / name), (60 * pid, 20 * n, 100))
            lines[split].append(f"{name} {pid}")
    for split, rows in lines.items():
        (root / f"list_{split}.txt").write_text("\n".join(rows) + "\n")
    train = build_dataset("msmt17", str(root), "train")
    assert len(train) == 6 and train.cameras[:3] == [0, 4, 11] and train.pids == [0, 0, 0, 1, 1, 1]
    gallery = build_dataset("msmt17", str(root), "gallery")
    assert gallery.paths[0].startswith(str(root / "test")) and gallery[0]["image"].shape[1:] == (
        32,
        16,
    )
    result = finetune(
        "reid",
        str(root),
        "msmt17",
        tmp_path / "run",
        "optim.steps=2",
        "data.instances_per_id=2",
        "data.batch_size=4",
        model=tiny_model,
    )
    assert result["sets"] == {"query": 2, "gallery": 4}
    (root / "list_query.txt").write_text("broken line\n")
    with pytest.raises(Exception, match="line 1 is not"):
        build_dataset("msmt17", str(root), "query")


def test_pa100k_annotation(tmp_path, tiny_model):
    root = tmp_path / "pa100k"
    names = ["Female", "AgeOver60", "Hat"]
    mat = {"attributes": np.array([[n] for n in names], dtype=object)}
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4), ("test", 8)):
        files = [f"{split}{i:05d}.jpg" for i in range(count)]
        labels = rng.integers(0, 2, (count, 3)).astype(np.uint8)
        labels[0], labels[1] = 1, 0  # every attribute has positives and negatives
        for f, row in zip(files, labels, strict=True):
            write_image(str(root / "data" / f), (200 * row[0], 100 * row[1], 200 * row[2]))
        mat[f"{split}_images_name"] = np.array([[f] for f in files], dtype=object)
        mat[f"{split}_label"] = labels
    scipy.io.savemat(str(root / "annotation.mat"), mat)
    trainval = build_dataset("pa100k", str(root))
    assert len(trainval) == 16 and trainval.attribute_names == names
    sample = build_dataset("pa100k", str(root), "test")[3]
    assert sample["attributes"].tolist() == mat["test_label"][3].astype(float).tolist()
    result = finetune(
        "attributes", str(root), "pa100k", tmp_path / "run", "optim.steps=2", model=tiny_model
    )
    assert result["sets"] == {"test": 8} and 0 <= result["value"] <= 1


def test_lip_segmentations(tmp_path, tiny_model):
    root = tmp_path / "lip"
    for split, count in (("train", 4), ("val", 2)):
        ids = [f"{i:06d}_{split}" for i in range(count)]
        for i in ids:
            write_image(str(root / f"{split}_images" / f"{i}.jpg"), (50, 100, 150), (40, 20))
            labels = np.zeros((40, 20), np.uint8)
            labels[:, :10], labels[:, 10:] = 14, 15  # left arm | right arm
            labels[0] = 255
            os.makedirs(root / f"{split}_segmentations", exist_ok=True)
            Image.fromarray(labels).save(root / f"{split}_segmentations" / f"{i}.png")
        (root / f"{split}_id.txt").write_text("\n".join(ids) + "\n")
    dataset = build_dataset("lip", str(root), "train")
    parts = dataset[0]["parts"]
    assert len(dataset) == 4 and len(dataset.part_names) == 20
    assert parts[0].eq(-1).all() and parts[5, 3] == 14 and parts[5, 15] == 15
    mirrored = swap_labels(parts.flip(-1), dataset.flip_pairs)
    assert mirrored[5, 3] == 14 and torch.equal(mirrored, parts)  # a symmetric mask
    result = finetune(
        "parsing",
        str(root),
        "lip",
        tmp_path / "run",
        "optim.steps=2",
        "data.batch_size=4",
        model=tiny_model,
    )
    assert result["sets"] == {"test": 2} and "pixel_accuracy" in result["metrics"]


def test_tensorboard_events_hold_the_logged_metrics(synth, tiny_model, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    finetune(
        "pose",
        synth,
        "synth",
        run,
        "optim.steps=3",
        "train.tensorboard=true",
        "data.max_eval_images=4",
        model=tiny_model,
    )
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"loss", "mse", "lr", "grad_norm"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("mse")] == [1, 2, 3]
    # Without the package: one clear line, exit 2.
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    from clasp.cli import main as clasp_main

    argv = finetune_argv(
        "pose", synth, "synth", tmp_path / "again", "train.tensorboard=true", model=tiny_model
    )
    assert clasp_main(argv) == 2
