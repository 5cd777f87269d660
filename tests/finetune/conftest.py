import pytest

from clasp.data.synthetic import generate
from tests.utils import one_thread  # noqa: F401  (autouse: one torch thread per test)

# A tiny PC-MoE backbone at 64x32 (eager MoE: no Triton interpreter).
TINY_MODEL = """
model:
  img_size: [64, 32]
  patch_size: 16
  embed_dim: 32
  depth: 2
  num_heads: 2
  kernels: reference
  moe: {blocks: [-1], num_experts: 2, top_k: 1, mlp_ratio: 2.0}
"""


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
    path.write_text(TINY_MODEL)
    return str(path)
