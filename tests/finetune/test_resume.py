"""A run stopped by a signal and resumed with --resume is bit-exact on the CPU: the same
losses at every step and the same fine-tuned weights as the uninterrupted run."""

import signal

import pytest
import torch
from safetensors.torch import load_file

from clasp.cli import main as clasp_main
from clasp.finetune.step import FinetuneStep
from tests.utils import FAST, finetune_argv, records

STEPS = 4


def losses(rows):
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]


@pytest.mark.parametrize("recipe", ["reid", "attributes", "parsing", "pose"])
def test_a_resumed_run_is_bit_exact(recipe, synth, tiny_model, tmp_path, monkeypatch):
    def command(out, *more):
        return finetune_argv(
            recipe, synth, "synth", out, *FAST, f"optim.steps={STEPS}",
            "data.max_eval_images=8", *more, model=tiny_model,
        )  # fmt: skip

    assert clasp_main(command(tmp_path / "straight")) == 0
    real = FinetuneStep.__call__

    def stopped_after_two(self, batch, step, stop=0):  # as if SIGTERM came during step 2
        metrics, ok, stop = real(self, batch, step, stop)
        return metrics, ok, signal.SIGTERM if step == 1 else stop

    monkeypatch.setattr(FinetuneStep, "__call__", stopped_after_two)
    killed = tmp_path / "killed"
    assert clasp_main(command(killed)) == 0
    assert len(records(killed)) == 2 and not (killed / "model.safetensors").exists()
    monkeypatch.setattr(FinetuneStep, "__call__", real)
    assert clasp_main([*command(killed), "--resume"]) == 0
    assert losses(records(killed)) == losses(records(tmp_path / "straight"))
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
