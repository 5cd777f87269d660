"""The demo end to end at a tiny scale: every stage runs as a function call (no command line
in between), writes its outputs, and a second run resumes instead of redoing them."""

import importlib
import json
import os

import torch

from clasp.cli import COMMANDS
from clasp.cli import main as clasp_main
from clasp.demo.run import run_demo

STAGES = ("synth", "teacher", "label", "clasp", "baseline", "eval")


def test_tiny_demo_calls_every_stage_as_a_function_and_resumes(tmp_path, capsys, monkeypatch):
    def no_command_line(*args, **kwargs):
        raise AssertionError(f"the demo went through a command's main{args}")

    monkeypatch.setattr("clasp.cli.main", no_command_line)
    for module, _ in COMMANDS.values():  # the synth, label, teacher, pretrain... commands
        monkeypatch.setattr(importlib.import_module(module), "main", no_command_line)
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    try:
        summary = run_demo(str(out), scale="tiny")
        first = capsys.readouterr().out
        monkeypatch.undo()
        assert clasp_main(["demo", "--scale", "tiny", "--out", str(out)]) == 0
        second = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)

    assert summary == json.loads((out / "summary.json").read_text())
    assert set(summary["primary"]) == {"random", "baseline", "clasp"}
    for values in summary["primary"].values():
        assert set(values) == {"reid", "attributes", "parsing", "pose"}
        assert all(0.0 <= v <= 1.0 for v in values.values())
    assert 0 <= summary["wins"] <= 4
    quality = summary["pseudo_label_quality"]
    assert 0 <= quality["part_pixel_accuracy"] <= 1 and 0 <= quality["attribute_mA"] <= 1
    assert 0 <= summary["teacher"]["quality"]["part_mIoU"] <= 1  # the fit scored its teacher
    assert summary["settings"]["config"].endswith(os.path.join("clasp", "configs", "demo.yaml"))
    for name in ("loss_curves.png", "part_labels.png", "task_prompt_matrix.png"):
        assert os.path.getsize(out / name) > 1000, name
    assert len(os.listdir(out / "labels" / "visualize")) == 8
    assert (out / "clasp" / "config.yaml").is_file()  # the random-init baseline is built from it
    assert "| pose (PCK) |" in (out / "results.md").read_text()
    assert "| task (metric) | random init | self-distillation | CLASP |" in first
    assert all(f"[demo] {s}: finished by an earlier run" in second for s in STAGES)
    assert json.loads((out / "summary.json").read_text())["primary"] == summary["primary"]


def test_stages_redo_only_what_other_settings_change(tmp_path, capsys):
    from clasp.demo.run import STAGES_FILE, Stages

    calls = []
    data = {"scale": "tiny", "seed": 0}

    def run_all(settings):
        stages = Stages(str(tmp_path), settings, {})
        depends_on = {k: settings[k] for k in ("scale", "seed")}
        stages.run("synth", lambda: calls.append("synth"), depends_on)
        stages.run("clasp", lambda: calls.append("clasp"))

    run_all({**data, "pretrain_overrides": []})
    run_all({**data, "pretrain_overrides": []})
    assert calls == ["synth", "clasp"]  # the second run finished nothing again
    run_all({**data, "pretrain_overrides": ["optim.steps=5"]})
    assert calls == ["synth", "clasp", "clasp"]  # the synthetic set is kept
    run_all({"scale": "tiny", "seed": 1, "pretrain_overrides": []})
    assert calls[3:] == ["synth", "clasp"]
    # A record of an earlier version (one "settings" for every stage) reads the same way.
    old = {"settings": {**data, "pretrain_overrides": []}, "done": {"synth": 1.0, "clasp": 2.0}}
    (tmp_path / STAGES_FILE).write_text(json.dumps(old))
    calls.clear()
    run_all({**data, "pretrain_overrides": ["optim.steps=5"]})
    assert calls == ["clasp"]
    assert "an earlier run had other settings" in capsys.readouterr().out
