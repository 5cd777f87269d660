"""The teacher model: dense features (plain and MaskCLIP), class embeddings, pseudo-labels."""

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clasp.teacher import load_prompts, load_teacher
from clasp.teacher.model import ClipTeacher, _value_path


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir) -> ClipTeacher:
    return load_teacher(tiny_teacher_dir, dense="maskclip")


def _images(teacher, batch=3) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, *teacher.image_size), dtype=torch.uint8)


def test_dense_features_plain_and_maskclip(tiny_teacher_dir):
    plain = load_teacher(tiny_teacher_dir, dense="plain")
    maskclip = load_teacher(tiny_teacher_dir, dense="maskclip")
    pixels = plain.normalize(_images(plain))
    gh, gw = plain.grid_size
    assert (gh, gw) == (8, 8)

    pooled, dense = plain.encode_image(pixels)
    pooled_m, dense_m = maskclip.encode_image(pixels)
    assert pooled.shape == (3, 32) and dense.shape == (3, gh * gw, 32) == dense_m.shape
    # The pooled embedding and the plain tokens are open_clip's own.
    visual = plain.model.visual
    torch.testing.assert_close(pooled, plain.model.encode_image(pixels))
    torch.testing.assert_close(pooled_m, pooled)
    visual.output_tokens = True
    _, tokens = visual(pixels)
    visual.output_tokens = False
    torch.testing.assert_close(dense, tokens @ visual.proj)
    assert not torch.allclose(dense_m, dense, atol=1e-3)


@pytest.mark.parametrize("block_kind", ["default", "custom-scaled-heads"])
def test_maskclip_value_path_is_attention_of_a_token_to_itself(block_kind):
    # With one token, softmax attention is exactly the value path.
    if block_kind == "default":
        block = open_clip.transformer.ResidualAttentionBlock(32, 4, ls_init_value=0.5)
    else:
        block = open_clip.transformer.CustomResidualAttentionBlock(
            32, 4, scale_heads=True, scale_attn_inner=True, scale_attn=True
        )
        torch.nn.init.normal_(block.attn.head_scale)
    x = torch.randn(5, 1, 32)
    with torch.no_grad():
        if block_kind == "default":
            attended = block.ls_1(block.attention(block.ln_1(x)))
        else:
            attended = block.ls_1(block.ln_attn(block.attn(block.ln_1(x))))
        torch.testing.assert_close(_value_path(block, x), attended)


def test_class_embeddings_average_every_prompt_and_template(teacher):
    classes = [["a head", "a face"], ["a shoe"]]
    templates = ["a photo of {}.", "{} in the street"]
    got = teacher.class_embeddings(classes, templates)
    expected = []
    for prompts in classes:
        texts = [t.format(p) for p in prompts for t in templates]
        tokens = teacher.tokenizer(texts)
        each = F.normalize(teacher.model.encode_text(tokens), dim=-1)
        expected.append(F.normalize(each.mean(0), dim=0))
    torch.testing.assert_close(got, torch.stack(expected))
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_label_shapes_ranges_and_attribute_groups(teacher, backend):
    prompts = load_prompts()
    text = teacher.text_embeddings(prompts)
    assert text.parts.shape == (len(prompts.part_names), 32)
    assert text.attributes.shape == (len(prompts.attribute_names), 32)
    labels = teacher.label(_images(teacher, 4), text, threshold=0.2, backend=backend)
    gh, gw = teacher.grid_size
    assert labels["parts"].shape == (4, gh, gw) and labels["parts"].dtype == torch.int64
    assert labels["part_confidence"].shape == (4, gh, gw)
    assert labels["parts"].min() >= -1 and labels["parts"].max() < len(prompts.part_names)
    low = labels["part_confidence"] < 0.2
    assert (labels["parts"][low] == -1).all() and (labels["parts"][~low] >= 0).all()
    attributes = labels["attributes"]
    assert (
        attributes.shape == (4, len(prompts.attribute_names)) and attributes.dtype == torch.float32
    )
    for group in attributes.split(prompts.group_sizes, dim=-1):
        torch.testing.assert_close(group.sum(-1), torch.ones(4))


def test_patch_weights_steer_the_class_tokens_attention(teacher):
    pixels = teacher.normalize(_images(teacher, batch=2))
    pooled, dense = teacher.encode_image(pixels)
    n = dense.shape[1]
    even, _ = teacher.encode_image(pixels, patch_weights=torch.ones(2, n))
    torch.testing.assert_close(even, pooled)  # weights of one leave attention as it was
    # All weight on patch j: the class token attends to itself and to patch j alone, as if
    # the last block saw only those two tokens (up to the 1e-4 floor of the other weights).
    j = int(torch.randint(n, ()))
    weights = torch.zeros(2, n)
    weights[:, j] = 1.0
    focused, dense_focused = teacher.encode_image(pixels, patch_weights=weights)
    x = teacher._tokens_before_last_block(pixels)
    last = teacher.model.visual.transformer.resblocks[-1]
    reference = teacher._pooled(last(x[:, [0, 1 + j]]))
    torch.testing.assert_close(focused, reference, atol=2e-3, rtol=2e-3)
    assert not torch.allclose(focused, pooled, atol=1e-2)
    torch.testing.assert_close(dense_focused, dense)  # the dense features do not move
