"""`clasp demo` end to end at a tiny scale: every stage runs, writes its outputs, and a second
run resumes instead of redoing them."""

import json
import os

import torch

from clasp.cli import main as clasp_main


def test_tiny_demo_runs_every_stage_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    try:
        assert clasp_main(["demo", "--scale", "tiny", "--out", str(out)]) == 0
        first = capsys.readouterr().out
        assert clasp_main(["demo", "--scale", "tiny", "--out", str(out)]) == 0
        second = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["primary"]) == {"random", "baseline", "clasp"}
    for values in summary["primary"].values():
        assert set(values) == {"reid", "attributes", "parsing", "pose"}
        assert all(0.0 <= v <= 1.0 for v in values.values())
    assert 0 <= summary["wins"] <= 4
    quality = summary["pseudo_label_quality"]
    assert 0 <= quality["part_pixel_accuracy"] <= 1 and 0 <= quality["attribute_mA"] <= 1
    for name in ("loss_curves.png", "part_labels.png", "task_prompt_matrix.png"):
        assert os.path.getsize(out / name) > 1000, name
    assert "| pose (PCK) |" in (out / "results.md").read_text()
    assert "| task (metric) | random init | self-distillation | CLASP |" in first
    stages = ("synth", "teacher", "label", "clasp", "baseline", "eval")
    assert all(f"[demo] {s}: finished by an earlier run" in second for s in stages)
