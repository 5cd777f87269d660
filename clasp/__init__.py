"""CLASP: CLIP-guided adaptable self-supervised pre-training of human-centric backbones."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("clasp-triton")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
