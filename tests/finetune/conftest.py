import pytest

from clasp.data.synthetic import generate
from tests.utils import (
    TINY_MODEL_YAML,
    one_thread,  # noqa: F401  (autouse: one torch thread per test)
)


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> str:
    """60 identities x 2 images from 2 cameras, 64 x 32: 30 train and 30 test identities (many
    identities: attributes are drawn per identity)."""
    root = tmp_path_factory.mktemp("synth")
    generate(str(root), ids=60, images_per_id=2, cameras=2, size=(64, 32), seed=5)
    return str(root)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "tiny.yaml"
    path.write_text(TINY_MODEL_YAML)
    return str(path)
