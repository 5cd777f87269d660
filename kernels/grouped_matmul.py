"""Grouped GEMMs over expert segments: the kernels behind `moe_mlp` and `grouped_matmul`.

Here: their launchers (`moe_mlp.py` calls them too) and `grouped_matmul`'s custom ops,
autograd Function and public op; the `@triton.jit` bodies are in `grouped_matmul_kernels.py`.

Rows of the left operand are grouped by expert: sorted row r with offsets[e] <= r < offsets[e+1]
multiplies w[e]. Each sorted row may stand for a routing slot s = t * k + j (its token is
s // k), which lets the GEMMs gather input rows and scatter output rows by index instead of
materialising padded, expert-sorted copies of the activations.

Tile schedule, with no host synchronisation: the grid covers an upper bound on the number of
M-tiles, sum_e ceil(count_e / BLOCK_M) <= ceil(M / BLOCK_M) + E, and every program finds its
expert and first row from `offsets` (a prefix sum over E tile counts in registers). Programs
past the last tile return at once.

Accumulation is fp32. fp32 inputs use tf32 tensor cores on CUDA when
`torch.get_float32_matmul_precision()` is "high" or "medium", full fp32 when "highest".
Row offsets into pointers are int64, so T * k * d may exceed 2^31.
"""

from __future__ import annotations

import torch
import triton

from . import reference
from .grouped_matmul_kernels import (
    ACTIVATION_CODES,
    _grouped_mm_kernel,
    _grouped_wgrad_kernel,
    _segment_sum_kernel,
    _sum_tile_partials_kernel,
    dot_dtype,
    dot_precision,
)
from .utils import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    autocast_inputs,
    check_same_device,
    check_tensor,
    new_output,
    use_triton,
)


def _grid_rows(num_rows: int, E: int, N: int):
    """Grid over the bound on M-tiles times N-tiles; no host read of the counts."""
    return lambda meta: (
        (triton.cdiv(num_rows, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]),
    )


def launch_grouped_mm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    offsets: torch.Tensor,
    num_rows: int,
    *,
    slots: torch.Tensor | None = None,
    top_k: int = 1,
    gather: bool = False,
    scatter: bool = False,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    pre: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
) -> None:
    """out[r or slots[r]] = gate * act(a[r or slots[r] // top_k] @ w[e] + bias[e]) for the
    num_rows sorted rows; w is (E, K, N) with any strides (pass a transposed view for w^T).
    Rows past offsets[E] are written as zeros (when not scattering)."""
    E, K, N = w.shape
    if bias is not None:
        bias = bias.contiguous()
    _grouped_mm_kernel[_grid_rows(num_rows, E, N)](
        a,
        w,
        out,
        offsets,
        slots if slots is not None else offsets,
        bias if bias is not None else out,
        gates if gates is not None else out,
        pre if pre is not None else out,
        num_rows,
        N,
        K,
        E,
        top_k,
        a.stride(0),
        a.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        out.stride(1),
        bias.stride(0) if bias is not None else 0,
        pre.stride(0) if pre is not None else 0,
        GATHER=gather,
        SCATTER=scatter,
        HAS_BIAS=bias is not None,
        ACTIVATION=ACTIVATION_CODES[activation],
        STORE_PRE=pre is not None,
        GATE=gates is not None,
        DOT_DTYPE=dot_dtype(a.dtype),
        DOT_PRECISION=dot_precision(),
        E_POW2=triton.next_power_of_2(E + 1),
    )


def launch_grouped_wgrad(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, offsets: torch.Tensor
) -> None:
    """out[e] = a_e^T @ b_e (E, Dm, Dn), a_e and b_e the rows offsets[e]:offsets[e+1] of a
    (rows, Dm) and b (rows, Dn), both already in expert order."""
    E, Dm, Dn = out.shape
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(Dm, meta["BLOCK_M"]) * triton.cdiv(Dn, meta["BLOCK_N"]),
        E,
    )
    _grouped_wgrad_kernel[grid](
        a,
        b,
        out,
        offsets,
        Dm,
        Dn,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        DOT_DTYPE=dot_dtype(a.dtype),
        DOT_PRECISION=dot_precision(),
    )


def launch_sum_tile_partials(
    parts: torch.Tensor, out: torch.Tensor, offsets: torch.Tensor, tile_m: int
) -> None:
    """out[e] = the sum of parts' rows over expert e's M-tiles of tile_m rows (the tiles of
    the grouped GEMMs' schedule), in ascending order; out (E, N), parts (tiles, N) fp32."""
    E, N = out.shape
    block_n = min(triton.next_power_of_2(N), 1024)
    _sum_tile_partials_kernel[(E, triton.cdiv(N, block_n))](
        parts,
        out,
        offsets,
        N,
        E,
        parts.stride(0),
        out.stride(0),
        TILE_M=tile_m,
        E_POW2=triton.next_power_of_2(E + 1),
        BLOCK_N=block_n,
    )


