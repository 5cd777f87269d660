"""Checkpoints and exports that cannot be used give one line naming the file, what is wrong
and what to do (exit 2), from every command that loads them: eval, export, pretrain
--resume."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clasp.cli import main as clasp_main
from clasp.model import load_backbone
from clasp.model.io import CheckpointError

# One worker builds the `labelled_run` these tests share.
pytestmark = pytest.mark.xdist_group("labelled-run")


def _truncated(path: str, target) -> str:
    data = open(path, "rb").read()
    target.write_bytes(data[: len(data) // 2])
    return str(target)


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"clasp {command}: ") and "\n" not in err, err
    return err


def _eval(capsys, checkpoint: str, synth_root: str) -> str:
    argv = ["eval", "reid", "--checkpoint", checkpoint, "--data", synth_root, "--format", "synth"]
    assert clasp_main(argv) == 2
    return _one_line(capsys, "eval")


def test_truncated_checkpoints_and_exports(labelled_run, synth_root, tmp_path, capsys):
    config_file, checkpoint, export = labelled_run
    bad_checkpoint = _truncated(checkpoint, tmp_path / "checkpoint.pt")
    err = _eval(capsys, bad_checkpoint, synth_root)
    assert f"cannot read {bad_checkpoint}: it is truncated, damaged" in err
    assert clasp_main(["export", "--checkpoint", bad_checkpoint, "--out", str(tmp_path / "x")]) == 2
    assert "truncated" in _one_line(capsys, "export")
    bad_export = _truncated(export, tmp_path / "backbone.safetensors")
    err = _eval(capsys, bad_export, synth_root)
    assert f"cannot read {bad_export}: it is truncated or damaged" in err and "clasp export" in err
    # --resume of a truncated checkpoint (the run's own, cut in half)
    run = tmp_path / "run"
    run.mkdir()
    _truncated(checkpoint, run / "checkpoint.pt")
    resume = ["pretrain", "--config", config_file, f"output_dir={run}", "--resume"]
    assert clasp_main(resume) == 2
    assert "it is truncated, damaged or not a torch checkpoint" in _one_line(capsys, "pretrain")


def test_a_pickled_module_or_a_foreign_file_is_refused(synth_root, tmp_path, capsys):
    module = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), module)
    assert "holds pickled Python objects" in _eval(capsys, str(module), synth_root)
    state = tmp_path / "state.pt"
    torch.save({"weight": torch.ones(2)}, state)
    assert "neither a clasp export nor a clasp training checkpoint" in _eval(
        capsys, str(state), synth_root
    )
    text = tmp_path / "notes.safetensors"
    text.write_text("not a tensor file")
    assert "truncated or damaged" in _eval(capsys, str(text), synth_root)


def test_an_export_whose_config_does_not_fit_its_weights(
    labelled_run, synth_root, tmp_path, capsys
):
    export = labelled_run[2]
    with safe_open(export, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edited = tmp_path / "edited.safetensors"
    config = json.loads(meta["config"])
    save_file(tensors, edited, metadata={**meta, "config": json.dumps({**config, "depth": 3})})
    err = _eval(capsys, str(edited), synth_root)
    # depth 3 puts the MoE (moe.blocks [-1]) in block 2: block 1's MoE weights do not fit
    assert (
        "its weights do not fit the model config stored with them (" in err
        and " missing: blocks." in err
    )
    assert " unexpected: blocks.1.mlp.b1" in err and "export or train it again" in err
    save_file(tensors, edited, metadata={**meta, "config": json.dumps({**config, "num_heads": 5})})
    err = _eval(capsys, str(edited), synth_root)
    assert "does not describe a backbone (model.embed_dim 32 must be divisible" in err
    with pytest.raises(CheckpointError):  # the function fine-tuning calls raises the same
        load_backbone(str(edited))


def test_resume_with_another_architecture_or_without_labels(labelled_run, tmp_path, capsys):
    config_file, checkpoint, _ = labelled_run
    resume = ["pretrain", "--config", config_file, "--resume", checkpoint]
    out = f"output_dir={tmp_path / 'other'}"
    assert clasp_main([*resume, out, "model.embed_dim=64"]) == 2
    err = _one_line(capsys, "pretrain")
    assert f"cannot resume from {checkpoint}: its weights do not fit this run's model" in err
    assert "model.embed_dim: checkpoint 32, this run 64" in err and "--overwrite" in err
    assert clasp_main([*resume, out, "data.labels=null"]) == 2
    err = _one_line(capsys, "pretrain")
    assert "trained with pseudo-labels (data.labels), this run without them" in err
    assert os.path.getsize(checkpoint) > 0  # the checkpoint is left as it was
