"""Every real format in ../shared/data loads with the right identities, cameras and labels.

Expected numbers come from the files themselves (names, label files, README facts), not
from the loaders."""

import json
import os

import numpy as np
import pytest
import scipy.io
import torch

from clasp.data.build import FORMATS, build_dataset

MARKET_SPLITS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def load_all(dataset) -> list[dict]:
    samples = [dataset[i] for i in range(len(dataset))]
    assert all(isinstance(s, dict) for s in samples), "a real image failed to load"
    return samples


def test_formats_are_the_documented_names():
    assert set(FORMATS) == {
        "folder",
        "synth",
        "market",
        "idfolder",
        "peta",
        "ccp",
        "coco",
        "msmt17",
        "pa100k",
        "lip",
        "cuhk-pedes",
    }


@pytest.mark.parametrize("split", list(MARKET_SPLITS))
def test_market(shared_data, split):
    root = os.path.join(shared_data, "mini_market1501")
    names = sorted(os.listdir(os.path.join(root, MARKET_SPLITS[split])))
    pids = [int(n.split("_")[0]) for n in names]
    cams = [int(n.split("_")[1].split("s")[0].removeprefix("c")) - 1 for n in names]
    kept = [p >= 0 if split != "train" else p > 0 for p in pids]
    ds = build_dataset("market", root, split)
    samples = load_all(ds)
    assert len(ds) == sum(kept) == 32
    assert ds.num_ids == len({p for p, k in zip(pids, kept, strict=True) if k and p > 0}) == 16
    assert ds.num_cameras == len(set(cams))
    assert sorted((s["pid"], s["camera"]) for s in samples) == sorted(
        (p, c) for p, c, k in zip(pids, cams, kept, strict=True) if k
    )
    assert all(s["image"].shape == (3, 128, 64) for s in samples)
    # attributes: the mat file's gender (1 male, 2 female) and age (1..4) for each id
    table = scipy.io.loadmat(os.path.join(root, "market_attribute.mat"))["market_attribute"][0, 0]
    part = table["train" if split == "train" else "test"][0, 0]
    index = {str(np.asarray(x).ravel()[0]): i for i, x in enumerate(part["image_index"][0])}
    female, age = ds.attribute_names.index("female"), ds.attribute_names.index("age_young")
    assert len(ds.attribute_names) == 30
    for s in samples:
        row = index[f"{s['pid']:04d}"]
        assert s["attributes"][female] == (part["gender"][0, row] == 2)
        assert s["attributes"][age : age + 4].argmax() == part["age"][0, row] - 1
        assert torch.isfinite(s["attributes"]).all()


def test_market_junk_and_distractors(shared_data, tmp_path):
    source = os.path.join(shared_data, "mini_market1501", "bounding_box_test")
    gallery = tmp_path / "bounding_box_test"
    gallery.mkdir()
    name = sorted(os.listdir(source))[0]
    data = open(os.path.join(source, name), "rb").read()
    for planted in (name, "-1_c1s1_000401_03.jpg", "0000_c2s1_000151_01.jpg", "readme.jpg"):
        (gallery / planted).write_bytes(data)
    ds = build_dataset("market", str(tmp_path), "gallery")
    assert sorted(ds.pids) == [0, int(name[:4])]  # junk left out, distractor kept as pid 0
    assert ds.num_ids == 1 and ds.attribute_names is None
    assert len(build_dataset("market", str(tmp_path), "gallery", keep_junk=True)) == 3


def col780_files(folder):
    return sorted(
        (pid, name) for pid in os.listdir(folder) for name in os.listdir(os.path.join(folder, pid))
    )


def test_col780_identity_folders(shared_data):
    root = os.path.join(shared_data, "col780_reid")
    train_files = col780_files(os.path.join(root, "data", "train"))
    val_files = col780_files(os.path.join(root, "data", "val", "all_imgs"))
    train = build_dataset("idfolder", root, "train")
    samples = load_all(train)
    assert len(train) == len(train_files) == 62 * 16
    assert train.num_ids == len({p for p, _ in train_files}) == 62
    assert train.num_cameras == len({n.split("_")[0] for _, n in train_files}) == 2
    assert sorted((s["pid"], s["camera"]) for s in samples) == sorted(
        (int(p), int(n.split("_")[0]) - 1) for p, n in train_files
    )
    val = build_dataset("idfolder", root, "val")
    assert len(val) == len(val_files) == 12 * 16 and val.num_ids == 12
    query, gallery = (
        build_dataset("idfolder", root, "query"),
        build_dataset("idfolder", root, "gallery"),
    )
    assert len(query) == 12 * 2  # one query per identity and camera
    assert not set(query.paths) & set(gallery.paths)
    assert sorted(query.paths + gallery.paths) == sorted(val.paths)
    for pid, cam in zip(query.pids, query.cameras, strict=True):
        assert any(
            p == pid and c != cam for p, c in zip(gallery.pids, gallery.cameras, strict=True)
        )
    # JPEG data behind .png names decodes
    assert load_all(query)[0]["image"].shape[0] == 3


PETA_SUBSETS = ("CAVIAR4REID", "GRID", "MIT", "i-LID")


def peta_expected(root):
    """(subset, person) per image, and each person's label tokens, straight from the files."""
    images, tokens = [], {}
    for subset in PETA_SUBSETS:
        archive = os.path.join(root, subset, "archive")
        with open(os.path.join(archive, "Label.txt")) as f:
            for line in f:
                fields = line.split()
                if fields:
                    tokens[(subset, fields[0])] = set(fields[1:])
        for name in os.listdir(archive):
            if name != "Label.txt":
                images.append((subset, name.split("_")[0].split(".")[0]))
    return images, tokens


