"""The probes on constructed features, the splits, and every protocol on real data."""

import json
import math
import os

import pytest
import torch

from clasp.cli import main as clasp_main
from clasp.eval.features import (
    FeatureBank,
    parse_task,
    query_gallery_split,
    split_by_group,
    task_key,
)
from clasp.eval.probes import AttributeProbe, HeatmapProbe, PartProbe
from clasp.eval.protocols import SetLoader, run_protocol


def test_attribute_probe_reads_informative_features():
    targets = (torch.rand(200, 5) < torch.tensor([0.5, 0.1, 0.3, 0.8, 0.05])).float()
    targets[torch.rand(200, 5) < 0.1] = float("nan")  # unknown labels are left out
    signal = torch.nan_to_num(targets, nan=0.5) * 2 - 1
    features = torch.cat([signal + 0.3 * torch.randn(200, 5), torch.randn(200, 11)], dim=1)
    probe = AttributeProbe().fit(features[:100], targets[:100])
    predicted = probe.predict(features[100:])
    known = ~torch.isnan(targets[100:])
    assert (predicted == (targets[100:] == 1))[known].float().mean() > 0.95


def _cell_features(labels: torch.Tensor, num_classes: int, dim: int = 12) -> torch.Tensor:
    """Patch features that say a cell's class, plus noise: (N, gh, gw, dim)."""
    one_hot = torch.nn.functional.one_hot(labels.clamp(min=0), num_classes).float()
    noise = torch.randn(*labels.shape, dim - num_classes)
    return torch.cat([one_hot * 3 + 0.2 * torch.randn_like(one_hot), noise], dim=-1)


def test_part_probe_segments_constructed_patch_features():
    grids = torch.randint(0, 4, (40, 4, 2))
    masks = [g.repeat_interleave(8, 0).repeat_interleave(8, 1) for g in grids]  # 32 x 16 px
    patches = _cell_features(grids, 4)
    probe = PartProbe(4).fit(patches[:20], masks[:20])
    predicted = probe.predict(patches[20:], (32, 16))
    truth = torch.stack(masks[20:])
    # Bilinear upsampling blurs cell borders; cell interiors must be right.
    interior = torch.zeros(32, 16, dtype=torch.bool)
    for r in range(4):
        for c in range(2):
            interior[r * 8 + 2 : r * 8 + 6, c * 8 + 2 : c * 8 + 6] = True
    assert (predicted == truth)[:, interior].float().mean() > 0.98


def test_heatmap_probe_finds_keypoints_marked_in_the_features():
    n, gh, gw, k = 60, 8, 4, 3
    cells = torch.randint(0, gh * gw, (n, k))
    features = 0.1 * torch.randn(n, gh * gw, 8)
    for j in range(k):  # feature j is high at keypoint j's cell
        features[torch.arange(n), cells[:, j], j] += 4.0
    rows, cols = cells // gw, cells % gw
    keypoints = torch.stack([(cols + 0.5) * 8, (rows + 0.5) * 8, torch.full_like(rows, 2)], -1)
    probe = HeatmapProbe().fit(features.view(n, gh, gw, 8)[:40], keypoints[:40].float(), (64, 32))
    predicted = probe.predict(features.view(n, gh, gw, 8)[40:], (64, 32))
    error = (predicted - keypoints[40:, :, :2]).norm(dim=-1)
    assert error.max() < 8.0  # within the right 8 x 8 px cell


def test_query_gallery_split_takes_the_first_image_per_identity_and_camera():
    pids = torch.tensor([1, 1, 1, 2, 2, -1, 1])
    cams = torch.tensor([0, 0, 1, 0, 0, 0, 1])
    assert query_gallery_split(pids, cams) == ([0, 2, 3], [1, 4, 5, 6])
    photos = [f"photo{i % 15}.jpg" for i in range(30)]  # two people per photo
    train, test = split_by_group(photos)
    assert sorted(train + test) == list(range(30)) and train and test
    assert all((i in test) == (i + 15 in test) for i in range(15))  # a photo stays together


def test_task_specs_parse_names_and_mixes():
    assert parse_task("reid") == "reid" and parse_task(None) is None
    assert parse_task("reid=0.5,parsing=0.5") == {"reid": 0.5, "parsing": 0.5}
    assert task_key({"parsing": 0.5, "reid": 0.5}) == "parsing=0.5,reid=0.5"
    with pytest.raises(ValueError, match="name=weight"):
        parse_task("reid=half")


REAL_SETS = [
    pytest.param("reid", "market", "mini_market1501", None, id="reid-market"),
    pytest.param("reid", "idfolder", "col780_reid", None, id="reid-col780"),
    pytest.param("attributes", "peta", "peta", 64, id="attributes-peta"),
    pytest.param("attributes", "market", "mini_market1501", None, id="attributes-market"),
    pytest.param("parsing", "ccp", "ccp", 24, id="parsing-ccp"),
    pytest.param("pose", "coco", "tiny_coco", None, id="pose-coco"),
]


