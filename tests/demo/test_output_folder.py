"""`clasp demo --force` removes only what a demo wrote; a folder holding anything else is
refused before anything is written or removed."""

import os

import pytest
import torch

from clasp.cli import main as clasp_main
from clasp.demo import run as demo_run


class _FirstStage(Exception):
    """Raised in place of the first stage: the test only looks at what came before."""


def _stop_at_first_stage(monkeypatch):
    def stop(self, name, fn, depends_on=None):
        raise _FirstStage(name)

    monkeypatch.setattr(demo_run.Stages, "run", stop)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the demo sets its own


def _tree(folder) -> set[str]:
    return {
        os.path.relpath(os.path.join(d, f), folder)
        for d, _, files in os.walk(folder)
        for f in files
    }


def test_force_removes_only_the_demos_own_outputs(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    for folder in demo_run.STAGE_FOLDERS:
        (out / folder).mkdir(parents=True)
        (out / folder / "part.bin").write_bytes(os.urandom(16))
    for name in ("stages.json", "results.md", "summary.json", "eval.json"):
        (out / name).write_text("{}")
    (out / f"summary.json.tmp-{os.getpid() + 1}").write_text("{")  # a killed write's
    (out / "my_notes.txt").write_text("mine")
    (out / "my_data").mkdir()
    (out / "my_data" / "keep.jpg").write_bytes(b"mine too")
    _stop_at_first_stage(monkeypatch)
    with pytest.raises(_FirstStage, match="synth"):
        demo_run.run_demo(str(out), scale="tiny", force=True)
    assert _tree(out) == {"my_notes.txt", os.path.join("my_data", "keep.jpg")}
    assert (out / "my_notes.txt").read_text() == "mine"


@pytest.mark.parametrize("force", [True, False])
def test_a_folder_that_is_not_a_demos_is_refused_with_or_without_force(tmp_path, capsys, force):
    # A project folder: `clasp/` and `labels/` are the user's own, not a demo's stages.
    project = tmp_path / "project"
    (project / "clasp").mkdir(parents=True)
    (project / "clasp" / "model.py").write_text("# mine")
    (project / "labels").mkdir()
    (project / "labels" / "a.json").write_text("{}")
    (project / "README.md").write_text("mine")
    before = _tree(project)
    args = ["demo", "--scale", "tiny", "--out", str(project), *(["--force"] if force else [])]
    assert clasp_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clasp demo: ") and "\n" not in err, err
    assert "not a demo's (README.md)" in err and "new or empty folder" in err
    assert _tree(project) == before


def test_a_fresh_empty_or_partial_demo_folder_is_accepted(tmp_path):
    demo_run.check_output_folder(str(tmp_path / "new"))
    demo_run.check_output_folder(str(tmp_path))  # empty
    (tmp_path / "synth").mkdir()  # a demo killed in its first stage, before stages.json
    (tmp_path / f"stages.json.tmp-{os.getpid() + 1}").write_text("{")
    demo_run.check_output_folder(str(tmp_path))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(demo_run.OutputFolderError, match="notes.txt"):
        demo_run.check_output_folder(str(tmp_path))
    (tmp_path / "stages.json").write_text("{}")  # a demo made it: the user's notes may stay
    demo_run.check_output_folder(str(tmp_path))
