"""Loading and saving teachers: every source, and the errors for missing weights or towers."""

import json
import os
import time

import open_clip
import pytest
import torch

from clasp.teacher import TeacherLoadError, load_teacher, save_teacher
from tests.utils import TINY_CLIP


def test_saved_teacher_loads_from_directory_config_dict_json_and_open_clip(tiny_teacher_dir):
    from_dir = load_teacher(tiny_teacher_dir)
    weights = os.path.join(tiny_teacher_dir, "open_clip_model.safetensors")
    from_dict = load_teacher(TINY_CLIP, weights)
    config_json = os.path.join(tiny_teacher_dir, "open_clip_config.json")
    from_json = load_teacher(config_json, weights)
    native = open_clip.create_model("local-dir:" + tiny_teacher_dir)
    reference = native.state_dict()
    for teacher in (from_dir, from_dict, from_json):
        state = teacher.model.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert tiny_teacher_dir in from_dir.description
    with open(config_json) as f:
        assert json.load(f)["model_cfg"] == TINY_CLIP


def test_missing_weights_fail_fast_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(TeacherLoadError) as caught:
        load_teacher("ViT-B-32", "openai")
    assert time.perf_counter() - start < 10
    message = str(caught.value)
    assert "'ViT-B-32'" in message and "'openai'" in message and "--pretrained /path" in message
    with pytest.raises(TeacherLoadError, match="checkpoint file not found"):
        load_teacher("ViT-B-32", "/no/such/weights.safetensors")
    with pytest.raises(TeacherLoadError, match="neither a known pretrained tag"):
        load_teacher("ViT-B-32", "no-such-tag")
    with pytest.raises(TeacherLoadError, match="did you mean ViT-B-32"):
        load_teacher("ViT-B-23", "openai")


def test_directory_without_weights_and_non_vit_towers_are_refused(tmp_path):
    config = {"model_cfg": TINY_CLIP}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(TeacherLoadError, match="no weights"):
        load_teacher(str(tmp_path))
    assert load_teacher(str(tmp_path), "random").grid_size == (8, 8)

    resnet = dict(TINY_CLIP, vision_cfg={"image_size": 64, "layers": [1, 1, 1, 1], "width": 8})
    with pytest.raises(TypeError, match="VisionTransformer"):
        load_teacher(resnet, "random")
    with pytest.raises(ValueError, match="dense must be one of"):
        load_teacher(TINY_CLIP, "random", dense="mean")


def test_save_teacher_accepts_full_open_clip_config(tmp_path):
    model = open_clip.CLIP(**TINY_CLIP)
    save_teacher(model, {"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": [0.5] * 3}}, tmp_path)
    teacher = load_teacher(str(tmp_path))
    torch.testing.assert_close(teacher.mean, torch.full((3,), 0.5))
