import pytest

from tests.utils import (
    make_label_cache,
    make_synth,
    one_thread,  # noqa: F401  (autouse: one torch thread per test)
)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> str:
    return make_synth(str(tmp_path_factory.mktemp("synth")))


@pytest.fixture(scope="session")
def label_cache(synth_root, tmp_path_factory) -> str:
    return make_label_cache(synth_root, str(tmp_path_factory.mktemp("labels")))
