import os
import random
import zlib

import torch

# Triton reads TRITON_INTERPRET when its first kernel is defined: set it before any
# clasp.kernels import so the kernel tests run in the interpreter on a machine with no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Fresh random inputs every run; CLASP_TEST_SEED=<n> replays a run.
SESSION_SEED = int(os.environ.get("CLASP_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    interpret = os.environ.get("TRITON_INTERPRET", "0")
    return f"clasp: CLASP_TEST_SEED={SESSION_SEED}, TRITON_INTERPRET={interpret}"


@pytest.fixture(autouse=True)
def seed(request):
    """Seed torch and random per test from the session seed and the test's id."""
    value = (SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(value)
    random.seed(value)
    return value


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA when present (kernels compiled), else CPU (kernels in the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


SHARED_DATA = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data"
)


@pytest.fixture(scope="session")
def shared_data() -> str:
    """The real labelled person data beside the repository (`../shared/data`)."""
    path = os.path.normpath(os.environ.get("CLASP_SHARED_DATA", SHARED_DATA))
    if not os.path.isdir(path):
        pytest.fail(f"real test data not found at {path}; set CLASP_SHARED_DATA to its location")
    return path


@pytest.fixture(scope="session")
def synth_set(tmp_path_factory) -> str:
    """12 identities x 4 images from 4 cameras, 64 x 32: 6 train and 6 test identities."""
    from clasp.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(str(root), ids=12, images_per_id=4, cameras=4, size=(64, 32), seed=3)
    return str(root)


@pytest.fixture(scope="session")
def cuhk_pedes_set(tmp_path_factory) -> str:
    """10 identities x 2 images in CUHK-PEDES layout (`tests.utils.make_cuhk_pedes`): 6 train,
    1 val, 3 test."""
    from tests.utils import make_cuhk_pedes

    return make_cuhk_pedes(str(tmp_path_factory.mktemp("cuhk-pedes")))
