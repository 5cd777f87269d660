"""The teacher fit's training data: captions and per-group targets from PETA's attribute
names and from synthetic attribute vectors."""

import math
import os

import torch

from clasp.teacher.fit_data import (
    CaptionedImages,
    detect_format,
    group_targets,
    peta_targets,
)
from clasp.vocabulary import attribute_caption, attribute_words, load_prompts
from tests.utils import one_thread  # noqa: F401  (autouse: one torch thread per test)


def test_peta_captions_and_targets_come_from_its_attribute_names(shared_data):
    prompts = load_prompts()
    root = os.path.join(shared_data, "peta")
    assert detect_format(root) == "peta"
    data = CaptionedImages(root, "peta", "train", prompts, (64, 32), (8, 4), max_images=6)
    assert len(data) == 6 and data.pixels.shape == (6, 3, 64, 32) and data.grids is None
    assert all(c.startswith("a photo of a person: ") and len(c) > 25 for c in data.captions)
    sizes = torch.tensor(prompts.group_sizes)
    assert ((data.targets >= -1) & (data.targets < sizes)).all() and (data.targets >= 0).any()
    groups = {g: list(v) for g, v in prompts.attributes.items()}
    targets = peta_targets(["personalFemale", "upperBodyRed", "upperBodyBlue", "hairLong"], groups)
    by_group = dict(zip(groups, targets, strict=True))
    assert by_group["gender"] == groups["gender"].index("female")
    assert by_group["upper_color"] == -1  # two colours: ambiguous
    assert by_group["hat"] == groups["hat"].index("none")  # PETA lists what is present
    assert by_group["bag"] == -1
    assert attribute_words("upperBodyShortSleeve") == "upper body short sleeve"
    assert attribute_words("upper_color=red") == "upper color red"
    assert attribute_caption(["personalMale", "hairShort"]) == (
        "a photo of a person: personal male, hair short"
    )


def test_synthetic_examples_carry_captions_one_hot_targets_and_part_grids(synth_set):
    prompts = load_prompts()
    assert detect_format(synth_set) == "synth"
    data = CaptionedImages(synth_set, "synth", "train", prompts, (64, 32), (8, 4))
    assert len(data) == 24 and data.grids.shape == (24, 8, 4)  # 6 train identities x 4
    assert (data.targets >= 0).all()  # every synthetic group has exactly one value
    assert ((data.grids >= -1) & (data.grids < len(prompts.part_names))).all()
    assert all(c.startswith("a photo of") for c in data.captions)


def test_group_targets_need_exactly_one_known_value_per_group():
    groups = {"a": ["x", "y"], "b": ["u", "v", "w"], "c": ["p", "q"]}
    nan = math.nan
    assert group_targets([0, 1, 0, 0, 1, 1, 0], groups) == [1, 2, 0]
    assert group_targets([1, 1, 0, 0, 0, 0, nan], groups) == [-1, -1, -1]
