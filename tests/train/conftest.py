import pytest

from tests.utils import one_thread  # noqa: F401  (autouse: one torch thread per test)

from .helpers import make_label_cache, make_synth, make_text_teacher


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> str:
    return make_synth(str(tmp_path_factory.mktemp("synth")))


@pytest.fixture(scope="session")
def label_cache(synth_root, tmp_path_factory) -> str:
    return make_label_cache(synth_root, str(tmp_path_factory.mktemp("labels")))


@pytest.fixture(scope="session")
def text_teacher(tmp_path_factory) -> str:
    return make_text_teacher(str(tmp_path_factory.mktemp("text-teacher")))
