"""Each recipe trains (its loss falls) and beats its own untrained starting point on the
synthetic set, and runs end to end on the real dev sets."""

import math
import os

import pytest

from tests.utils import finetune, records

# recipe -> (its main loss term, the metric compared, steps, overrides) on the synthetic set.
# Pose compares PCK: at 64x32 the tiny model's keypoint AP stays near 0 (0.3% after 60 steps,
# while PCK goes from 22% to 72%).
SYNTH = {
    "reid": ("id", "mAP", 60, ["optim.lr=1e-3"]),
    "attributes": ("bce", "mA", 30, ["optim.lr=1e-3"]),
    "parsing": ("ce", "mIoU", 30, []),
    "pose": ("mse", "PCK", 60, ["optim.lr=2e-3"]),
}
# recipe, shared-data folder, format, overrides: a few steps on each real set
REAL = [
    ("reid", "mini_market1501", "market", ["optim.lr=1e-3"]),
    (
        "reid",
        "col780_reid",
        "idfolder",
        ["optim.lr=2e-3", "optim.steps=20", "data.max_eval_images=48"],
    ),
    ("attributes", "peta", "peta", ["data.max_eval_images=64"]),
    ("attributes", "mini_market1501", "market", []),
    ("parsing", "ccp", "ccp", ["data.max_eval_images=6"]),
    ("pose", "tiny_coco", "coco", []),
]


def mean(values):
    return sum(values) / len(values)


def loss_fell(log, term, n=4):
    first, last = mean([r[term] for r in log[:n]]), mean([r[term] for r in log[-n:]])
    assert last < first, f"{term}: {first:.4f} -> {last:.4f}"


@pytest.mark.parametrize("recipe", list(SYNTH))
def test_fine_tuning_beats_the_untrained_start(recipe, synth, tiny_model, tmp_path):
    term, metric, steps, overrides = SYNTH[recipe]
    start = finetune(recipe, synth, "synth", tmp_path / "start", model=tiny_model, eval_only=True)
    tuned = finetune(
        recipe,
        synth,
        "synth",
        tmp_path / "run",
        f"optim.steps={steps}",
        *overrides,
        model=tiny_model,
    )
    assert tuned["steps"] == steps and not start["fine_tuned"] and tuned["fine_tuned"]
    log = records(tmp_path / "run")
    assert len(log) == steps and all(math.isfinite(r["loss"]) for r in log)
    loss_fell(log, term)
    assert tuned["metrics"][metric] > start["metrics"][metric], (start["metrics"], tuned["metrics"])


@pytest.mark.parametrize(
    "recipe, folder, fmt, overrides", REAL, ids=[f"{r[0]}-{r[1]}" for r in REAL]
)
def test_recipes_run_on_real_data(
    recipe, folder, fmt, overrides, shared_data, tiny_model, tmp_path
):
    result = finetune(
        recipe,
        os.path.join(shared_data, folder),
        fmt,
        tmp_path,
        "optim.steps=12",
        *overrides,
        model=tiny_model,
    )
    loss_fell(records(tmp_path), {"reid": "id"}.get(recipe, "loss"))
    assert result["format"] == fmt and result["metric"] in result["metrics"]
    assert math.isfinite(result["value"]) and all(n > 0 for n in result["sets"].values())
