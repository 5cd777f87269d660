"""The offline teacher fit: a short fit saves a teacher that the labeler loads and uses."""

import json
import math
import os

import pytest
import torch

from clasp.cli import main as clasp_main
from clasp.config import load_config
from clasp.teacher import load_prompts, load_teacher
from clasp.teacher.fit import FIT_DEFAULTS, fit, image_features, learning_rate
from tests.utils import (
    assert_close,
    one_thread,  # noqa: F401  (autouse: one torch thread per test)
)

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


def test_fit_on_peta_trains_without_part_masks_and_asks_no_quality(shared_data, tmp_path):
    def no_quality(*args):
        raise AssertionError("a PETA fit has no held-out ground truth to score")

    cfg = load_config(FIT_DEFAULTS, None, [*TINY, "steps=2", "max_images=8"])
    out = str(tmp_path / "t")
    summary = fit(
        os.path.join(shared_data, "peta"), out, cfg, log=lambda m: None, quality=no_quality
    )
    assert summary["format"] == "peta" and "parts" not in summary["final_losses"]
    assert "quality" not in summary
    assert json.load(open(os.path.join(out, "fit.json")))["steps"] == 2
    assert load_teacher(out).image_size == (64, 32)


@pytest.mark.parametrize("steps, warmup", [(180, 10), (25, 10), (3, 10), (7, 1), (5, 0)])
def test_learning_rate_warms_up_from_the_first_step_then_decays_by_half_cosine(steps, warmup):
    lr, min_lr = 2e-3 * (1 + torch.rand(()).item()), 1e-5
    cfg = {"lr": lr, "min_lr": min_lr, "warmup_steps": warmup}
    rates = [learning_rate(step, steps, cfg) for step in range(steps)]
    for step, rate in enumerate(rates):
        if step < warmup:
            expected = lr * (step + 1) / warmup
        else:
            progress = (step - warmup) / max(1, steps - warmup)
            expected = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
        assert rate == pytest.approx(expected, rel=1e-12), step
    assert all(min_lr < r <= lr * (1 + 1e-12) for r in rates)
