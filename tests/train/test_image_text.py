"""Image-text alignment in pre-training (`loss.image_text`): captions from the set or from the
attribute pseudo-labels, the loss falls, kill-and-resume stays bit-exact, the head is exported."""

import json
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
from clasp.data.synthetic import SyntheticDataset
from clasp.model import ImageTextHead
from clasp.model.io import read_head, read_metadata
from clasp.teacher.cache import LabelCache, file_sha256
from clasp.train.captions import caption_table, image_captions, pseudo_label_caption
from clasp.train.checkpoint import load_checkpoint
from clasp.train.trainer import train
from tests.utils import make_synth, tiny_config

TERMS = ("loss", "dino", "part", "attribute", "image_text", "load_balance", "z_loss", "grad_norm")


def terms(records):
    return [{k: r[k] for k in TERMS if k in r} for r in records]


def test_captions_come_from_the_set_or_from_the_attribute_pseudo_labels(
    synth_root, label_cache, text_teacher
):
    config = tiny_config(synth_root, "unused", label_cache, loss={"image_text": 1.0})
    config["data"]["text_teacher"] = text_teacher
    data = SyntheticDataset(synth_root, "all")
    cache = LabelCache(label_cache)
    keys = [file_sha256(p) for p in data.paths]
    own = image_captions(data, "auto", cache, keys)
    assert own == [r["caption"] for r in data.records]
    built = image_captions(data, "labels", cache, keys)
    # The cache holds the ground truth as soft labels: each caption names the true values.
    record = data.records[5]
    assert built[5] == "a photo of a person: " + ", ".join(
        f"{g.replace('_', ' ')} {v.replace('_', ' ')}" for g, v in record["attributes"].items()
    )
    soft = cache.get(keys[5])["attributes"]
    assert built[5] == pseudo_label_caption(soft, cache.attribute_names, cache.group_sizes)
    keys[3] = "0" * 64  # an image the cache lacks has no caption
    assert image_captions(data, "labels", cache, keys)[3] is None
    config["data"]["captions"] = "labels"
    table = caption_table(config, data, cache, keys)
    assert table.ids[3] == -1 and table.embeddings.shape == (len(table.texts), 32)
    assert torch.allclose(table.embeddings.norm(dim=1), torch.ones(len(table.texts)))
    assert [table.texts[i] for i in table.ids[:3].tolist()] == built[:3]
    with pytest.raises(ValueError, match="data.captions must be one of"):
        image_captions(data, "everything", cache, keys)
    config["data"]["text_teacher"] = None
    with pytest.raises(ValueError, match="needs a CLIP text tower"):
        caption_table(config, data, cache, keys)


def test_image_text_loss_falls_on_a_tiny_run(tmp_path_factory, text_teacher, seed):
    # One batch holds the whole set (8 identities x 2 images, 8 captions) and the crops are
    # fixed; chance is log(16), perfect log(2). The loss sits near chance for 20-30 steps
    # before it falls (measured over 5 seeds: the last 4 of 50 steps average 1.9-2.2).
    root = make_synth(str(tmp_path_factory.mktemp("synth16")), ids=8, images_per_id=2)
    config = tiny_config(
        root, str(tmp_path_factory.mktemp("run")), None,
        optim={"steps": 50, "lr": 5e-3}, loss={"image_text": 1.0}, data={"batch_size": 16},
        crops={"n_local": 0, "global_scale": [1.0, 1.0], "flip_p": 0.0, "color_jitter": [],
               "grayscale_p": 0.0},
    )  # fmt: skip
    config["data"]["text_teacher"] = text_teacher
    config["seed"] = seed
    records = train(config).records
    losses = [r["image_text"] for r in records]
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < math.log(16) - 0.4 and last < 0.85 * first, losses


def test_kill_and_resume_is_bit_exact_with_image_text_alignment(
    synth_root, label_cache, text_teacher, synth_set, tmp_path, capsys, monkeypatch
):
    def config(name):
        c = tiny_config(
            synth_root, str(tmp_path / name), label_cache, train={"checkpoint_every": 100},
            loss={"image_text": 0.5}, data={"captions": "labels"},
        )  # fmt: skip
        c["data"]["text_teacher"] = text_teacher
        return c

    steps = 8
    straight = train(config("straight"))
    assert all(math.isfinite(r["image_text"]) for r in straight.records)
    killed = config("killed")
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(yaml.safe_dump(killed))
    command = [sys.executable, "-m", "clasp", "pretrain", "--config", str(config_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the training process made no progress"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    stopped_at = load_checkpoint(str(tmp_path / "killed" / "checkpoint.pt"))["step"]
    assert 2 <= stopped_at < steps, stderr
    resumed = train({**killed, "train": {**killed["train"], "resume": "auto"}})
    assert resumed.step == steps
    assert terms(resumed.records) == terms(straight.records)

    # The export keeps the head and the text tower's name; the backbone loads as before.
    checkpoint = str(tmp_path / "killed" / "checkpoint.pt")
    out = str(tmp_path / "student.safetensors")
    reads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a[0]) or load(*a, **k))
    assert clasp_main(["export", "--checkpoint", checkpoint, "--out", out]) == 0
    assert reads == [checkpoint]  # read once for the backbone, its head and its config
    monkeypatch.undo()
    head = read_head(out, "image_text")
    for name, tensor in read_head(checkpoint, "image_text").items():
        assert torch.equal(head[name], tensor), name
    assert read_metadata(out)["text_teacher"] == {"teacher": text_teacher, "pretrained": None}
    pooled, _ = clasp.load_backbone(out).extract(torch.randn(2, 3, 32, 16))
    projected, scale = ImageTextHead.from_state_dict(head)(pooled)
    assert projected.shape == (2, 32) and 0 < float(scale.detach()) <= 100
    assert read_head(str(tmp_path / "straight" / "checkpoint.pt"), "parts") is None

    # Text search with the head and the text tower it was trained against, from the export
    # and from the checkpoint; a probe on request.
    capsys.readouterr()
    for source, projection in ((out, "auto"), (checkpoint, "auto"), (out, "probe")):
        command = ["eval", "text-search", "--checkpoint", source, "--data", synth_set,
                   "--format", "synth", "--projection", projection]  # fmt: skip
        assert clasp_main(command) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["projection"] == ("probe" if projection == "probe" else "head")
        assert text_teacher in result["teacher"] and result["sets"]["queries"] == 6
