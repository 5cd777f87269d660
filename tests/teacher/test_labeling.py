import json
import logging
import os
import signal
import subprocess
import sys

import pytest
import torch

from clasp.cli import main as clasp_main
from clasp.teacher import LabelCache, file_sha256
from clasp.teacher.cache import MANIFEST_FILE, SHARD_DIR
from tests.utils import build_once

N_BROKEN = 3
N_DUPLICATES = 1  # copy_of_first.jpg

# Kills the labeler with SIGKILL halfway through writing its third shard.
KILL_DURING_THIRD_SHARD = """
import os, signal, sys
import clasp.teacher.cache as cache
real_save, calls = cache.save_file, []
def save_then_die(tensors, path, metadata=None):
    calls.append(path)
    if len(calls) == 3:
        with open(path, "wb") as f:
            f.write(b"half a shard")
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(tensors, path, metadata=metadata)
cache.save_file = save_then_die
from clasp.cli import main
sys.exit(main(sys.argv[1:]))
"""


def label_args(images, out, teacher_dir, *extra):
    return [
        "label",
        "--images", images,
        "--out", out,
        "--teacher", teacher_dir,
        "--batch-size", "4",
        "--shard-size", "4",
        "--threshold", "0.1",
        "--workers", "0",
        "--no-progress",
        *extra,
    ]  # fmt: skip


def assert_same_cache(a: LabelCache, b: LabelCache):
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        x, y = a.get(key), b.get(key)
        assert torch.equal(x["parts"], y["parts"]), key
        torch.testing.assert_close(x["part_confidence"], y["part_confidence"], atol=0, rtol=0)
        torch.testing.assert_close(x["attributes"], y["attributes"], atol=0, rtol=0)
    assert a.unreadable.keys() == b.unreadable.keys()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run_label(args, expect: int = 0) -> list[str]:
    """Run `clasp label` in this process; returns its log messages."""
    records, logger = _Records(), logging.getLogger("clasp.teacher")
    logger.addHandler(records)
    try:
        assert clasp_main(args) == expect
    finally:
        logger.removeHandler(records)
    return records.messages


@pytest.fixture(scope="session")
def straight_run(peta_folder, tiny_teacher_dir, tmp_path_factory):
    """One uninterrupted run of `clasp label` over the PETA folder, shared by the tests of
    every xdist worker: (cache dir, its log messages)."""

    def build(path):
        args = label_args(peta_folder, os.path.join(path, "cache"), tiny_teacher_dir)
        messages = run_label([*args, "--visualize", "2"])
        with open(os.path.join(path, "log.json"), "w") as f:
            json.dump(messages, f)

    path = build_once(tmp_path_factory, "straight-label-run", build)
    with open(os.path.join(path, "log.json")) as f:
        return os.path.join(path, "cache"), json.load(f)


def n_files(folder: str) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def test_label_completes_and_reports_broken_files(straight_run, peta_folder):
    out, messages = straight_run
    skipped = sorted(
        m.split(": ")[0].rsplit("/", 1)[1] for m in messages if "unreadable image" in m
    )
    assert skipped == ["empty.jpg", "noise.png", "truncated.jpg"]
    cache = LabelCache(out)
    n_images = n_files(peta_folder) - N_BROKEN - N_DUPLICATES
    assert len(cache) == n_images and len(cache.unreadable) == N_BROKEN
    summary = next(m for m in messages if m.startswith("labelled"))
    assert summary.startswith(f"labelled {n_images} images") and "3 unreadable skipped" in summary
    overlays = os.listdir(os.path.join(out, "visualize"))
    assert len(overlays) == 2 and all(name.endswith(".png") for name in overlays)


def test_label_resumes_after_kill_with_the_same_cache(
    straight_run, peta_folder, tiny_teacher_dir, tmp_path
):
    resumed = str(tmp_path / "resumed")
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DURING_THIRD_SHARD,
         *label_args(peta_folder, resumed, tiny_teacher_dir, "--visualize", "2")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    leftovers = [f for f in os.listdir(os.path.join(resumed, SHARD_DIR)) if ".tmp-" in f]
    assert leftovers, "the kill should leave a half-written temporary shard"
    with open(os.path.join(resumed, MANIFEST_FILE)) as f:
        assert len(json.load(f)["shards"]) == 2
    assert len(LabelCache(resumed)) == 8  # two finished shards of 4, still readable

    run_label(label_args(peta_folder, resumed, tiny_teacher_dir))
    assert not [f for f in os.listdir(os.path.join(resumed, SHARD_DIR)) if ".tmp-" in f]
    assert_same_cache(LabelCache(straight_run[0]), LabelCache(resumed))
    # Once everything is done, a run labels nothing and still reports the broken files.
    messages = run_label(label_args(peta_folder, resumed, tiny_teacher_dir))
    n_images = n_files(peta_folder) - N_BROKEN - N_DUPLICATES
    summary = next(m for m in messages if m.startswith("labelled"))
    assert summary.startswith("labelled 0 images")
    assert f"{n_images + N_DUPLICATES} already cached" in summary
    assert f"{N_BROKEN} unreadable skipped" in summary


def test_label_cache_reader_api(straight_run, peta_folder, tiny_teacher_dir):
    out = straight_run[0]
    cache = LabelCache(out)
    duplicate = os.path.join(peta_folder, "copy_of_first.jpg")
    key = file_sha256(duplicate)
    assert key in cache and "0" * 64 not in cache and cache.get("0" * 64) is None
    labels = cache.get(key)
    assert labels["parts"].shape == (8, 8) == labels["part_confidence"].shape
    assert labels["parts"].dtype == torch.int64 and labels["attributes"].dtype == torch.float32
    assert labels["parts"].min() >= -1 and labels["parts"].max() < len(cache.part_names)
    assert cache.part_names[0] == "background" and "gender=male" in cache.attribute_names
    assert labels["attributes"].shape == (sum(cache.group_sizes),)
    for group in labels["attributes"].split(cache.group_sizes):
        assert abs(float(group.sum()) - 1) < 1e-3
    low = labels["part_confidence"] < 0.1
    assert (labels["parts"][low] == -1).all() and (labels["parts"][~low] >= 0).all()
    assert cache.meta["dense"] == "maskclip" and cache.grid_size == (8, 8)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("clasp label: ") and "\n" not in err, err
    return err


def test_label_refuses_a_cache_built_with_other_settings(
    straight_run, peta_folder, tiny_teacher_dir, capsys
):
    out = straight_run[0]
    capsys.readouterr()
    run_label(label_args(peta_folder, out, tiny_teacher_dir, "--dense", "plain"), 2)
    assert 'dense: cache has "maskclip", this run has "plain"' in one_line_error(capsys)
    run_label(label_args(peta_folder, out, tiny_teacher_dir, "--threshold", "0.3"), 2)
    assert "threshold: cache has 0.1, this run has 0.3" in one_line_error(capsys)
    assert len(LabelCache(out)) == len(LabelCache(straight_run[0]))


def test_label_fails_at_once_on_missing_weights_or_images(
    peta_folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = str(tmp_path / "cache")
    capsys.readouterr()
    run_label(["label", "--images", peta_folder, "--out", out, "--no-progress"], 2)
    err = one_line_error(capsys)
    assert "'ViT-B-16'" in err and "'openai'" in err and "--pretrained" in err
    assert not os.path.exists(out)
    missing = str(tmp_path / "nowhere")
    run_label(["label", "--images", missing, "--out", out, "--no-progress"], 2)
    assert one_line_error(capsys) == f"clasp label: image folder not found: {missing}"
