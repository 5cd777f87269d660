import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Small models on a shared 2-core machine run fastest (and steadiest) on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
