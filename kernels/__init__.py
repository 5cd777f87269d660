"""Triton kernels for CLASP's hot paths, each with an eager reference in `reference`.

Dispatch, the one layer: every public op takes `backend` in `BACKENDS`. "auto" runs the Triton
kernels on CUDA tensors and, under `TRITON_INTERPRET=1`, in Triton's CPU interpreter; other
CPU tensors, and fp64 inputs (which the kernels do not take, except `l2_normalize`'s), run the
eager reference. "triton" always runs the kernels (a TypeError for fp64); "reference" always
the eager op. `moe_mlp` and `grouped_matmul` follow autocast on both backends (their inputs
are cast to the autocast dtype); the other ops compute from their inputs as given.
Depends on torch and triton only.

File rule: one file per public op, named after it, holding that op's launchers,
`torch.library.custom_op` registrations, autograd Function and public function:
`route.py`, `moe_mlp.py`, `grouped_matmul.py`, `patch_text.py` (`patch_text_labels`) and
`l2norm.py` (`l2_normalize`). Where an op's `@triton.jit` bodies are large they sit beside it
in `<op>_kernels.py`: `route_kernels.py`, `grouped_matmul_kernels.py` (the grouped GEMMs,
shared by `grouped_matmul` and `moe_mlp`, which also calls `grouped_matmul.py`'s launchers;
their autotune configurations and shared-memory pruner in `grouped_matmul_configs.py`) and
`moe_mlp_kernels.py` (the kernels only `moe_mlp` launches). Beside them: `reference.py`
(every eager reference, same signatures, and `routing_metadata`), `types.py` (the return
types `Routing` and `PatchLabels`) and `utils.py` (dispatch, argument checks, output
poisoning).
"""

from . import reference
from .grouped_matmul import grouped_matmul
from .l2norm import l2_normalize
from .moe_mlp import moe_mlp
from .patch_text import patch_text_labels
from .route import route
from .types import PatchLabels, Routing
from .utils import BACKENDS, interpreter_active, poison_outputs

__all__ = [
    "BACKENDS",
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
