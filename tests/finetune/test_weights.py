"""Starting weights: every kind of file loads, and a file whose keys do not fit is refused
with one line that names the keys and says what the file is."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from clasp.cli import main as clasp_main
from clasp.finetune.weights import CheckpointError, load_initial
from clasp.model import build_backbone, save_backbone
from tests.utils import finetune, finetune_argv

OVERRIDES = {"img_size": None, "drop_path_rate": 0.0, "kernels": None, "grad_checkpointing": False}


def refused(capsys, synth, checkpoint, *extra) -> str:
    argv = finetune_argv("reid", synth, "synth", None, "--eval-only", *extra, checkpoint=checkpoint)
    capsys.readouterr()
    assert clasp_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_exports_checkpoints_and_plain_state_dicts_load(tiny_model, tmp_path):
    backbone = build_backbone(tiny_model, seed=1)
    export = str(tmp_path / "export.safetensors")
    save_backbone(backbone, export)
    checkpoint = str(tmp_path / "checkpoint.pt")
    model_state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    torch.save({"config": {"model": backbone.config}, "model": model_state, "step": 3}, checkpoint)
    images = torch.randn(2, 3, 64, 32)
    expected = backbone.eval().extract(images, "reid")[0]
    for path in (export, checkpoint):
        loaded = load_initial(path, None, OVERRIDES).backbone.eval()
        torch.testing.assert_close(loaded.extract(images, "reid")[0], expected)
    # A timm-style state dict (under "state_dict", with "module." names) and --config.
    timm_keys = {f"module.{k.removeprefix('vit.')}": v for k, v in backbone.state_dict().items()}
    plain = str(tmp_path / "plain.pth")
    torch.save({"state_dict": timm_keys}, plain)
    loaded = load_initial(plain, tiny_model, OVERRIDES).backbone.eval()
    torch.testing.assert_close(loaded.extract(images, "reid")[0], expected)
    # Another fine-tuning size resamples the position embeddings.
    bigger = load_initial(export, None, {**OVERRIDES, "img_size": [96, 48]}).backbone
    assert bigger.vit.pos_embed.shape[1] == 1 + 6 * 3
    assert bigger.extract(torch.randn(1, 3, 96, 48))[1].shape == (1, 6, 3, 32)


def test_a_foreign_vit_without_config_is_described(capsys, synth, tmp_path):
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, embed_dim=48, depth=3, num_heads=2
    )
    path = str(tmp_path / "timm.pth")
    torch.save(vit.state_dict(), path)
    err = refused(capsys, synth, path)
    assert "not a clasp file" in err and "embed_dim 48" in err and "depth 3" in err
    assert "--config" in err


def test_keys_that_do_not_fit_are_named(capsys, synth, tiny_model, tmp_path):
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        embed_dim=32,
        depth=2,
        num_heads=2,
        img_size=(64, 32),
    )
    path = str(tmp_path / "timm.safetensors")
    save_file(vit.state_dict(), path)
    err = refused(capsys, synth, path, "--config", tiny_model)
    # The tiny model's last block is a PC-MoE: the dense MLP's keys do not fit it.
    assert "does not fit the backbone" in err and " missing: blocks.1.mlp." in err
    assert " unexpected: blocks.1.mlp.fc1.bias" in err and "PC-MoE blocks [1]" in err
    # An export with a key removed and one added.
    export = str(tmp_path / "export.safetensors")
    save_backbone(build_backbone(tiny_model, seed=0), export)
    state = load_file(export)
    from safetensors import safe_open

    with safe_open(export, framework="pt") as f:
        meta = f.metadata()
    del state["blocks.0.attn.qkv.weight"]
    state["bottleneck.weight"] = torch.zeros(3)
    save_file(state, export, metadata=meta)
    err = refused(capsys, synth, export)
    assert "1 missing: blocks.0.attn.qkv.weight" in err
    assert "1 unexpected: bottleneck.weight" in err and "a clasp export" in err


def test_bad_paths_files_and_values_are_one_line_errors(capsys, synth, tiny_model, tmp_path):
    assert "no file or folder" in refused(capsys, synth, str(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert "cannot read" in refused(capsys, synth, str(garbage))
    assert "needs --config" in refused(capsys, synth, "random")
    err = refused(capsys, synth, "random", "--config", tiny_model, "optim.layer_decay=2")
    assert "optim.layer_decay" in err
    err = refused(capsys, synth, "random", "--config", tiny_model, "optim.nope=1")
    assert "unknown config key" in err and "'nope'" in err
    err = refused(capsys, synth, "random", "--config", tiny_model, "model.img_size=[60,32]")
    assert "must be a multiple of model.patch_size" in err
    argv = finetune_argv("reid", synth, "peta", None, "--eval-only", model=tiny_model)
    assert clasp_main(argv) == 2
    assert "reads formats market, idfolder, msmt17, synth" in capsys.readouterr().err


def test_the_fine_tuned_model_evaluates_to_its_result(synth, tiny_model, tmp_path):
    run = tmp_path / "run"
    result = finetune("attributes", synth, "synth", run, "optim.steps=3", model=tiny_model)
    again = finetune(
        "attributes",
        synth,
        "synth",
        tmp_path / "eval",
        checkpoint=str(run / "model.safetensors"),
        eval_only=True,
    )
    assert again["metrics"] == result["metrics"] and again["initial"].startswith("a clasp attr")
    # The plain export of the fine-tuned backbone is a clasp backbone for `clasp eval`.
    exported = load_initial(str(run / "backbone.safetensors"), None, OVERRIDES)
    assert exported.head_state is None
    with open(run / "config.yaml") as f:
        assert "recipe: attributes" in f.read()
    with open(run / "result.json") as f:
        assert json.load(f)["protocol"] == "attributes"


def test_a_checkpoint_error_is_a_value_error():
    with pytest.raises(CheckpointError, match="needs --config"):
        load_initial("random", None, OVERRIDES)
