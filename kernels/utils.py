"""Dispatch, argument checks and output allocation shared by every kernel in `clasp.kernels`."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
import weakref
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

BACKENDS = ("auto", "triton", "reference")
# What the Triton kernels take; every op also takes fp64 (the dtype of exact tests), which
# runs its eager reference.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT_DTYPES = (*KERNEL_DTYPES, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)

_poison = False


def interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    """False under CLASP_AUTOTUNE=0: every autotuned kernel keeps one config (the first that
    fits the device), so a run compiles each variant once and times nothing extra."""
    return os.environ.get("CLASP_AUTOTUNE", "1") != "0"


def dtype_names(dtypes, last_separator: str = ", ") -> str:
    """ "float32, float16" (or "float32 or float16" with last_separator=" or ")."""
    *others, last = [str(d).removeprefix("torch.") for d in dtypes]
    return last_separator.join([", ".join(others), last]) if others else last


def use_triton(
    op: str,
    backend: str,
    *,
    kernel_dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES,
    **tensors: torch.Tensor | None,
) -> bool:
    """Pick the implementation of a call to `op` on the named input tensors.

    "auto": Triton for CUDA tensors or under the interpreter, the eager reference otherwise,
    and the reference for floating inputs of a dtype the kernels do not take (fp64).
    "triton": always Triton (CPU tensors need the interpreter); such inputs are a TypeError.
    "reference": always eager.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    named = {k: t for k, t in tensors.items() if t is not None}
    unsupported = {
        k: t.dtype
        for k, t in named.items()
        if t.dtype.is_floating_point and t.dtype not in kernel_dtypes
    }
    if unsupported:
        if backend == "triton":
            takes = dtype_names(kernel_dtypes, " or ")
            got = ", ".join(f"{k} {dtype_names([d])}" for k, d in unsupported.items())
            raise TypeError(
                f"{op} with backend='triton' takes {takes} inputs, got {got}: cast them to "
                "one of those, or use backend='reference' (the eager PyTorch op, which "
                "backend='auto' picks for these dtypes)"
            )
        return False
    on_cuda = all(t.is_cuda for t in named.values())
    if interpreter_active():
        return True
    if backend == "triton" and not on_cuda:
        raise RuntimeError(
            "backend='triton' needs CUDA tensors; to run the Triton kernels on the CPU, set "
            "TRITON_INTERPRET=1 in the environment before triton is first imported"
        )
    return on_cuda


def autocast_inputs(device_type: str, *tensors: torch.Tensor | None):
    """The autocast rule of the matmul ops (`moe_mlp`, `grouped_matmul`), on both paths: under
    `torch.autocast` every input is cast to the autocast dtype, as `torch.matmul`'s are; the
    result then has that dtype. Outside autocast the inputs are returned as they are."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


@dataclasses.dataclass(frozen=True)
class DeviceProperties:
    """What the launchers size grids and prune tile configurations by."""

    sm_count: int  # streaming multiprocessors
    max_shared_mem: int  # bytes of shared memory one program may use (the opt-in limit)
    capability: int  # compute capability as 10 * major + minor: 80 (A100), 90 (H100)


# The GPU that launches on the "meta" device are compiled for (see `ahead_of_time_target`).
_ahead_of_time: DeviceProperties | None = None


@contextlib.contextmanager
def ahead_of_time_target(properties: DeviceProperties):
    """Within this block, kernels launched on "meta" tensors are sized and pruned for
    `properties`: how `benchmarks/compile_report.py` compiles the launches of a GPU that
    is not there."""
    global _ahead_of_time
    previous, _ahead_of_time = _ahead_of_time, properties
    try:
        yield
    finally:
        _ahead_of_time = previous


@functools.cache
def _cuda_properties(device_index: int) -> DeviceProperties:
    p = torch.cuda.get_device_properties(device_index)
    return DeviceProperties(
        p.multi_processor_count, p.shared_memory_per_block_optin, 10 * p.major + p.minor
    )


def device_properties(device: torch.device) -> DeviceProperties:
    """Properties of a CUDA device (cached), or of the ahead-of-time target for "meta"."""
    if device.type == "meta":
        if _ahead_of_time is None:
            raise RuntimeError("meta tensors reach the kernels only under ahead_of_time_target()")
        return _ahead_of_time
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_properties(index)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device: the kernels size grids by it."""
    return device_properties(device).sm_count


def check_tensor(name: str, t: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {dtype_names(dtypes)}, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    named = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in named.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in named.items())
        raise ValueError(f"all inputs must be on one device, got {where}")


# Kernel operands derived from a tensor (padded, split or normalised copies), by source.
_DERIVED_CACHE_SIZE = 16
_derived: collections.OrderedDict = collections.OrderedDict()


def derived_operand(source: torch.Tensor, tag: tuple, build: Callable[[], T]) -> T:
    """build(), a kernel operand computed from `source` alone, reused while `source` is
    unchanged: the same live tensor object (checked through a weak reference, so a new
    tensor that reuses a freed one's id or memory never matches), at the same version
    counter (in-place writes bump it), data pointer, dtype, shape and strides. Built afresh
    for inference tensors (no version counter), while a CUDA graph is captured, and under
    torch.compile tracing. `tag` names what is derived (and from which settings)."""
    if (
        source.is_inference()
        or torch.compiler.is_compiling()
        or (source.is_cuda and torch.cuda.is_current_stream_capturing())
    ):
        return build()
    key = (id(source), tag)
    state = (
        source._version, source.data_ptr(), source.dtype, source.device,
        tuple(source.shape), source.stride(),
    )  # fmt: skip
    hit = _derived.get(key)
    if hit is not None and hit[0]() is source and hit[1] == state:
        _derived.move_to_end(key)
        return hit[2]
    value = build()
    _derived[key] = (weakref.ref(source), state, value)
    while len(_derived) > _DERIVED_CACHE_SIZE:
        _derived.popitem(last=False)
    return value


@contextlib.contextmanager
def poison_outputs():
    """Fill every kernel output with a sentinel (NaN, or the dtype's minimum for integers)
    instead of leaving it uninitialised, so tests can check that each element was written."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def poison_value(dtype: torch.dtype) -> float | int:
    return float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output: uninitialised normally, poisoned under `poison_outputs()`."""
    if _poison:
        return torch.full(shape, poison_value(dtype), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
