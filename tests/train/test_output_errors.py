"""Outputs that cannot be written (a full disk, a read-only or forbidden folder) end a
command with one line and exit 2, leaving what was there as it was; a missing parent folder
of an export is created; files are written with the umask's permissions; a real bug keeps
its traceback, and CLASP_DEBUG=1 shows every traceback."""

import errno
import os
import stat

import pytest
import torch
import yaml
from safetensors import SafetensorError

from clasp.atomic import TMP_MARK
from clasp.cli import main as clasp_main
from clasp.teacher.cache import SHARD_DIR, LabelCacheWriter
from clasp.train.checkpoint import load_checkpoint, save_checkpoint
from tests.utils import tiny_config

# One worker builds the `labelled_run` these tests share.
pytestmark = pytest.mark.xdist_group("labelled-run")


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"clasp {command}: ") and "\n" not in err, err
    return err


def _full_disk(monkeypatch) -> None:
    """torch.save fails as it does on a full disk: part of the file written, then OSError
    ENOSPC without a file name."""

    def save(obj, f):
        f.write(b"the first blocks of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)


def test_a_checkpoint_write_on_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(path, {"step": 1})
    _full_disk(monkeypatch)
    with pytest.raises(OSError) as error:
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(1000)})
    assert error.value.errno == errno.ENOSPC and error.value.filename == path
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint.pt"] and load_checkpoint(path)["step"] == 1


def _config_file(synth_root, tmp_path, output_dir: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(synth_root, output_dir, optim={"steps": 1})))
    return str(path)


def test_pretrain_on_a_full_disk_exits_2_naming_the_checkpoint(
    synth_root, tmp_path, capsys, monkeypatch
):
    _full_disk(monkeypatch)
    out = tmp_path / "run"
    assert clasp_main(["pretrain", "--config", _config_file(synth_root, tmp_path, str(out))]) == 2
    assert _one_line(capsys, "pretrain") == (
        f"clasp pretrain: {out / 'checkpoint.pt'}: no space left on the device: free some "
        "space or write somewhere else"
    )
    assert not [name for name in os.listdir(out) if TMP_MARK in name or name == "checkpoint.pt"]


def _refuse_folder(monkeypatch, folder: str, number: int) -> None:
    """os.makedirs fails with `number` for paths under folder, as on a read-only mount."""
    real = os.makedirs

    def makedirs(path, *args, **kwargs):
        if os.path.abspath(path).startswith(folder):
            raise OSError(number, os.strerror(number), path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", makedirs)


def test_read_only_output_folders(synth_root, labelled_run, tmp_path, capsys, monkeypatch):
    ro = str(tmp_path / "ro")
    _refuse_folder(monkeypatch, ro, errno.EROFS)
    config = _config_file(synth_root, tmp_path, os.path.join(ro, "run"))
    assert clasp_main(["pretrain", "--config", config]) == 2
    assert _one_line(capsys, "pretrain") == (
        f"clasp pretrain: {ro}/run: the file system is read-only: choose a folder on a writable one"
    )
    out = os.path.join(ro, "sub", "b.safetensors")
    assert clasp_main(["export", "--checkpoint", labelled_run[1], "--out", out]) == 2
    assert _one_line(capsys, "export") == (
        f"clasp export: {ro}/sub: the file system is read-only: choose a folder on a writable one"
    )


def test_export_creates_missing_folders_with_the_umasks_permissions(labelled_run, tmp_path):
    out = tmp_path / "new" / "deeper" / "backbone.safetensors"
    previous = os.umask(0o022)
    try:
        assert clasp_main(["export", "--checkpoint", labelled_run[1], "--out", str(out)]) == 0
        writer = LabelCacheWriter(str(tmp_path / "cache"), {"grid_size": [2, 1]})
        with writer:
            shard = writer.write_shard(
                ["0" * 64], torch.zeros(1, 2, 1), torch.ones(1, 2, 1), torch.ones(1, 3), {}
            )
    finally:
        os.umask(previous)
    for path in (out, shard, tmp_path / "cache" / "manifest.json"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path
    assert os.path.dirname(shard).endswith(SHARD_DIR)


def test_a_library_error_quoting_an_os_error_and_debug_tracebacks(
    labelled_run, tmp_path, capsys, monkeypatch
):
    def full(*args, **kwargs):
        raise SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr("clasp.model.io.save_file", full)
    argv = ["export", "--checkpoint", labelled_run[1], "--out", str(tmp_path / "b.safetensors")]
    assert clasp_main(argv) == 2
    assert _one_line(capsys, "export") == (
        "clasp export: no space left on the device: free some space or write somewhere else"
    )
    monkeypatch.setenv("CLASP_DEBUG", "1")
    with pytest.raises(SafetensorError):
        clasp_main(argv)


def test_a_real_bug_keeps_its_traceback(labelled_run, tmp_path, monkeypatch):
    def buggy(*args, **kwargs):
        return int("not a number")  # a ValueError no clasp `raise` meant for the user

    monkeypatch.setattr("clasp.model.load_backbone", buggy)
    argv = ["export", "--checkpoint", labelled_run[1], "--out", str(tmp_path / "b.safetensors")]
    with pytest.raises(ValueError, match="invalid literal"):
        clasp_main(argv)
    monkeypatch.setattr("clasp.model.load_backbone", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        clasp_main(argv)


def test_the_zip_writers_failed_write_on_a_full_disk_is_said_as_such(tmp_path, monkeypatch):
    def torn(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    path = str(tmp_path / "checkpoint.pt")
    monkeypatch.setattr(torch, "save", torn)
    monkeypatch.setattr("clasp.train.checkpoint._free_bytes", lambda directory: 4096)
    with pytest.raises(OSError) as error:
        save_checkpoint(path, {"step": 1})
    assert error.value.errno == errno.ENOSPC and error.value.filename == path
    # With space left it is not a full disk: the writer's own error stands.
    monkeypatch.setattr("clasp.train.checkpoint._free_bytes", lambda directory: 1 << 40)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save_checkpoint(path, {"step": 1})
    assert os.listdir(tmp_path) == []
