"""The backbone API: extract, per-sample task prompts, export and load_backbone, timm weights."""

import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import clasp
from clasp.model import build_backbone, build_model, save_backbone, timm_state_dict
from clasp.teacher import load_teacher
from tests.utils import assert_close

TINY = {
    "img_size": [32, 16],
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 3,
    "num_heads": 2,
    "kernels": "reference",
    "moe": {"blocks": [-2, -1], "num_experts": 4, "top_k": 2, "mlp_ratio": 2.0},
}


@pytest.fixture
def backbone():
    model = build_backbone(TINY).eval()
    with torch.no_grad():  # prompts strong enough to change the routing
        model.prompts.embedding.normal_(std=3.0)
    return model


def test_extract_shapes_any_multiple_of_the_patch(backbone):
    for size in [(32, 16), (48, 24), (16, 8)]:
        images = torch.randn(3, 3, *size)
        pooled, patches = backbone.extract(images, task="reid")
        gh, gw = size[0] // 8, size[1] // 8
        assert pooled.shape == (3, 32) and patches.shape == (3, gh, gw, 32)
        tokens, _ = backbone.forward_tokens(images, backbone.prompts.weights("reid", 3, "cpu"))
        assert torch.equal(pooled, tokens[:, 0])
        assert torch.equal(patches.reshape(3, gh * gw, 32), tokens[:, 1:])


def test_each_sample_gets_its_own_task(backbone):
    images = torch.randn(4, 3, 32, 16)
    tasks = ["reid", "pose", "generic", "attributes"]
    with torch.no_grad():
        pooled, patches = backbone.extract(images, task=tasks)
        for i, task in enumerate(tasks):
            alone, alone_patches = backbone.extract(images[i : i + 1], task=task)
            assert_close(pooled[i : i + 1], alone, scale=10)
            assert_close(patches[i : i + 1], alone_patches, scale=10)
        other, _ = backbone.extract(images, task="parsing")
    assert not torch.allclose(pooled, other), "the task prompt has no effect on the features"


def test_task_mixes_dicts_tensors_and_names_agree(backbone):
    images = torch.randn(2, 3, 32, 16)
    names = backbone.tasks
    with torch.no_grad():
        mix = backbone.extract(images, task={"reid": 0.3, "attributes": 0.7})[0]
        row = torch.tensor(
            [0.3 if t == "reid" else 0.7 if t == "attributes" else 0.0 for t in names]
        )
        assert torch.equal(mix, backbone.extract(images, task=row)[0])
        assert torch.equal(mix, backbone.extract(images, task=row.expand(2, -1))[0])
        one_hot = torch.zeros(len(names))
        one_hot[names.index("pose")] = 1
        assert torch.equal(backbone.extract(images, task="pose")[0], backbone(images, one_hot))
        backbone.default_task = "pose"
        assert torch.equal(backbone(images), backbone(images, "pose"))


def test_bad_tasks_and_sizes_are_explained(backbone):
    images = torch.randn(2, 3, 32, 16)
    with pytest.raises(ValueError, match="unknown task 'faces'.*reid"):
        backbone.extract(images, task="faces")
    with pytest.raises(ValueError, match=r"task weights must be \(5,\) or \(2, 5\)"):
        backbone.extract(images, task=torch.ones(3, 5))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        backbone.extract(torch.randn(2, 3, 30, 16))
    with pytest.raises(KeyError, match="unknown model config keys"):
        build_backbone({"embed_dims": 3})


def test_export_and_load_backbone_round_trip(backbone, tmp_path):
    path = str(tmp_path / "backbone.safetensors")
    save_backbone(backbone, path, default_task="attributes")
    loaded = clasp.load_backbone(path)
    assert not loaded.training and loaded.default_task == "attributes"
    images = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        for task in ("attributes", {"reid": 0.5, "pose": 0.5}):
            want = backbone.extract(images, task=task)
            got = loaded.extract(images, task=task)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert clasp.load_backbone(path, task="reid").default_task == "reid"


def test_export_gives_timm_its_dense_weights(backbone, tmp_path):
    path = str(tmp_path / "backbone.safetensors")
    save_backbone(backbone, path)
    vit = VisionTransformer(
        img_size=(32, 16), patch_size=8, num_classes=0, embed_dim=32, depth=3, num_heads=2
    ).eval()
    missing, unexpected = vit.load_state_dict(timm_state_dict(path), strict=False)
    assert unexpected == []
    assert sorted(missing) == sorted(
        f"blocks.{i}.mlp.{layer}.{p}"
        for i in (1, 2)
        for layer in ("fc1", "fc2")
        for p in ("weight", "bias")
    )
    x = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        want = backbone.vit.blocks[0](backbone.vit._pos_embed(backbone.vit.patch_embed(x)))
        got = vit.blocks[0](vit._pos_embed(vit.patch_embed(x)))
    assert torch.equal(got, want)


def test_build_backbone_with_a_seed_is_reproducible():
    a, b = build_backbone(TINY, seed=3), build_backbone(TINY, seed=3)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    model = build_model({"model": TINY}, num_parts=6, num_attributes=31, dino={"out_dim": 16})
    assert model.part_head.linear.out_features == 6
    assert model.attribute_head.linear.out_features == 31


def test_prompts_from_clip_text_embeddings(backbone):
    clip = load_teacher(
        {
            "embed_dim": 24,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                           "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                         "layers": 1},
        },
        "random",
    )  # fmt: skip
    prompts = backbone.prompts
    prompts.init_from_text(clip.encode_text)
    first = prompts.embedding.detach().clone()
    norms = first.norm(dim=1)
    assert_close(norms, torch.full_like(norms, 0.02 * 32**0.5), scale=10)
    assert torch.linalg.matrix_rank(first) == len(prompts.tasks) - 1  # centred: one dim less
    prompts.init_from_text(clip.encode_text)
    assert torch.equal(prompts.embedding, first)


def test_exports_from_before_configurable_prompts_still_load(tmp_path):
    """Their config has no model.prompt: raw prompts in the router, no modulation."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    legacy = {"normalize": False, "routing": True, "modulation": "none"}
    old = build_backbone({**TINY, "prompt": legacy}, seed=1).eval()
    path = str(tmp_path / "old.safetensors")
    save_backbone(old, path)
    with safe_open(path, framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    del config["prompt"]
    save_file(state, path, metadata={**meta, "config": json.dumps(config)})
    loaded = clasp.load_backbone(path, task="reid")
    images = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        assert torch.equal(loaded.extract(images)[0], old.extract(images, "reid")[0])