def launch_segment_sum(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """out[t] = sum of the rows i of src with index[i] == t, in ascending i (deterministic,
    unlike an atomic scatter-add); src (M, N), index (M,), out (T, N)."""
    T, N = out.shape
    # The rows of each output row t are a segment of rows grouped by index, as slots by expert.
    _, bounds, order = reference.routing_metadata(index, T)
    bounds, order = bounds.to(torch.int32), order.to(torch.int32)
    block_n = min(triton.next_power_of_2(N), 1024)
    grid = (T, triton.cdiv(N, block_n))
    _segment_sum_kernel[grid](
        src, order, bounds, out, N, src.stride(0), out.stride(0), BLOCK_N=block_n
    )


@torch.library.custom_op("clasp::grouped_matmul_fwd", mutates_args=())
def _grouped_matmul_fwd(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, gather_idx: torch.Tensor | None
) -> torch.Tensor:
    num_rows = x.shape[0] if gather_idx is None else gather_idx.shape[0]
    out = new_output((num_rows, w.shape[2]), x.dtype, x.device)
    launch_grouped_mm(x, w, out, offsets, num_rows, slots=gather_idx, gather=gather_idx is not None)
    return out


@_grouped_matmul_fwd.register_fake
def _(x, w, offsets, gather_idx):
    num_rows = x.shape[0] if gather_idx is None else gather_idx.shape[0]
    return x.new_empty(num_rows, w.shape[2])


@torch.library.custom_op("clasp::grouped_matmul_bwd", mutates_args=())
def _grouped_matmul_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    gather_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_rows = dout.shape[0]
    dx = new_output(x.shape, x.dtype, x.device)
    drows = dx if gather_idx is None else x.new_empty(num_rows, x.shape[1])
    launch_grouped_mm(dout, w.transpose(1, 2), drows, offsets, num_rows)
    if gather_idx is not None:
        launch_segment_sum(drows, gather_idx, dx)
    dw = new_output(w.shape, w.dtype, w.device)
    rows = x if gather_idx is None else x.index_select(0, gather_idx)
    launch_grouped_wgrad(rows, dout, dw, offsets)
    return dx, dw


@_grouped_matmul_bwd.register_fake
def _(dout, x, w, offsets, gather_idx):
    return torch.empty_like(x), torch.empty_like(w)


class GroupedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets, gather_idx):
        ctx.save_for_backward(x, w, offsets, gather_idx)
        return _grouped_matmul_fwd(x, w, offsets, gather_idx)

    @staticmethod
    def backward(ctx, dout):
        x, w, offsets, gather_idx = ctx.saved_tensors
        dx, dw = _grouped_matmul_bwd(dout, x, w, offsets, gather_idx)
        return dx, dw, None, None


def grouped_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    gather_idx: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-expert matmul of contiguous row segments: out[r] = rows[r] @ w[e] for
    offsets[e] <= r < offsets[e+1], where rows = x, or x[gather_idx] gathered inside the GEMM.

    Args:
        x: (T, d) fp32, bf16 or fp16 (fp64 runs the reference); any strides.
        w: (E, d, f), x's dtype.
        offsets: (E+1,) int32/int64, non-decreasing from 0; rows at or past offsets[E] are 0.
        gather_idx: optional (M,) int32/int64 row indices into x.
        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1; the reference for
            fp64), "triton" or "reference".
    Returns:
        (M, f) of x's dtype (the autocast dtype under autocast, which casts x and w),
        M = T or len(gather_idx). Differentiable in x and w; the gradient of repeated gather
        rows is summed in a fixed order. fp32 inputs run on tf32 tensor cores on CUDA unless
        `torch.set_float32_matmul_precision("highest")`.
    """
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_tensor("w", w, 3, FLOAT_DTYPES)
    check_tensor("offsets", offsets, 1, INDEX_DTYPES)
    if gather_idx is not None:
        check_tensor("gather_idx", gather_idx, 1, INDEX_DTYPES)
    check_same_device(x=x, w=w, offsets=offsets, gather_idx=gather_idx)
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w must be (E, d={x.shape[1]}, f), got shape {tuple(w.shape)}")
    if offsets.shape[0] != w.shape[0] + 1:
        raise ValueError(
            f"offsets must have E+1 = {w.shape[0] + 1} entries for w of shape "
            f"{tuple(w.shape)}, got {offsets.shape[0]}"
        )
    x, w = autocast_inputs(x.device.type, x, w)
    if w.dtype != x.dtype:
        raise TypeError(
            f"w must have x's dtype {x.dtype}, got {w.dtype}; cast one of them or run under "
            "torch.autocast"
        )
    triton_path = use_triton("grouped_matmul", backend, x=x, w=w)
    if not triton_path or 0 in (x.shape[0], w.shape[0], w.shape[2]):
        with torch.autocast(x.device.type, enabled=False):
            return reference.grouped_matmul(x, w, offsets, gather_idx)
    offsets = offsets.to(torch.int32)
    gather_idx = None if gather_idx is None else gather_idx.to(torch.int32)
    return GroupedMatmul.apply(x, w, offsets, gather_idx)
