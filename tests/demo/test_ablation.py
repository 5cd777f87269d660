"""The ablation at a tiny scale: every variant and seed runs, the table's mean and std are the
seeds' own, a second run resumes, and each variant's settings reach its pre-training."""

import json
import statistics

import torch
import yaml

from clasp.cli import main as clasp_main
from clasp.demo.ablation import VARIANTS, aggregate, markdown


def test_tiny_ablation_runs_every_variant_and_seed_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--ablation", "--scale", "tiny", "--out", str(out), "--seeds"]
    threads = torch.get_num_threads()
    try:
        assert clasp_main([*argv, "1"]) == 0
        capsys.readouterr()
        assert clasp_main([*argv, "2"]) == 0  # a second seed reuses the first seed's runs
        second = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    for variant in VARIANTS:
        assert f"{variant}-seed0: finished by an earlier run" in second
        assert f"[demo] {variant}-seed1 ..." in second
    summary = json.loads((out / "ablation" / "ablation.json").read_text())
    assert list(summary["table"]) == list(VARIANTS) and summary["seeds"] == [0, 1]
    for variant, row in summary["table"].items():
        assert set(row) == {"reid", "attributes", "parsing", "pose"}
        for protocol, cell in row.items():
            runs = [
                json.loads((out / "ablation" / f"{variant}-seed{s}" / "eval.json").read_text())
                for s in (0, 1)
            ]
            values = [r[protocol]["value"] for r in runs]
            assert cell["values"] == values
            assert abs(cell["mean"] - statistics.fmean(values)) < 1e-12
            assert abs(cell["std"] - statistics.stdev(values)) < 1e-12
    assert "finished by an earlier run" in second and "| full CLASP |" in second
    # Each variant pre-trained with its own settings and seed.
    config = yaml.safe_load((out / "ablation" / "sd-seed1" / "config.yaml").read_text())
    assert config["seed"] == 1 and config["model"]["moe"]["blocks"] == []
    assert config["data"]["labels"] is None
    config = yaml.safe_load((out / "ablation" / "sd+part-seed0" / "config.yaml").read_text())
    assert config["loss"]["attribute"] == 0 and config["data"]["labels"]
    config = yaml.safe_load((out / "ablation" / "moe-seed0" / "config.yaml").read_text())
    assert config["model"]["prompt"]["routing"] is False and config["model"]["moe"]["blocks"]


def test_table_is_mean_and_sample_std_per_task():
    def result(value):
        return {"reid": {"metric": "mAP", "value": value}}

    table = aggregate({"sd": {0: result(0.1), 1: result(0.3)}, "clasp": {0: result(0.5)}})
    assert abs(table["sd"]["reid"]["mean"] - 0.2) < 1e-12
    assert abs(table["sd"]["reid"]["std"] - 0.1414213562) < 1e-9
    assert table["clasp"]["reid"]["std"] == 0.0  # one seed
    text = markdown(table, [0, 1])
    assert "| self-distillation only | 20.0 ± 14.1 |" in text
    assert "| full CLASP | 50.0 ± 0.0 |" in text
