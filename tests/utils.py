"""Helpers shared by the tests: tolerances per dtype, poisoned outputs, random inputs, a check
that an op never entered its Triton path, and the one-thread fixture of the model-sized tests."""

from __future__ import annotations

import importlib

import pytest
import torch
from clasp.kernels import poison_outputs
from clasp.kernels.utils import poison_value

# (atol, rtol) of a low-precision result against a reference run in fp64.
# fp32 on CUDA is looser: tl.dot uses tf32 there, the interpreter computes in full fp32.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
CUDA_FP32_TOLERANCE = (5e-4, 5e-4)

DTYPE_IDS = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
}


def tolerance(
    dtype: torch.dtype, device: torch.device | str = "cpu", scale: float = 1.0
) -> tuple[float, float]:
    atol, rtol = (
        CUDA_FP32_TOLERANCE
        if dtype == torch.float32 and torch.device(device).type == "cuda"
        else TOLERANCES[dtype]
    )
    return atol * scale, rtol * scale


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype | None = None,
    *,
    scale: float = 1.0,
    msg: str = "",
) -> None:
    """Compare in fp64 with the tolerance of `dtype` (default: actual's dtype)."""
    dtype = dtype or actual.dtype
    atol, rtol = tolerance(dtype, actual.device, scale)
    torch.testing.assert_close(
        actual.detach().double().cpu(),
        expected.detach().double().cpu(),
        atol=atol,
        rtol=rtol,
        msg=(lambda m: f"{msg}\n{m}") if msg else None,
    )


def assert_close_normalised(actual, expected, dtype, msg=""):
    """Compare relative to the largest reference magnitude: sums over many rows grow, and
    their rounding error grows with them. fp32 on CUDA runs tf32 tensor cores (10-bit
    mantissa), and the MLP chains two GEMMs: three times the per-dtype tolerance there."""
    norm = max(1.0, float(expected.detach().abs().max()))
    scale = 3.0 if dtype == torch.float32 and actual.is_cuda else 1.0
    assert_close(
        actual.detach().double() / norm, expected.detach() / norm, dtype, scale=scale, msg=msg
    )


class _Forbidden:
    """Stands in for an op's way into its kernels (a function or an autograd Function)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise AssertionError(f"{self.name} ran: the call took the Triton path")

    apply = __call__


def forbid_triton_path(monkeypatch, module: str, entry: str) -> None:
    """Make `clasp.kernels.<module>.<entry>`, the op's way into its kernels, fail when called
    (or applied), so a test can tell that a call ran the eager reference."""
    name = f"clasp.kernels.{module}.{entry}"
    monkeypatch.setattr(importlib.import_module(f"clasp.kernels.{module}"), entry, _Forbidden(name))


def assert_all_written(*tensors: torch.Tensor) -> None:
    """Fail if any element still holds the poison of `poison_outputs()`."""
    for i, t in enumerate(tensors):
        if t is None:
            continue
        if t.dtype.is_floating_point:
            unwritten = torch.isnan(t)
        else:
            unwritten = t == poison_value(t.dtype)
        n = int(unwritten.sum())
        assert n == 0, (
            f"output {i} (shape {tuple(t.shape)}): {n} of {t.numel()} elements never written"
        )


def run_poisoned(fn, *args, **kwargs):
    """Call `fn` with every kernel output poisoned, and check each element was written."""
    with poison_outputs():
        out = fn(*args, **kwargs)
    flat = out if isinstance(out, (tuple, list)) else (out,)
    assert_all_written(*[t for t in flat if isinstance(t, torch.Tensor)])
    return out


def randn(
    *shape,
    dtype=torch.float32,
    device="cpu",
    scale: float = 1.0,
    requires_grad: bool = False,
    non_contiguous: bool = False,
) -> torch.Tensor:
    """Fresh normal input; `non_contiguous` returns a strided view of a wider buffer."""
    if non_contiguous:
        wide = (torch.randn(*shape[:-1], 2 * shape[-1], device=device) * scale).to(dtype)
        t = wide[..., ::2].detach()  # a leaf that keeps the strides
        assert not t.is_contiguous() or t.numel() <= 1
    else:
        t = (torch.randn(*shape, device=device) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def as_reference_input(t: torch.Tensor) -> torch.Tensor:
    """An fp64 leaf copy of t for the reference run (gradients kept separately)."""
    return t.detach().double().requires_grad_(t.requires_grad)


@pytest.fixture(autouse=True)
def one_thread():
    """Small models on a shared 2-core machine run fastest (and steadiest) on one thread:
    each test worker owns about one core. Autouse where a conftest imports it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
