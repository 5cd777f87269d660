"""CLASP: CLIP-guided adaptable self-supervised pre-training of human-centric backbones."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("clasp-triton")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# The checkpoint (`clasp eval`, the demo) or pretrained (`clasp label`, `load_teacher`) value
# that asks for randomly initialised weights on purpose: baselines, tests, benchmarks.
RANDOM_WEIGHTS = "random"


def load_backbone(path: str, task=None, **kwargs):
    """A pre-trained CLASP backbone in eval mode, from an exported safetensors file or a
    training checkpoint; see `clasp.model.load_backbone`."""
    from clasp.model import load_backbone as load

    return load(path, task, **kwargs)
