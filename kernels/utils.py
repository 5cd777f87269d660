"""Dispatch, argument checks and output allocation shared by every kernel in `clasp.kernels`."""

from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "triton", "reference")

_poison = False


def interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Pick the implementation for an op call.

    "auto": Triton for CUDA tensors or under the interpreter, the eager reference otherwise.
    "triton": always Triton (CPU tensors need the interpreter). "reference": always eager.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if interpreter_active():
        return True
    if backend == "triton" and not on_cuda:
        raise RuntimeError(
            "backend='triton' needs CUDA tensors; to run the Triton kernels on the CPU, set "
            "TRITON_INTERPRET=1 in the environment before triton is first imported"
        )
    return on_cuda


def check_tensor(name: str, t: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must be one of {names}, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    named = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in named.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in named.items())
        raise ValueError(f"all inputs must be on one device, got {where}")


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
