import os
import shutil

import pytest
import torch
from filelock import FileLock

# A CLIP small enough to build in milliseconds: 64x64 input, 8x8 patch grid, 32-d embeddings.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 64,
        "patch_size": 8,
        "width": 64,
        "layers": 2,
        "head_width": 32,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
N_PETA_IMAGES = 20


def build_once(tmp_path_factory, name: str, build) -> str:
    """A folder built by the first xdist worker that asks and shared by all of them (it is
    read-only for tests): `build(path)` runs once per session under a file lock."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above the per-worker ones
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            build(str(path))
            done.touch()
    return str(path)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> str:
    """A randomly initialised tiny CLIP saved in the teacher directory format."""
    import open_clip

    from clasp.teacher import save_teacher

    def build(path):
        torch.manual_seed(0)
        save_teacher(open_clip.CLIP(**TINY_CLIP), TINY_CLIP, path)

    return build_once(tmp_path_factory, "tiny-teacher", build)


@pytest.fixture(scope="session")
def peta_folder(shared_data, tmp_path_factory) -> str:
    """~20 real PETA crops from every subset in nested folders, a duplicate of one under
    another name, and three broken files. Read-only: tests must not change it."""
    root = os.path.join(shared_data, "peta")

    def build(folder):
        images = sorted(
            os.path.join(d, f)
            for d, _, files in os.walk(root)
            for f in files
            if f.lower().endswith((".jpg", ".jpeg", ".png", ".bmp"))
        )
        assert len(images) > N_PETA_IMAGES, f"PETA images not found under {root}"
        for path in images[:: len(images) // N_PETA_IMAGES][:N_PETA_IMAGES]:
            target = os.path.join(folder, os.path.relpath(os.path.dirname(path), root))
            os.makedirs(target, exist_ok=True)
            shutil.copy(path, target)
        shutil.copy(images[0], os.path.join(folder, "copy_of_first.jpg"))
        broken = os.path.join(folder, "broken")
        os.makedirs(broken)
        with open(images[0], "rb") as src, open(os.path.join(broken, "truncated.jpg"), "wb") as f:
            f.write(src.read()[:600])
        with open(os.path.join(broken, "noise.png"), "wb") as f:
            f.write(os.urandom(512))
        open(os.path.join(broken, "empty.jpg"), "wb").close()

    return build_once(tmp_path_factory, "peta-images", build)
