"""End-to-end pre-training on a tiny synthetic set: the losses fall, per-sample task weights,
kill-and-resume is bit-exact, NaN stops the run, export round trip."""

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import clasp
from clasp.cli import main as clasp_main
from clasp.train import step as step_module
from clasp.train.checkpoint import load_checkpoint, save_checkpoint
from clasp.train.data import make_loader
from clasp.train.trainer import NonFiniteLossError, Trainer, train
from tests.utils import tiny_config

LOSS_KEYS = ("loss", "dino", "part", "attribute", "load_balance", "z_loss", "grad_norm")


def losses(records):
    return [{k: r[k] for k in LOSS_KEYS if k in r} for r in records]


def test_pseudo_label_losses_fall(synth_root, label_cache, tmp_path, seed):
    # The person fills most of a synthetic crop, so the part labels are not mostly background
    # and no class prior lowers the loss in a few steps: 20 steps at a higher rate.
    config = tiny_config(synth_root, str(tmp_path), label_cache, optim={"steps": 20, "lr": 6e-3})
    config["seed"] = seed
    config["loss"]["joint"] = 1.0
    # Every sample draws "generic" (the label losses at weight 0.5): a steady mix per batch.
    config["tasks"]["sampling"] = {"generic": 1.0}
    result = train(config)
    records = result.records
    assert [r["step"] for r in records] == list(range(1, 21))
    assert all(math.isfinite(r[k]) for r in records for k in LOSS_KEYS if k in r)
    first, last = records[:4], records[-4:]

    def mean(rs, key):
        return sum(r[key] for r in rs) / len(rs)

    # The self-distillation target moves with the EMA teacher, so its loss need not fall in a
    # few steps; the pseudo-label losses, against fixed targets, must.
    for key in ("part", "attribute"):
        assert mean(last, key) < 0.92 * mean(first, key), (key, [r[key] for r in records])
    # The joint loss starts near its floor, the entropy of the junction targets, on this set;
    # it is trained and logged (its arithmetic: tests/losses/test_joint_loss.py).
    assert all(math.isfinite(r["joint"]) and r["joint"] > 0 for r in records)
    assert os.path.isfile(tmp_path / "losses.png")
    assert load_checkpoint(result.checkpoint)["step"] == 20


def test_loss_weights_follow_each_samples_task(synth_root, label_cache, tmp_path):
    trainer = Trainer(tiny_config(synth_root, str(tmp_path), label_cache))
    batch = next(iter(make_loader(trainer.dataset, trainer.sampler, trainer.config, 0)))
    tasks = trainer.train_step.model.backbone.tasks
    batch["task"] = torch.tensor([tasks.index(t) for t in ("reid", "parsing", "generic") * 3][:8])
    values = trainer.train_step.schedules(0)
    terms, _ = trainer.train_step.compute_losses(batch, values)
    # The same forward, by hand: part loss per sample averaged over the global crops.
    G, B = 2, 8
    crops = torch.cat(batch["crops"][:G])
    locals_ = torch.cat(batch["crops"][G:])
    weights = torch.nn.functional.one_hot(batch["task"], len(tasks)).float()
    with torch.no_grad():
        out = trainer.train_step.student(crops, weights, locals_)
    per_crop, _ = trainer.train_step.part_loss(
        out["part_logits"], torch.cat(batch["pseudo_parts"][:G])
    )
    per_sample = per_crop.view(G, B).mean(0)
    table = {"reid": 0.0, "parsing": 1.0, "generic": 0.5}
    w = torch.tensor([table[tasks[t]] for t in batch["task"].tolist()])
    torch.testing.assert_close(terms["part"].detach(), (w * per_sample).mean())
    reid_only = batch["task"] == tasks.index("reid")
    assert reid_only.any() and (w[reid_only] == 0).all()


def test_shared_task_grad_keeps_task_gradients_off_the_shared_weights(
    synth_root, label_cache, tmp_path
):
    config = tiny_config(synth_root, str(tmp_path), label_cache)
    config["loss"]["shared_task_grad"] = 0.25
    trainer = Trainer(config)
    step = trainer.train_step
    batch = next(iter(make_loader(trainer.dataset, trainer.sampler, trainer.config, 0)))
    values = step.schedules(0)
    weights = config["loss"]
    params = dict(step.model.named_parameters())
    task_names = {n for n, p in params.items() if any(p is q for q in step.task_params)}
    assert any(".mlp.w1" in n for n in task_names) and "backbone.prompts.embedding" in task_names
    assert not any(".attn." in n or "patch_embed" in n for n in task_names)

    def gradients(fn):
        terms, _ = step.compute_losses(batch, values)
        total = sum(weights[k] * v for k, v in terms.items())
        task = sum(weights[k] * terms[k] for k in step_module.TASK_TERMS if k in terms)
        step.optimizer.zero_grad(set_to_none=True)
        fn(total, task, terms)
        return {n: p.grad.clone() for n, p in params.items() if p.grad is not None}

    routed = gradients(lambda total, task, terms: step._backward(total, terms))
    full = gradients(lambda total, task, terms: total.backward())
    rest = gradients(lambda total, task, terms: (total - task).backward())
    for name, grad in full.items():
        if name in task_names:  # the task losses train the prompt-selected path in full
            torch.testing.assert_close(routed[name], grad)
        else:  # and reach the shared weights at a quarter of their gradient
            torch.testing.assert_close(routed[name], rest[name] + 0.25 * (grad - rest[name]))
    assert any((full[n] - rest[n]).abs().max() > 0 for n in full if n not in task_names)


