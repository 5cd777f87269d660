"""Pre-training skips files it cannot open, as labelling does: a dangling symbolic link and a
directory entry that cannot be opened (a socket named .jpg) are replaced by other samples,
counted, and reported once at the end of the run."""

import logging
import os
import shutil
import socket

import pytest

from clasp.train.trainer import train
from tests.utils import tiny_config

N_READABLE = 6  # + 2 unreadable = one batch of 8: every epoch meets both broken entries


@pytest.fixture
def broken_folder(synth_root, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    images = sorted(os.listdir(os.path.join(synth_root, "images")))[:N_READABLE]
    for i, name in enumerate(images):  # copies: the same bytes, so the label cache has them
        shutil.copy(os.path.join(synth_root, "images", name), folder / f"{i:02d}.png")
    os.symlink(str(tmp_path / "moved_away.png"), folder / "03_gone.png")
    cwd = os.getcwd()
    os.chdir(folder)  # a relative name: socket paths are limited to ~100 characters
    try:
        with socket.socket(socket.AF_UNIX) as sock:  # the entry stays once it is closed
            sock.bind("04_socket.png")
    finally:
        os.chdir(cwd)
    return str(folder)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _check_reported_once(result, caplog, steps: int, folder: str) -> None:
    gone, sock = os.path.join(folder, "03_gone.png"), os.path.join(folder, "04_socket.png")
    assert result.step == steps and result.skipped == {gone: steps, sock: steps}
    warnings = _warnings(caplog)
    assert not [m for m in warnings if "skipping unreadable sample" in m], warnings
    summaries = [m for m in warnings if "replaced by other samples" in m]
    assert len(summaries) == 1, warnings
    summary = summaries[0]
    assert summary.startswith(f"2 unreadable file(s) were replaced by other samples {2 * steps}")
    assert f"{gone} (dangling symbolic link (to " in summary
    assert f"{sock} (OSError: No such device or address" in summary


def test_unreadable_files_in_a_folder_are_replaced_and_reported_once(
    broken_folder, tmp_path, caplog
):
    config = tiny_config(
        broken_folder, str(tmp_path / "run"), data={"format": "folder", "num_workers": 1},
        optim={"steps": 3},
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="clasp"):
        result = train(config)
    _check_reported_once(result, caplog, 3, broken_folder)


def test_unreadable_files_with_labels_are_named_at_start_and_replaced(
    broken_folder, label_cache, tmp_path, caplog
):
    config = tiny_config(
        broken_folder, str(tmp_path / "run"), label_cache, data={"format": "folder"},
        optim={"steps": 2},
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="clasp"):
        result = train(config)
    start = [m for m in _warnings(caplog) if "cannot be read and will be replaced" in m]
    assert len(start) == 1 and start[0].startswith("2 of 8 images"), _warnings(caplog)
    assert "03_gone.png (dangling symbolic link" in start[0] and "04_socket.png" in start[0]
    _check_reported_once(result, caplog, 2, broken_folder)
