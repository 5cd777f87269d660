"""Zero-shot attributes: the ground truth mapped into the vocabulary's groups, the keypoint
heatmap, the guided embedding wired end to end on a teacher whose answers are known, and
`clasp eval zeroshot` with a tiny random CLIP."""

import json
import math

import pytest
import torch

from clasp.cli import main as clasp_main
from clasp.data.peta import PETA_ATTRIBUTES
from clasp.data.reid import MARKET_AGES, MARKET_BINARY
from clasp.eval.attribute_mapping import vocabulary_targets
from clasp.eval.features import PreparedSet
from clasp.eval.zeroshot import evaluate_zero_shot, keypoint_heatmap
from clasp.teacher.model import TextEmbeddings
from clasp.vocabulary import load_prompts
from tests.utils import make_text_teacher

PROMPTS = load_prompts()
NAMES = PROMPTS.attribute_names


def _vector(names, on, off=()):
    vector = torch.full((len(names),), math.nan)
    vector[[names.index(n) for n in off]] = 0.0
    vector[[names.index(n) for n in on]] = 1.0
    return vector


def _group(target, group):
    values = PROMPTS.attributes[group]
    return {v: target[NAMES.index(f"{group}={v}")].item() for v in values}


def test_peta_and_market_labels_become_one_value_per_group():
    peta = list(PETA_ATTRIBUTES)
    row = torch.zeros(len(peta))
    for name in ("personalFemale", "personalLess30", "hairLong", "upperBodyRed",
                 "upperBodyBlue", "lowerBodyJeans", "carryingMessengerBag"):  # fmt: skip
        row[peta.index(name)] = 1.0
    unlabelled = torch.full((len(peta),), math.nan)
    target = vocabulary_targets("peta", peta, torch.stack([row, unlabelled]), PROMPTS)
    assert _group(target[0], "gender") == {"male": 0.0, "female": 1.0}
    assert _group(target[0], "lower_type") == {"trousers": 1.0, "shorts": 0.0, "skirt": 0.0}
    assert _group(target[0], "hat") == {"none": 1.0, "hat": 0.0}  # PETA lists what is there
    for unknown in ("upper_color", "bag"):  # two colours; a bag the vocabulary does not name
        assert all(math.isnan(v) for v in _group(target[0], unknown).values())
    assert torch.isnan(target[1]).all()

    market = [*MARKET_AGES, *MARKET_BINARY.values()]
    person = _vector(
        market, on=["age_old", "lower_pants", "lower_short", "female", "upblue", "downpurple"],
        off=["age_young", "age_teenager", "age_adult", "backpack", "bag", "handbag",
             "sleeve_short", "hair_long", "hat"] + [f"up{c}" for c in ("black", "white", "red",
             "purple", "yellow", "gray", "green")] + [f"down{c}" for c in ("black", "white",
             "pink", "yellow", "gray", "blue", "green", "brown")],
    )  # fmt: skip
    target = vocabulary_targets("market", market, person[None], PROMPTS)[0]
    assert _group(target, "age") == {"child": 0.0, "adult": 0.0, "elderly": 1.0}
    assert _group(target, "lower_type") == {"trousers": 0.0, "shorts": 1.0, "skirt": 0.0}
    assert _group(target, "bag") == {"none": 1.0, "backpack": 0.0, "handbag": 0.0}
    assert _group(target, "upper_type")["long_sleeve"] == 1.0
    assert _group(target, "upper_color")["blue"] == 1.0
    assert all(math.isnan(v) for v in _group(target, "lower_color").values())  # purple
    with pytest.raises(ValueError, match="zero-shot attributes read formats"):
        vocabulary_targets("ccp", market, person[None], PROMPTS)


def test_keypoint_heatmap_covers_the_limbs_between_labelled_keypoints():
    # A 16 x 8 grid over 128 x 64 pixels (8 px cells); a left arm from shoulder to wrist down
    # column 2, everything else unlabelled.
    keypoints = torch.zeros(2, 17, 3)
    for joint, row in ((5, 2), (7, 5), (9, 8)):  # left shoulder, elbow, wrist
        keypoints[0, joint] = torch.tensor([2.5 * 8, row * 8 + 4.0, 2])
    heat = keypoint_heatmap(keypoints, torch.tensor([[128, 64], [128, 64]]), (16, 8))
    heat = heat.view(2, 16, 8)
    assert torch.allclose(heat[0, 2:9, 2], torch.ones(7))  # on the limb
    assert heat[0, 12:, :].max() < 1e-3 and heat[0, :, 6:].max() < 1e-3  # far from it
    assert heat[0, 5, 3] == pytest.approx(math.exp(-0.5), rel=1e-5)  # one cell away, sigma 1
    assert (heat[1] == 0).all()  # nothing labelled: no heat


