import pytest
import torch

from .helpers import make_label_cache, make_synth


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> str:
    return make_synth(str(tmp_path_factory.mktemp("synth")))


@pytest.fixture(scope="session")
def label_cache(synth_root, tmp_path_factory) -> str:
    return make_label_cache(synth_root, str(tmp_path_factory.mktemp("labels")))


@pytest.fixture(autouse=True)
def one_thread():
    """Small models on a shared 2-core machine run fastest (and steadiest) on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