@pytest.mark.parametrize("protocol, format, folder, max_images", REAL_SETS)
def test_protocol_runs_on_real_data(protocol, format, folder, max_images, encoder, shared_data):
    bank = FeatureBank(encoder, batch_size=32)
    loader = SetLoader(bank.size, max_images=max_images)
    result = run_protocol(protocol, bank, loader, format, os.path.join(shared_data, folder))
    metrics = result["metrics"]
    assert result["metric"] in metrics and 0.0 <= result["value"] <= 1.0
    assert all(n > 0 for n in result["sets"].values())
    if protocol == "reid":
        assert metrics["num_valid_queries"] > 0
        assert metrics["rank1"] <= metrics["rank5"] <= metrics["rank10"]
    elif protocol == "attributes":
        assert metrics["num_scored_attributes"] > 0 and 0 <= metrics["instance_f1"] <= 1
    elif protocol == "parsing":
        assert 0 < metrics["pixel_accuracy"] <= 1 and metrics["per_class_iou"]
    else:
        assert metrics["num_keypoints"] > 0


def test_reid_on_a_folder_without_identities_says_what_to_use(encoder, shared_data):
    bank = FeatureBank(encoder)
    loader = SetLoader(bank.size, max_images=8)
    with pytest.raises(ValueError, match="no identities.*idfolder"):
        run_protocol("reid", bank, loader, "folder", os.path.join(shared_data, "ccp", "photos"))


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_eval_all_prints_the_task_prompt_matrix_and_is_deterministic(
    synth_set, tiny_config, tmp_path, capsys
):
    argv = ["eval", "all", "--checkpoint", "random", "--config", tiny_config,
            "--data", synth_set, "--format", "synth", "--out", str(tmp_path)]  # fmt: skip
    assert clasp_main(argv) == 0
    first = _last_json(capsys.readouterr().out)
    assert first["prompts"] == ["reid", "attributes", "parsing", "pose", "generic"]
    assert first["protocols"] == ["reid", "attributes", "parsing", "pose"]
    values = torch.tensor(first["values"])
    assert values.shape == (4, 5) and ((values >= 0) & (values <= 1)).all()
    assert os.path.getsize(tmp_path / "task_prompt_matrix.png") > 1000
    assert (
        json.loads((tmp_path / "task_prompt_matrix.json").read_text())["values"] == first["values"]
    )
    assert clasp_main(argv) == 0
    assert _last_json(capsys.readouterr().out)["values"] == first["values"]


def test_eval_single_protocol_with_a_prompt_mix(synth_set, tiny_config, capsys):
    argv = ["eval", "pose", "--checkpoint", "random", "--config", tiny_config,
            "--data", synth_set, "--format", "synth", "--task", "pose=0.5,parsing=0.5"]  # fmt: skip
    assert clasp_main(argv) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["task"] == "parsing=0.5,pose=0.5" and result["metric"] == "PCK"
    assert not math.isnan(result["value"])


def test_eval_errors_are_clear(synth_set, capsys):
    assert clasp_main(["eval", "reid", "--checkpoint", "random", "--data", synth_set,
                       "--format", "synth"]) == 2  # fmt: skip
    assert "needs --config" in capsys.readouterr().err
    missing = ["eval", "reid", "--checkpoint", "/no/such.safetensors", "--data", synth_set,
               "--format", "synth"]  # fmt: skip
    assert clasp_main(missing) == 2
    assert "no backbone file" in capsys.readouterr().err


def test_prompt_mix_curve_runs_every_protocol_and_takes_end_points_from_the_matrix(
    synth_set, tiny_config
):
    from clasp.eval.features import load_encoder
    from clasp.eval.protocols import PROTOCOLS, prompt_mix_curve, task_prompt_matrix

    bank = FeatureBank(load_encoder("random", tiny_config, seed=0))
    loader = SetLoader(bank.size)
    curve = prompt_mix_curve(bank, loader, synth_set, "reid", "parsing", steps=3)
    assert curve["weights"] == [0.0, 0.5, 1.0] and curve["protocols"] == list(PROTOCOLS)
    matrix = task_prompt_matrix(bank, loader, synth_set, ["reid", "parsing"])
    for row, cells in zip(curve["values"], matrix["values"], strict=True):
        assert [row[0], row[2]] == cells  # the end points are the prompts themselves
    marked = {**matrix, "values": [[-1.0, -2.0] for _ in matrix["values"]]}
    reused = prompt_mix_curve(bank, loader, synth_set, "reid", "parsing", steps=3, matrix=marked)
    for row, again in zip(curve["values"], reused["values"], strict=True):
        assert again == [-1.0, row[1], -2.0]
    with pytest.raises(ValueError, match="at least 2 points"):
        prompt_mix_curve(bank, loader, synth_set, "reid", "parsing", steps=1)
    # Known cells of the matrix are taken as they are; the others are run.
    known = {("pose", "parsing"): -3.0}
    again = task_prompt_matrix(bank, loader, synth_set, ["reid", "parsing"], known=known)
    pose = matrix["protocols"].index("pose")
    assert again["values"][pose] == [matrix["values"][pose][0], -3.0]
    assert [r for i, r in enumerate(again["values"]) if i != pose] == [
        r for i, r in enumerate(matrix["values"]) if i != pose
    ]