class _KnownTeacher:
    """A stand-in teacher whose answers are known: pixel [0, 0, 0] of an image is its index;
    its person patches carry the image's true attribute values and its background patches a
    wrong value of every group, so the pooled embedding of the whole crop (mostly
    background) is wrong and the one that looks at the person is right."""

    image_size, grid_size, device, default_temperature = (16, 8), (4, 2), torch.device("cpu"), 0.01

    def __init__(self, person, truth, wrong):
        self.person, self.truth, self.wrong = person, truth, wrong  # (N, P) bool, (N, A) x 2
        C, A = len(PROMPTS.part_names), len(NAMES)
        eye = torch.eye(C + A)
        self.text = TextEmbeddings(eye[:C], eye[C:], tuple(PROMPTS.group_sizes))

    def text_embeddings(self, prompts):
        return self.text

    def normalize(self, images):
        return images.float()

    def encode_image(self, pixels, patch_weights=None):
        index = pixels[:, 0, 0, 0].long()
        person = self.person[index].float()  # (B, P)
        C = len(PROMPTS.part_names)
        parts = torch.zeros(*person.shape, C)
        parts[..., 0] = 1 - person  # background
        parts[..., 1] = person  # head
        dense = torch.cat([parts, torch.zeros(*person.shape, len(NAMES))], -1)
        codes = (
            person[..., None] * self.truth[index, None]
            + (1 - person[..., None]) * (self.wrong[index, None])
        )
        weights = torch.ones_like(person) if patch_weights is None else patch_weights
        pooled = (weights[..., None] * codes).sum(1) / weights.sum(1, keepdim=True)
        return torch.cat([torch.zeros(len(index), C), pooled], -1), dense


def test_guidance_from_the_teachers_part_labels_reaches_the_pooled_embedding():
    n, patches = 12, 8
    truth, wrong = torch.zeros(n, len(NAMES)), torch.zeros(n, len(NAMES))
    start = 0
    for size in PROMPTS.group_sizes:
        value = torch.randint(size, (n,))
        truth[torch.arange(n), start + value] = 1
        wrong[torch.arange(n), start + (value + 1) % size] = 1
        start += size
    person = torch.zeros(n, patches, dtype=torch.bool)
    person[:, 2:4] = True  # a quarter of the crop is the person
    pixels = torch.zeros(n, 3, 16, 8, dtype=torch.uint8)
    pixels[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    prepared = PreparedSet(
        "known", pixels, [f"{i}.png" for i in range(n)], torch.arange(n), torch.zeros(n),
        torch.tensor([[16, 8]] * n), attributes=truth, attribute_names=list(NAMES),
    )  # fmt: skip
    result = evaluate_zero_shot(_KnownTeacher(person, truth, wrong), prepared, "synth", PROMPTS)
    assert set(result["variants"]) == {"plain", "parts"}  # no keypoints in this set
    parts = result["variants"]["parts"]
    assert parts["value"] == 1.0 and parts["metrics"]["instance_f1"] == 1.0
    assert result["value"] == result["variants"]["plain"]["value"] < 0.5  # always wrong
    assert result["guidance_gain"]["parts"] == pytest.approx(1.0 - result["value"])
    assert set(parts["metrics"]["group_accuracy"].values()) == {1.0}
    assert result["metric"] == "mA" and result["sets"] == {"test": n}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": [64, 32], "patch_size": 8, "width": 32, "layers": 2,
                       "head_width": 16},
        "text_cfg": {"context_length": 32, "width": 32, "heads": 2, "layers": 1},
    }  # fmt: skip
    return make_text_teacher(str(tmp_path_factory.mktemp("clip")), config)


def test_zeroshot_command_scores_plain_and_guided_variants(synth_set, tiny_clip, capsys):
    command = ["eval", "zeroshot", "--teacher", tiny_clip, "--data", synth_set, "--format",
               "synth", "--backend", "reference"]  # fmt: skip
    assert clasp_main(command) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["protocol"] == "zeroshot" and result["split"] == "test"
    assert result["metric"] == "mA" and result["value"] == result["metrics"]["mA"]
    assert set(result["variants"]) == {"plain", "parts", "keypoints"}
    assert result["sets"] == {"test": 24}  # 6 held-out identities x 4 images
    for variant in result["variants"].values():
        metrics = variant["metrics"]
        assert 0 <= metrics["mA"] <= 1 and 0 <= metrics["instance_f1"] <= 1
        assert metrics["num_scored_attributes"] > 0
    assert any(line.startswith("zeroshot [keypoints] on synth:test") for line in out)
    # focus 0 turns the guidance off: every variant is the plain one.
    assert clasp_main([*command, "--focus", "0"]) == 0
    off = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {v["value"] for v in off["variants"].values()} == {off["value"]}


def test_zeroshot_command_refuses_bad_input_in_one_line(synth_set, tiny_clip, tmp_path, capsys):
    missing = ["eval", "zeroshot", "--teacher", str(tmp_path / "nothing"), "--data", synth_set,
               "--format", "synth"]  # fmt: skip
    assert clasp_main(missing) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("clasp eval zeroshot: cannot load the teacher") and "\n" not in error
    no_data = ["eval", "zeroshot", "--teacher", tiny_clip, "--data", str(tmp_path / "none"),
               "--format", "peta"]  # fmt: skip
    assert clasp_main(no_data) == 2
    assert "not found" in capsys.readouterr().err
