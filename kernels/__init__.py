"""Triton kernels for CLASP's hot paths, each with an eager reference in `reference`.

CUDA tensors run the Triton kernels; CPU tensors run the reference unless
`TRITON_INTERPRET=1` is set or an op is called with `backend="triton"`.
Depends on torch and triton only.
"""

from . import reference
from .l2norm import l2_normalize
from .moe import grouped_matmul, moe_mlp
from .patch_text import patch_text_labels
from .reference import PatchLabels, Routing
from .routing import route
from .utils import interpreter_active, poison_outputs

__all__ = [
    "PatchLabels",
    "Routing",
    "grouped_matmul",
    "interpreter_active",
    "l2_normalize",
    "moe_mlp",
    "patch_text_labels",
    "poison_outputs",
    "reference",
    "route",
]
