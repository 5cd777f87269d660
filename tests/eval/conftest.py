import pytest
import timm
import torch
import torch.nn as nn

from tests.utils import (
    TINY_MODEL_YAML,
    one_thread,  # noqa: F401  (autouse: one torch thread per test)
)


class TimmPatchEncoder(nn.Module):
    """A randomly initialised timm ViT with the evaluation protocol's `extract`: the class
    token and the patch tokens on their grid, after the final norm."""

    def __init__(self, img_size=(64, 32), patch_size=8, dim=32, depth=1, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.vit = timm.create_model(
                "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=img_size,
                patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=2,
            )  # fmt: skip
        self.img_size, self.patch_size = img_size, patch_size

    def extract(self, images, task=None):
        tokens = self.vit.forward_features(images)
        b, _, h, w = images.shape
        grid = tokens[:, self.vit.num_prefix_tokens :]
        return tokens[:, 0], grid.reshape(b, h // self.patch_size, w // self.patch_size, -1)


@pytest.fixture(scope="session")
def encoder():
    return TimmPatchEncoder().eval()


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory):
    """A tiny CLASP backbone config (the eager MoE path: no Triton interpreter)."""
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(TINY_MODEL_YAML)
    return str(path)
