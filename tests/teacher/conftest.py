import os
import shutil

import pytest
import torch

from tests.utils import TINY_CLIP, build_once

N_PETA_IMAGES = 20


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