def test_peta(shared_data):
    root = os.path.join(shared_data, "peta")
    images, tokens = peta_expected(root)
    ds = build_dataset("peta", root, "all")
    assert len(ds) == len(images) == 3860
    assert ds.num_ids == len(set(images)) == 72 + 1025 + 888 + 120
    assert len(ds.attribute_names) == 61 + 4 * 11 and len(ds.binary_attribute_names) == 61
    assert ds.multiclass_attributes["hair"][0] == "hairBlack"
    every_7th = range(0, len(ds), 7)
    labels = torch.stack([ds[i]["attributes"] for i in every_7th])
    persons = [ds.persons[ds.pids[i]] for i in every_7th]
    for name in ("personalFemale", "hairLong", "carryingBackpack", "upperBodyBlack"):
        expected = [name in tokens.get(p, ()) for p in persons]
        assert labels[:, ds.attribute_names.index(name)].tolist() == [float(e) for e in expected]
    sneaker = ds.attribute_names.index("footwearSneaker")  # written footwearSneakers in Label.txt
    assert labels[:, sneaker].tolist() == [float("footwearSneakers" in tokens[p]) for p in persons]
    grid = build_dataset("peta", root, "grid")
    assert len(grid) == sum(s == "GRID" for s, _ in images) and grid.num_ids == 1025
    train, test = build_dataset("peta", root, "train"), build_dataset("peta", root, "test")
    assert len(train) + len(test) == len(ds)
    assert not {train.persons[p] for p in train.pids} & {test.persons[p] for p in test.pids}
    assert 0.1 < len(test) / len(ds) < 0.3


def test_ccp(shared_data):
    root = os.path.join(shared_data, "ccp")
    stems = sorted(n[:-4] for n in os.listdir(os.path.join(root, "annotations", "pixel-level")))
    names = [
        str(x[0]) for x in scipy.io.loadmat(os.path.join(root, "label_list.mat"))["label_list"][0]
    ]
    fine = build_dataset("ccp", root, "all", labels="fine")
    coarse = build_dataset("ccp", root, "all")
    assert len(fine) == len(stems) == 500 and fine.part_names == names and len(names) == 59
    assert coarse.part_names == ["background", "head", "upper_body", "arms", "lower_body", "feet"]
    assert len(build_dataset("ccp", root, "train")) + len(build_dataset("ccp", root, "test")) == 500
    expected_coarse = {"null": 0, "hair": 1, "t-shirt": 2, "gloves": 3, "jeans": 4, "shoes": 5}
    for i in (0, 123, 499):
        truth = scipy.io.loadmat(fine.mask_paths[i])["groundtruth"].astype(np.int64)
        f, c = fine[i], coarse[i]
        assert f["image"].shape[1:] == truth.shape
        assert torch.equal(f["parts"], torch.from_numpy(truth))
        for label, part in expected_coarse.items():
            assert (c["parts"][f["parts"] == names.index(label)] == part).all()
        assert (c["parts"][f["parts"] == names.index("skin")] == -1).all()


def test_coco_keypoint_crops(shared_data):
    root = os.path.join(shared_data, "tiny_coco")
    with open(os.path.join(root, "annotations", "person_keypoints_train2017.json")) as f:
        coco = json.load(f)
    people = [a for a in coco["annotations"] if not a["iscrowd"] and a["num_keypoints"] > 0]
    ds = build_dataset("coco", root, "train")
    samples = load_all(ds)
    assert len(ds) == len(people) == 57
    assert ds.keypoint_names == coco["categories"][0]["keypoints"]
    assert sorted(a["id"] for _, a in ds.records) == sorted(a["id"] for a in people)
    outside = 0
    for sample, (_, annotation) in zip(samples, ds.records, strict=True):
        x0, y0, x1, y1 = sample["box"].tolist()
        assert sample["image"].shape[1:] == (y1 - y0, x1 - x0)
        bx, by, bw, bh = annotation["bbox"]
        assert x0 <= bx + 1 and y0 <= by + 1 and x1 >= bx + bw - 1 and y1 >= by + bh - 1
        raw = torch.tensor(annotation["keypoints"], dtype=torch.float32).view(17, 3)
        shifted = raw[:, :2] - torch.tensor([x0, y0])
        inside = (shifted >= 0).all(1) & (shifted[:, 0] < x1 - x0) & (shifted[:, 1] < y1 - y0)
        kept = (raw[:, 2] > 0) & inside  # labelled and inside the crop
        kp = sample["keypoints"]
        assert torch.equal(kp[kept, :2], shifted[kept]) and torch.equal(kp[kept, 2], raw[kept, 2])
        assert (kp[~kept] == 0).all()
        outside += int(((raw[:, 2] > 0) & ~inside).sum())
    assert outside < 0.02 * sum(a["num_keypoints"] for a in people)


def test_unlabeled_folder(shared_data):
    root = os.path.join(shared_data, "tiny_coco")
    expected = sum(len([n for n in files if n.endswith(".jpg")]) for _, _, files in os.walk(root))
    ds = build_dataset("folder", root)
    assert len(ds) == expected == 50 and ds.num_ids is None and ds.num_cameras is None
    sample = ds[0]
    assert sample["pid"] == sample["camera"] == -1 and sample["image"].dtype == torch.uint8
    val = os.path.join(shared_data, "col780_reid", "data", "val")
    expected = sum(len(files) for _, _, files in os.walk(val))
    assert len(build_dataset("folder", os.path.dirname(val), "val")) == expected
