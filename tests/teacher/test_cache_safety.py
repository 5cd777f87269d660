"""The label cache never goes wrong in silence: it is keyed on the teacher's weights (a
teacher refitted into the same folder is refused, `--overwrite` starts over), and two
labelers writing one cache take turns instead of losing each other's shards."""

import errno
import os
import shutil
import subprocess
import sys
import time

import open_clip
import pytest
import torch

from clasp.teacher import LabelCache, file_sha256, save_teacher
from clasp.teacher.cache import LabelCacheWriter
from clasp.teacher.labeling import cache_meta, teacher_fingerprint
from clasp.teacher.loading import load_teacher
from clasp.vocabulary import load_prompts
from tests.teacher.conftest import TINY_CLIP
from tests.teacher.test_labeling import assert_same_cache, label_args, run_label


def _images(peta_folder, folder, start: int, n: int) -> list[str]:
    """n readable PETA crops copied into folder (flat)."""
    found = sorted(
        os.path.join(d, f)
        for d, _, files in os.walk(peta_folder)
        if "broken" not in d
        for f in files
        if f != "copy_of_first.jpg"
    )
    os.makedirs(folder)
    for i, path in enumerate(found[start : start + n]):
        shutil.copy(path, os.path.join(folder, f"{start + i:02d}_{os.path.basename(path)}"))
    return sorted(os.path.join(folder, f) for f in os.listdir(folder))


def _save_tiny_teacher(directory: str, seed: int) -> None:
    torch.manual_seed(seed)
    save_teacher(open_clip.CLIP(**TINY_CLIP), TINY_CLIP, directory)


def test_a_teacher_refitted_in_the_same_folder_is_refused_until_overwrite(
    peta_folder, tmp_path, capsys
):
    images, teacher = str(tmp_path / "images"), str(tmp_path / "teacher")
    _images(peta_folder, images, 0, 3)
    out = str(tmp_path / "cache")
    _save_tiny_teacher(teacher, seed=1)
    run_label(label_args(images, out, teacher))
    first = LabelCache(out)
    _save_tiny_teacher(teacher, seed=2)  # refitted: same folder, same file name

    capsys.readouterr()
    run_label(label_args(images, out, teacher), expect=2)
    err = capsys.readouterr().err.strip()
    assert err.startswith("clasp label: ") and "\n" not in err, err
    assert "made with another teacher" in err and "--overwrite" in err and "new --out" in err
    digests = [part.split("...")[0] for part in err.split("weights sha256:")[1:]]
    assert len(digests) == 2 and digests[0] != digests[1], err  # both teachers are named
    assert_same_cache(first, LabelCache(out))  # nothing was changed

    messages = run_label(label_args(images, out, teacher, "--overwrite"))
    assert any(m.startswith("labelled 3 images") for m in messages), messages
    fresh = str(tmp_path / "fresh")
    run_label(label_args(images, fresh, teacher))
    relabelled = LabelCache(out)
    assert_same_cache(LabelCache(fresh), relabelled)
    assert any(
        not torch.equal(first.get(k)["attributes"], relabelled.get(k)["attributes"])
        for k in first.keys()
    ), "the refitted teacher should label differently"


def test_the_fingerprint_follows_the_weights_not_the_folder(tiny_teacher_dir, tmp_path):
    moved = str(tmp_path / "moved")
    shutil.copytree(tiny_teacher_dir, moved)
    a, b = load_teacher(tiny_teacher_dir), load_teacher(moved)
    assert a.description != b.description
    assert teacher_fingerprint(a) == teacher_fingerprint(b)
    with torch.no_grad():
        b.model.visual.proj.add_(1e-6)
    assert teacher_fingerprint(a) != teacher_fingerprint(b)


def test_two_labelers_into_one_cache_take_turns_and_lose_nothing(
    peta_folder, tiny_teacher_dir, tmp_path
):
    first = _images(peta_folder, str(tmp_path / "first"), 0, 4)
    second_folder = str(tmp_path / "second")
    second = _images(peta_folder, second_folder, 4, 4)
    out = str(tmp_path / "cache")
    teacher = load_teacher(tiny_teacher_dir)
    meta = cache_meta(teacher, load_prompts(), teacher.default_temperature, 0.1)
    log_path = tmp_path / "second.log"
    with LabelCacheWriter(out, meta) as writer:  # this process is the first labeler
        with pytest.raises(RuntimeError, match="already writes"):
            LabelCacheWriter(out, meta)
        with open(log_path, "w") as log:
            other = subprocess.Popen(
                [sys.executable, "-m", "clasp", *label_args(second_folder, out, tiny_teacher_dir)],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 240
        while "being written by another labeler" not in log_path.read_text():
            if other.poll() is not None:  # it did not wait: it wrote its shard meanwhile
                break
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        n, grid, a = len(first), teacher.grid_size, len(meta["attribute_names"])
        writer.write_shard(
            [file_sha256(p) for p in first], torch.zeros(n, *grid), torch.ones(n, *grid),
            torch.full((n, a), 0.5), failed={},
        )  # fmt: skip
    assert other.wait(timeout=240) == 0, log_path.read_text()
    cache = LabelCache(out)
    assert sorted(cache.keys()) == sorted(file_sha256(p) for p in first + second)
    assert "labelled 4 images" in log_path.read_text()


def test_a_cache_folder_that_cannot_be_created_is_one_line(
    peta_folder, tiny_teacher_dir, tmp_path, capsys, monkeypatch
):
    forbidden = str(tmp_path / "forbidden")
    real = os.makedirs

    def makedirs(path, *args, **kwargs):  # as in a folder the user may not write
        if os.path.abspath(path).startswith(forbidden):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", makedirs)
    capsys.readouterr()
    run_label(label_args(peta_folder, forbidden, tiny_teacher_dir), expect=2)
    assert capsys.readouterr().err.strip() == (
        f"clasp label: {forbidden}/shards: permission denied: choose a folder you may write, "
        "or change its permissions"
    )
