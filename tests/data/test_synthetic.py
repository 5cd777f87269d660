"""`clasp synth`: ground truth consistent with the pixels, cameras, captions, determinism."""

import argparse
import dataclasses
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
from clasp.data.render import blur_radius, render
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


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within `radius` (per axis) of a True pixel."""
    out = mask.copy()
    padded = np.pad(mask, radius)
    h, w = mask.shape
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def test_part_masks_match_the_figure_pixels(synth):
    """Re-render every image without the person (same random draws): without the camera's
    blur the pixels that changed are exactly the labelled ones; with it (the stored file,
    which the full render reproduces) they spill at most the blur's reach past the mask."""
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

        def draw(figure, sharp=False, r=r, identity=identity):
            rng = np.random.default_rng([seed, r["pid"], r["camera"], r["n"]])
            camera = cameras[r["camera"]]
            if sharp:
                camera = dataclasses.replace(camera, blur=0.0)
            return render(identity, camera, rng, SIZE, occlusion=0.4, draw_figure=figure)

        drawn = draw(True)
        assert np.array_equal(drawn.image, image)
        assert np.array_equal(drawn.parts, np.where(parts == 255, -1, parts))
        figure = parts != 0
        changed = np.any(draw(False).image != image, axis=-1)
        reach = dilate(figure, blur_radius(drawn.blur))
        assert not changed[~reach].any(), f"{r['image']}: pixels changed beyond the blur"
        sharp = draw(True, sharp=True)
        assert np.array_equal(sharp.parts, drawn.parts) and sharp.blur == 0.0
        changed = np.any(draw(False, sharp=True).image != sharp.image, axis=-1)
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
    """The upper-body colour is the nearest named colour to the median top pixel (the
    camera's gain removed); a child fills the box too, but with a larger head (shoulders
    lower in the box); long hair covers more of the head class."""
    root, meta, records = synth
    gains = {c["camera"]: np.array(c["gain"]) for c in meta["cameras"]}
    names = meta["attribute_groups"]["upper_color"]
    correct, shoulders, hair = 0, {"child": [], "grown": []}, {"short": [], "long": []}
    for r in records:
        image, parts = read(root, r["image"]).astype(float), read(root, r["parts"])
        mean = np.median(image[parts == 2], axis=0) / gains[r["camera"]]
        nearest = min(names, key=lambda n: np.linalg.norm(mean - COLOR_RGB[n]))
        correct += nearest == r["attributes"]["upper_color"]
        if not r["occluder"]:
            kind = "child" if r["attributes"]["age"] == "child" else "grown"
            y0, y1 = r["box"][1], r["box"][3]
            ys = [r["keypoints"][k][1] for k in (5, 6) if r["keypoints"][k][2] > 0]
            shoulders[kind] += [(y - y0) / (y1 - y0) for y in ys]
            hair[r["attributes"]["hair"]].append((parts == 1).sum())
    assert correct / len(records) > 0.95
    if shoulders["child"] and shoulders["grown"]:
        assert np.mean(shoulders["child"]) > np.mean(shoulders["grown"]) + 0.02
    if hair["short"] and hair["long"]:
        assert np.mean(hair["long"]) > np.mean(hair["short"])


def test_figure_fills_a_detector_crop(synth):
    """Like a person detector's box resized to the crop: the unoccluded figure spans most of
    the height and width, centred."""
    _, _, records = synth
    h, w = SIZE
    clear = [r for r in records if not r["occluder"]]
    assert len(clear) >= 10
    heights = np.array([(r["box"][3] - r["box"][1]) / h for r in clear])
    widths = np.array([(r["box"][2] - r["box"][0]) / w for r in clear])
    centres = np.array([(r["box"][0] + r["box"][2]) / 2 / w for r in clear])
    assert heights.min() >= 0.78 and heights.max() <= 0.97, heights
    assert 0.85 <= np.median(heights) <= 0.95
    assert np.median(widths) >= 0.7 and widths.max() <= 1.0
    assert np.abs(centres - 0.5).max() < 0.15


def test_backgrounds_differ_within_a_camera():
    """A camera shows each image in front of another part of its scene, with other
    clutter: two images of one camera differ behind the person about as much as two images
    of different cameras do."""
    seed, size, ids = SESSION_SEED % 10_000, (64, 32), 12
    values = check_vocabulary(load_prompts().attributes)
    # without sensor noise, which alone would make any two images differ a little
    cameras = [dataclasses.replace(setup_camera(seed, c, size), noise=0.0) for c in range(2)]
    identity = sample_identity(seed, 0, values)

    def backdrop(camera, n):
        rng = np.random.default_rng([seed, 0, camera, n])
        drawn = render(identity, cameras[camera], rng, size, occlusion=0.0, draw_figure=False)
        return drawn.image.astype(float)

    within = [np.abs(backdrop(0, n) - backdrop(0, n + 1)).mean() for n in range(ids)]
    across = [np.abs(backdrop(0, n) - backdrop(1, n)).mean() for n in range(ids)]
    assert min(within) > 12  # grey levels; lighting jitter alone moves them by about 5
    assert np.median(within) > 0.6 * np.median(across)


def test_cameras_are_described_in_meta(synth):
    _, meta, records = synth
    for c in meta["cameras"]:
        assert set(c) >= {"camera", "view", "views", "gain", "figure_scale", "tilt", "blur"}
        assert abs(sum(c["views"].values()) - 1) < 1e-3
        assert c["view"] == max(c["views"], key=c["views"].get)
    assert {r["view"] for r in records} <= {"front", "back", "side_right", "side_left"}


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
