"""Fused L2 normalisation over the last dimension: one read and one write per element.

The smallest op in the package: its `@triton.jit` kernels are short enough to sit beside the
launchers, custom ops, autograd Function and public function, as in `patch_text.py` (the
larger ops keep theirs in `<op>_kernels.py`). Unlike the other kernels these also take fp64
(accumulating in fp64), so fp64 runs Triton here too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .utils import FLOAT_DTYPES, check_tensor, new_output, use_triton


@triton.jit
def _l2norm_fwd_kernel(
    x_ptr,
    y_ptr,
    rnorm_ptr,
    n_rows,
    D,
    stride_x,
    stride_y,
    eps,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
    # Upcast right after the load: fp32 math (fp64 for fp64 inputs) for every dtype.
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    rnorm = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], x * rnorm[:, None], mask=mask)
    tl.store(rnorm_ptr + rows, rnorm, mask=rows < n_rows)


@triton.jit
def _l2norm_bwd_kernel(
    dy_ptr,
    y_ptr,
    rnorm_ptr,
    dx_ptr,
    n_rows,
    D,
    stride_dy,
    stride_y,
    stride_dx,
    eps,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
    dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
    y = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(ACC)
    rnorm = tl.load(rnorm_ptr + rows, mask=rows < n_rows, other=1.0)
    # Below eps the norm is clamped to a constant, so the projection term drops out.
    clamped = rnorm >= 1.0 / eps
    dot = tl.where(clamped, 0.0, tl.sum(dy * y, axis=1))
    dx = (dy - y * dot[:, None]) * rnorm[:, None]
    tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx, mask=mask)


def _launch_config(D: int, dtype: torch.dtype) -> dict:
    block_d = triton.next_power_of_2(D)
    block_rows = max(1, min(64, 4096 // block_d))
    return dict(
        BLOCK_ROWS=block_rows,
        BLOCK_D=block_d,
        ACC=tl.float64 if dtype == torch.float64 else tl.float32,
        num_warps=4 if block_d * block_rows <= 4096 else 8,
    )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("clasp::l2_normalize_fwd", mutates_args=())
def _l2_normalize_fwd(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n_rows = x2.shape[0]
    y = new_output((n_rows, D), x.dtype, x.device)
    rnorm = new_output((n_rows,), _acc_dtype(x.dtype), x.device)
    config = _launch_config(D, x.dtype)
    grid = (triton.cdiv(n_rows, config["BLOCK_ROWS"]),)
    _l2norm_fwd_kernel[grid](x2, y, rnorm, n_rows, D, x2.stride(0), y.stride(0), eps, **config)
    return y.view(x.shape), rnorm


@_l2_normalize_fwd.register_fake
def _(x, eps):
    rows = x.numel() // max(x.shape[-1], 1)
    return torch.empty_like(x), x.new_empty(rows, dtype=_acc_dtype(x.dtype))


@torch.library.custom_op("clasp::l2_normalize_bwd", mutates_args=())
def _l2_normalize_bwd(
    dy: torch.Tensor, y: torch.Tensor, rnorm: torch.Tensor, eps: float
) -> torch.Tensor:
    D = y.shape[-1]
    dy2 = dy.reshape(-1, D)
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    y2 = y.reshape(-1, D)
    n_rows = y2.shape[0]
    dx = new_output((n_rows, D), y.dtype, y.device)
    config = _launch_config(D, y.dtype)
    grid = (triton.cdiv(n_rows, config["BLOCK_ROWS"]),)
    _l2norm_bwd_kernel[grid](
        dy2, y2, rnorm, dx, n_rows, D, dy2.stride(0), y2.stride(0), dx.stride(0), eps, **config
    )
    return dx.view(y.shape)


@_l2_normalize_bwd.register_fake
def _(dy, y, rnorm, eps):
    return torch.empty_like(y)


class L2Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        y, rnorm = _l2_normalize_fwd(x, eps)
        ctx.save_for_backward(y, rnorm)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        y, rnorm = ctx.saved_tensors
        return _l2_normalize_bwd(dy, y, rnorm, ctx.eps), None


def l2_normalize(x: torch.Tensor, eps: float = 1e-12, *, backend: str = "auto") -> torch.Tensor:
    """L2-normalise x over its last dimension: x / max(||x||_2, eps).

    Args:
        x: (..., D) fp32, bf16, fp16 or fp64; any strides.
        eps: lower bound on the norm.
        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1), "triton" or "reference".
    Returns:
        (..., D) tensor of x's dtype, whether or not autocast is on. Differentiable.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor with at least one dimension")
    check_tensor("x", x, x.dim(), FLOAT_DTYPES)
    if not use_triton("l2_normalize", backend, kernel_dtypes=FLOAT_DTYPES, x=x) or x.numel() == 0:
        with torch.autocast(x.device.type, enabled=False):
            return reference.l2_normalize(x, eps)
    return L2Normalize.apply(x, eps)