def test_kill_and_resume_reproduces_the_uninterrupted_losses(synth_root, label_cache, tmp_path):
    steps = 8
    straight = train(tiny_config(synth_root, str(tmp_path / "straight"), label_cache))
    assert len(straight.records) == steps
    # The same run as a process that is sent SIGTERM mid-way, then resumed in-process.
    run_dir = tmp_path / "killed"
    config = tiny_config(synth_root, str(run_dir), label_cache, train={"checkpoint_every": 100})
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "clasp", "pretrain", "--config", str(config_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the training process made no progress"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "SIGTERM" in stderr and "checkpoint saved" in stderr
    stopped_at = load_checkpoint(str(run_dir / "checkpoint.pt"))["step"]
    assert 2 <= stopped_at < steps, stderr
    resumed = train({**config, "train": {**config["train"], "resume": "auto"}})
    assert resumed.step == steps
    assert losses(resumed.records) == losses(straight.records)
    # The exported student of both runs is the same backbone.
    exports = []
    for name in ("straight", "killed"):
        out = str(tmp_path / f"{name}.safetensors")
        checkpoint = str(tmp_path / name / "checkpoint.pt")
        assert clasp_main(["export", "--checkpoint", checkpoint, "--out", out]) == 0
        exports.append(clasp.load_backbone(out, task="reid"))
    images = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        a, b = (m.extract(images) for m in exports)
        from_checkpoint = clasp.load_backbone(checkpoint, task="reid").extract(images)
    for x, y, z in zip(a, b, from_checkpoint, strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_pretrain_runs_with_gradient_checkpointing(synth_root, label_cache, tmp_path):
    """`clasp pretrain ... model.grad_checkpointing=true`: backward re-runs the PC-MoE blocks
    with their prompt."""
    config = tiny_config(synth_root, str(tmp_path), label_cache, optim={"steps": 2})
    config["model"]["grad_checkpointing"] = True
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    assert clasp_main(["pretrain", "--config", str(config_file)]) == 0
    checkpoint = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert checkpoint["step"] == 2 and checkpoint["config"]["model"]["grad_checkpointing"]
    assert all(math.isfinite(v) for k, v in checkpoint["metrics"].items() if k in LOSS_KEYS)


def test_non_finite_loss_stops_with_a_checkpoint_of_the_last_good_state(
    synth_root, label_cache, tmp_path, monkeypatch
):
    calls = []
    real = step_module.router_z_loss

    def z_loss_turning_nan(z):
        calls.append(1)
        value = real(z)
        return value * math.nan if len(calls) == 3 else value

    monkeypatch.setattr(step_module, "router_z_loss", z_loss_turning_nan)
    config = tiny_config(synth_root, str(tmp_path), label_cache)
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*z_loss=nan.*Not finite: loss, z_loss"):
        train(config)
    checkpoint = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert checkpoint["step"] == 2 and checkpoint["batch_in_epoch"] == 2
    monkeypatch.setattr(step_module, "router_z_loss", real)
    # The same run stopped cleanly after two steps (same schedules: only the loop ends early).
    reference = Trainer(tiny_config(synth_root, str(tmp_path / "ref"), label_cache))
    reference.total_steps = 2
    after_two = load_checkpoint(reference.fit().checkpoint)
    assert after_two["step"] == 2
    for part in ("model", "teacher", "dino_loss"):
        for name, tensor in after_two[part].items():
            assert torch.equal(checkpoint[part][name], tensor), f"{part}: {name}"


def test_checkpoints_are_replaced_atomically(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(path, {"step": 1, "weights": torch.ones(3)})

    def torn_write(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(3)})
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    assert load_checkpoint(path)["step"] == 1


def test_a_new_run_never_replaces_an_earlier_one(synth_root, tmp_path, capsys):
    config = tiny_config(synth_root, str(tmp_path), optim={"steps": 2})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    command = ["pretrain", "--config", str(config_file)]
    assert clasp_main(command) == 0
    before = {name: (tmp_path / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl")}
    capsys.readouterr()
    assert clasp_main(command) == 2
    error = capsys.readouterr().err
    assert "earlier run" in error and "--resume" in error and "--overwrite" in error
    assert all((tmp_path / name).read_bytes() == data for name, data in before.items())
    assert clasp_main([*command, "--overwrite", "optim.steps=1"]) == 0
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 1


def test_resume_without_a_checkpoint_says_so_and_stale_temporaries_go(synth_root, tmp_path):
    config = tiny_config(synth_root, str(tmp_path), optim={"steps": 2})
    config["train"]["resume"] = "auto"
    tmp_path.mkdir(exist_ok=True)
    # The partial first checkpoint of a process killed mid-write (its pid is gone).
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    stale = tmp_path / f"checkpoint.pt.tmp-{killed.pid}"
    stale.write_bytes(b"half a checkpoint")
    with pytest.raises(FileNotFoundError, match="no checkpoint in .* to resume from"):
        Trainer(config)
    assert not stale.exists()
