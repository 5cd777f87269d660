"""`clasp synth`: ground truth consistent with the pixels, cameras, captions, determinism."""

import argparse
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from clasp.cli import COMMANDS
from clasp.data import synthetic
from clasp.data.build import build_dataset
from clasp.data.pedestrians import COLOR_RGB, check_vocabulary, sample_identity, setup_camera
from clasp.data.render import render
from clasp.data.synthetic import generate
from clasp.vocabulary import load_prompts
from tests.conftest import SESSION_SEED

SIZE = (128, 64)
IDS, PER_ID, CAMERAS = 10, 6, 3


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    meta = generate(out, IDS, PER_ID, CAMERAS, SIZE, seed=SESSION_SEED % 10_000, occlusion=0.4)
    with open(os.path.join(out, "labels.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return out, meta, records


def read(root, relative) -> np.ndarray:
    return np.asarray(Image.open(os.path.join(root, relative)))


def test_meta_uses_the_teachers_vocabulary(synth):
    _, meta, records = synth
    prompts = load_prompts()
    assert meta["part_names"] == prompts.part_names
    assert meta["attribute_names"] == prompts.attribute_names
    assert meta["group_sizes"] == prompts.group_sizes
    assert len(meta["keypoint_names"]) == 17 and meta["keypoint_names"][0] == "nose"
    assert len(records) == meta["num_images"] == IDS * PER_ID
    assert len(meta["cameras"]) == CAMERAS


def test_part_masks_match_the_figure_pixels(synth):
    """Re-render every image without the person (same random draws): the pixels that
    changed are exactly the labelled ones, and the full render reproduces the file."""
    root, meta, records = synth
    seed = meta["seed"]
    values = check_vocabulary(load_prompts().attributes)
    cameras = [setup_camera(seed, c, SIZE) for c in range(CAMERAS)]
    changed_on_figure, figure_pixels = 0, 0
    for r in records:
        image, parts = read(root, r["image"]), read(root, r["parts"]).astype(np.int64)
        assert image.shape == (*SIZE, 3) and parts.shape == SIZE
        assert set(np.unique(parts).tolist()) <= {0, 1, 2, 3, 4, 5, 255}
        identity = sample_identity(seed, r["pid"], values)

        def draw(figure, r=r, identity=identity):
            rng = np.random.default_rng([seed, r["pid"], r["camera"], r["n"]])
            return render(
                identity, cameras[r["camera"]], rng, SIZE, occlusion=0.4, draw_figure=figure
            )

        assert np.array_equal(draw(True).image, image)
        changed = np.any(draw(False).image != image, axis=-1)
        figure = parts != 0
        assert not changed[~figure].any(), f"{r['image']}: pixels changed outside the mask"
        changed_on_figure += int(changed[figure].sum())
        figure_pixels += int(figure.sum())
        x0, y0, x1, y1 = r["box"]
        rows, cols = np.nonzero(figure)
        assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        if r["occluder"]:
            ox0, oy0, ox1, oy1 = r["occluder"]
            assert (parts[oy0:oy1, ox0:ox1] == 0).all()
        else:
            assert set(range(1, 6)) <= set(np.unique(parts).tolist()), r["image"]
    # a figure pixel may match the background by chance, but hardly ever
    assert changed_on_figure / figure_pixels > 0.97


def test_keypoints_lie_on_the_figure(synth):
    root, _, records = synth
    for r in records:
        figure = read(root, r["parts"]) != 0
        near_figure = figure.copy()  # within 2 pixels of a labelled pixel
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                near_figure |= np.roll(np.roll(figure, dy, axis=0), dx, axis=1)
        for x, y, v in r["keypoints"]:
            assert v in (0, 1, 2)
            if v == 0:
                assert x == y == 0
                continue
            assert 0 <= x < SIZE[1] and 0 <= y < SIZE[0]
            if v == 2:
                assert near_figure[int(y), int(x)], (r["image"], x, y)


CAPTION = re.compile(
    r"^a photo of an? (?:(elderly) )?(man|woman|boy|girl) with (short|long) hair( and a hat)? "
    r"wearing a (\w+) (short|long)-sleeved top and (?:a (\w+) skirt|(\w+) (trousers|shorts))"
    r"(?:, carrying a (backpack|handbag))?\.$"
)


def test_captions_and_vectors_match_attributes(synth):
    _, meta, records = synth
    for r in records:
        m = CAPTION.match(r["caption"])
        assert m, r["caption"]
        elderly, noun, hair, hat, upper, sleeve, skirt_color, lower_color, lower, bag = m.groups()
        parsed = {
            "gender": "male" if noun in ("man", "boy") else "female",
            "age": "elderly" if elderly else "child" if noun in ("boy", "girl") else "adult",
            "hair": hair,
            "upper_type": f"{sleeve}_sleeve",
            "upper_color": upper,
            "lower_type": "skirt" if skirt_color else lower,
            "lower_color": skirt_color or lower_color,
            "bag": bag or "none",
            "hat": "hat" if hat else "none",
        }
        assert parsed == r["attributes"], r["caption"]
        one_hot = [
            int(r["attributes"][g] == v) for g, vs in meta["attribute_groups"].items() for v in vs
        ]
        assert r["attribute_vector"] == one_hot
        offsets = np.cumsum([0, *meta["group_sizes"]])
        assert all(sum(one_hot[a:b]) == 1 for a, b in zip(offsets[:-1], offsets[1:], strict=True))


def test_every_identity_is_seen_by_every_camera(synth):
    root, _, records = synth
    seen = {}
    for name in os.listdir(os.path.join(root, "images")):
        pid, cam, _ = re.match(r"(\d+)_c(\d+)_(\d+)\.png$", name).groups()
        seen.setdefault(int(pid), set()).add(int(cam))
    assert sorted(seen) == list(range(IDS))
    assert all(cams == set(range(CAMERAS)) for cams in seen.values())
    assert {(r["pid"], r["camera"]) for r in records} == {
        (p, c) for p, cams in seen.items() for c in cams
    }


def test_two_cameras_at_least_with_fewer_images_than_cameras(tmp_path):
    generate(str(tmp_path), 5, 2, 4, (64, 32), seed=3)
    with open(tmp_path / "labels.jsonl") as f:
        records = [json.loads(line) for line in f]
    for pid in range(5):
        assert len({r["camera"] for r in records if r["pid"] == pid}) == 2


def test_attributes_are_visible(synth):
    """The upper-body colour is the nearest named colour to the median top pixel (lighting
    removed), children are drawn shorter, long hair covers more of the head class."""
    root, meta, records = synth
    gains = {c["camera"]: np.array(c["gain"]) for c in meta["cameras"]}
    names = meta["attribute_groups"]["upper_color"]
    correct, heights, hair = 0, {}, {"short": [], "long": []}
    for r in records:
        image, parts = read(root, r["image"]).astype(float), read(root, r["parts"])
        mean = np.median(image[parts == 2], axis=0) / gains[r["camera"]]
        nearest = min(names, key=lambda n: np.linalg.norm(mean - COLOR_RGB[n]))
        correct += nearest == r["attributes"]["upper_color"]
        if not r["occluder"]:
            kind = "child" if r["attributes"]["age"] == "child" else "grown"
            heights.setdefault((r["camera"], kind), []).append(r["box"][3] - r["box"][1])
            hair[r["attributes"]["hair"]].append((parts == 1).sum())
    assert correct / len(records) > 0.95
    for cam in range(CAMERAS):
        child, grown = heights.get((cam, "child")), heights.get((cam, "grown"))
        if child and grown:
            assert np.mean(child) < 0.85 * np.mean(grown)
    if hair["short"] and hair["long"]:
        assert np.mean(hair["long"]) > np.mean(hair["short"])


def test_deterministic_across_runs_and_workers(tmp_path):
    generate(str(tmp_path / "a"), 6, 3, 2, (64, 32), seed=7)
    generate(str(tmp_path / "b"), 6, 3, 2, (64, 32), seed=7, workers=2)
    generate(str(tmp_path / "c"), 6, 3, 2, (64, 32), seed=8)
    names = sorted(os.listdir(tmp_path / "a" / "images"))
    assert len(names) == 18
    for sub in ("images", "parts"):
        for name in names:
            a = (tmp_path / "a" / sub / name).read_bytes()
            assert a == (tmp_path / "b" / sub / name).read_bytes()
    assert (tmp_path / "a" / "labels.jsonl").read_text() == (
        tmp_path / "b" / "labels.jsonl"
    ).read_text()
    differs = [
        (tmp_path / "a" / "images" / n).read_bytes() != (tmp_path / "c" / "images" / n).read_bytes()
        for n in names
    ]
    assert all(differs)


def run_synth(argv: list[str]) -> int:
    """`clasp synth ARGS` through the command's own parser (building the full CLI would
    import every other command)."""
    parser = argparse.ArgumentParser(prog="clasp synth")
    synthetic.add_arguments(parser)
    return synthetic.main(parser.parse_args(argv))


def test_cli(tmp_path, capsys):
    assert COMMANDS["synth"][0] == "clasp.data.synthetic"
    out = str(tmp_path / "set")
    args = ["--out", out, "--ids", "3", "--images-per-id", "2", "--cameras", "2"]
    assert run_synth([*args, "--size", "96x48", "--seed", "1"]) == 0
    assert Image.open(os.path.join(out, "images", "00000_c00_000.png")).size == (48, 96)
    assert "6 images" in capsys.readouterr().out
    assert run_synth(args) == 2  # refuses to overwrite
    assert "--force" in capsys.readouterr().err
    assert run_synth([*args, "--force"]) == 0
    assert run_synth(["--out", str(tmp_path / "x"), "--cameras", "3", "--images-per-id", "1"]) == 2
    assert "two of them" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_synth(["--out", out, "--size", "tall"])


def test_dataset_splits_and_samples(synth):
    root, meta, _ = synth
    split = {
        s: build_dataset("synth", root, s) for s in ("all", "train", "test", "query", "gallery")
    }
    assert len(split["all"]) == IDS * PER_ID
    assert not set(split["train"].pids) & set(split["test"].pids)
    assert set(split["train"].pids) | set(split["test"].pids) == set(range(IDS))
    query, gallery = split["query"], split["gallery"]
    assert not set(query.paths) & set(gallery.paths)
    assert sorted(query.paths + gallery.paths) == sorted(split["test"].paths)
    for pid, cam in zip(query.pids, query.cameras, strict=True):
        assert any(
            p == pid and c != cam for p, c in zip(gallery.pids, gallery.cameras, strict=True)
        )
    ds = split["all"]
    assert ds.num_ids == IDS and ds.num_cameras == CAMERAS
    assert ds.part_names == meta["part_names"] and ds.attribute_names == meta["attribute_names"]
    sample = ds[5]
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, *SIZE)
    assert sample["parts"].dtype == torch.int64 and sample["parts"].shape == SIZE
    stored = read(root, ds.records[5]["parts"]).astype(np.int64)
    assert torch.equal(sample["parts"], torch.from_numpy(np.where(stored == 255, -1, stored)))
    assert sample["attributes"].tolist() == ds.records[5]["attribute_vector"]
    assert sample["keypoints"].shape == (17, 3) and isinstance(sample["caption"], str)
    assert (sample["pid"], sample["camera"]) == (ds.records[5]["pid"], ds.records[5]["camera"])
