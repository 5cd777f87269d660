"""The offline teacher: a short fit saves a teacher that the labeler loads and uses."""

import json
import os

import torch

from clasp.cli import main as clasp_main
from clasp.config import load_config
from clasp.teacher import load_prompts, load_teacher
from clasp.teacher.fit import FIT_DEFAULTS, CaptionedImages, fit, image_features, peta_targets
from tests.utils import assert_close

TINY = [
    "model.embed_dim=16",
    "model.vision_cfg.image_size=[64,32]",
    "model.vision_cfg.patch_size=8",
    "model.vision_cfg.width=32",
    "model.vision_cfg.layers=2",
    "model.vision_cfg.head_width=16",
    "model.text_cfg.width=32",
    "model.text_cfg.heads=2",
    "model.text_cfg.layers=1",
    "batch_size=6",
    "workers=0",
]


def test_fit_saves_a_teacher_the_labeler_loads(synth_set, tmp_path, capsys):
    out = str(tmp_path / "teacher")
    argv = ["teacher", "fit", "--data", synth_set, "--out", out, "steps=25", "lr=3e-3", *TINY]
    assert clasp_main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 25 and summary["format"] == "synth"
    quality = summary["quality"]  # held-out identities, through the labeler's own path
    assert 0 <= quality["part_pixel_accuracy"] <= 1 and 0 <= quality["attribute_mA"] <= 1
    history = [json.loads(line) for line in open(os.path.join(out, "fit_history.jsonl"))]
    first, last = history[:3], history[-3:]
    assert sum(h["parts"] for h in last) < sum(h["parts"] for h in first)
    assert sum(h["loss"] for h in last) < sum(h["loss"] for h in first)

    teacher = load_teacher(out)
    assert teacher.image_size == (64, 32) and teacher.grid_size == (8, 4)
    labels = teacher.label(
        torch.randint(0, 256, (2, 3, 64, 32), dtype=torch.uint8),
        teacher.text_embeddings(load_prompts()),
        backend="reference",
    )
    assert labels["parts"].shape == (2, 8, 4) and labels["attributes"].shape == (2, 31)

    # The features the fit trains are the ones the labeler reads.
    pixels = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        pooled, maskclip, plain = image_features(teacher.model.visual, pixels)
    expected_pooled, expected_dense = teacher.encode_image(pixels)
    assert_close(pooled, expected_pooled)
    assert_close(maskclip, expected_dense)
    _, expected_plain = load_teacher(out, dense="plain").encode_image(pixels)
    assert_close(plain, expected_plain)


def test_peta_captions_and_targets_come_from_its_attribute_names(shared_data, tmp_path):
    prompts = load_prompts()
    data = CaptionedImages(
        os.path.join(shared_data, "peta"), "peta", "train", prompts, (64, 32), (8, 4),
        max_images=6,
    )  # fmt: skip
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

    cfg = load_config(FIT_DEFAULTS, None, [*TINY, "steps=2", "max_images=8"])
    summary = fit(os.path.join(shared_data, "peta"), str(tmp_path / "t"), cfg, log=lambda m: None)
    assert summary["format"] == "peta" and "parts" not in summary["final_losses"]
    assert load_teacher(str(tmp_path / "t")).image_size == (64, 32)
