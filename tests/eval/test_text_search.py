"""Text-based person search: perfect ranking when the features say what the captions say
(through the probe and through a head), and `clasp eval text-search` end to end."""

import json
import re

import pytest
import torch
import torch.nn as nn

from clasp.cli import main as clasp_main
from clasp.eval.features import FeatureBank
from clasp.eval.protocols import SetLoader
from clasp.eval.text_search import caption_queries, evaluate_text_search
from tests.utils import COLORS, IMAGES_PER_PERSON, PEOPLE, make_text_teacher

NAMES = list(COLORS)
ROTATION = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))[0]


def _code(top: str, trousers: str) -> torch.Tensor:
    """One-hot top colour, one-hot trousers colour, rotated into an 8-d text space."""
    code = torch.zeros(8)
    code[NAMES.index(top)] = code[3 + NAMES.index(trousers)] = 1.0
    return code @ ROTATION


def encode_text(texts: list[str]) -> torch.Tensor:
    """A text tower that reads the two colours of a caption."""
    return torch.stack([_code(*re.findall("|".join(NAMES), t)[:2]) for t in texts])


class MeanColours(nn.Module):
    """An encoder whose pooled feature is the mean colour of the image's upper and lower
    halves (linear in the colours the captions name)."""

    img_size = (32, 16)

    def extract(self, images, task=None):
        half = images.shape[2] // 2
        top, bottom = images[:, :, :half].mean((2, 3)), images[:, :, half:].mean((2, 3))
        return torch.cat([top, bottom], 1), images.new_zeros(len(images), 2, 1, 1)


class ReadColours(nn.Module):
    """An image-text head that names each half's strongest channel (or a wrong one)."""

    def __init__(self, shift: int = 0):
        super().__init__()
        self.shift = shift

    def forward(self, pooled):
        top, bottom = (
            (pooled[:, s].argmax(1) + self.shift) % 3 for s in (slice(0, 3), slice(3, 6))
        )
        codes = [
            _code(NAMES[t], NAMES[b]) for t, b in zip(top.tolist(), bottom.tolist(), strict=True)
        ]
        return torch.stack(codes), torch.tensor(1.0)


def test_search_ranks_the_right_person_first_through_the_probe_and_a_head(cuhk_pedes_set):
    bank = FeatureBank(MeanColours())
    loader = SetLoader(bank.size)
    test_people = sum(p[0] == "test" for p in PEOPLE)
    for head in (None, ReadColours()):
        result = evaluate_text_search(
            bank, loader, "cuhk-pedes", cuhk_pedes_set, encode_text, head=head, l2=1e-6
        )
        metrics = result["metrics"]
        assert result["projection"] == ("probe" if head is None else "head")
        assert metrics["rank1"] == metrics["mAP"] == 1.0, (result["projection"], metrics)
        assert result["metric"] == "rank1" and result["value"] == 1.0
        # every caption of every test image is a query; the gallery is every test image
        assert result["sets"]["queries"] == metrics["num_valid_queries"] == test_people * 4
        assert result["sets"]["gallery"] == test_people * IMAGES_PER_PERSON
    wrong = evaluate_text_search(
        bank, loader, "cuhk-pedes", cuhk_pedes_set, encode_text, head=ReadColours(shift=1)
    )
    assert wrong["metrics"]["rank1"] == 0.0


def test_synthetic_queries_are_one_caption_per_identity():
    texts, pids = caption_queries([["a"], ["a"], ["b"], ["c"]], torch.tensor([4, 4, 5, 5]), True)
    assert texts == ["a", "b", "c"] and pids.tolist() == [4, 5, 5]
    texts, _ = caption_queries([["a", "x"], ["a"]], torch.tensor([4, 4]), False)
    assert texts == ["a", "x", "a"]


@pytest.fixture(scope="module")
def tiny_text_clip(tmp_path_factory):
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 16, "layers": 1,
                       "head_width": 16},
        "text_cfg": {"context_length": 32, "width": 32, "heads": 2, "layers": 1},
    }  # fmt: skip
    return make_text_teacher(str(tmp_path_factory.mktemp("clip")), config)


@pytest.mark.parametrize("format", ["cuhk-pedes", "synth"])
def test_text_search_command_with_a_probe(
    format, cuhk_pedes_set, synth_set, tiny_config, tiny_text_clip, capsys
):
    root = cuhk_pedes_set if format == "cuhk-pedes" else synth_set
    command = ["eval", "text-search", "--checkpoint", "random", "--config", tiny_config,
               "--data", root, "--format", format, "--teacher", tiny_text_clip]  # fmt: skip
    assert clasp_main(command) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["protocol"] == "text-search" and result["projection"] == "probe"
    queries = 12 if format == "cuhk-pedes" else 6  # 3 ids x 2 images x 2; 6 ids once each
    assert result["sets"]["queries"] == queries
    for key in ("rank1", "rank5", "rank10", "mAP"):
        assert 0.0 <= result["metrics"][key] <= 1.0
    assert result["metrics"]["rank1"] <= result["metrics"]["rank5"] <= result["metrics"]["rank10"]
    assert out[-2].startswith(f"text-search [default, probe] on {format}")


def test_text_search_command_needs_a_text_tower(cuhk_pedes_set, tiny_config, capsys):
    command = ["eval", "text-search", "--checkpoint", "random", "--config", tiny_config,
               "--data", cuhk_pedes_set, "--format", "cuhk-pedes"]  # fmt: skip
    assert clasp_main(command) == 2
    error = capsys.readouterr().err.strip()
    assert "needs a text tower: pass --teacher" in error and "\n" not in error
    assert clasp_main([*command, "--teacher", "x", "--projection", "head"]) == 2
    assert "has no image-text head" in capsys.readouterr().err
