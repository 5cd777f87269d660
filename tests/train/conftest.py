import pytest
import yaml

from tests.utils import (
    build_once,
    make_label_cache,
    make_synth,
    make_text_teacher,
    one_thread,  # noqa: F401  (autouse: one torch thread per test)
    tiny_config,
)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> str:
    return make_synth(str(tmp_path_factory.mktemp("synth")))


@pytest.fixture(scope="session")
def label_cache(synth_root, tmp_path_factory) -> str:
    return make_label_cache(synth_root, str(tmp_path_factory.mktemp("labels")))


@pytest.fixture(scope="session")
def labelled_run(synth_root, label_cache, tmp_path_factory):
    """A finished 2-step labelled run: (its config file, checkpoint, export). Read-only."""
    from clasp.cli import main as clasp_main
    from clasp.train.trainer import train

    root = tmp_path_factory.mktemp("labelled-run")
    config = tiny_config(synth_root, str(root / "run"), label_cache, optim={"steps": 2})
    checkpoint = train(config).checkpoint
    config_file = root / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    export = str(root / "backbone.safetensors")
    assert clasp_main(["export", "--checkpoint", checkpoint, "--out", export]) == 0
    return str(config_file), checkpoint, export


@pytest.fixture(scope="session")
def text_teacher(tmp_path_factory) -> str:
    """A randomly initialised tiny CLIP in the teacher folder format (pre-training reads only
    its text tower). Read-only."""
    return build_once(tmp_path_factory, "text-teacher", make_text_teacher)
