"""Grouped GEMMs over expert segments: the kernels behind `moe_mlp` and `grouped_matmul`.

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

from .grouped_gemm_kernels import (
    ACTIVATION_CODES,
    _grouped_mm_act_bwd_kernel,
    _grouped_mm_kernel,
    _grouped_wgrad_kernel,
    _segment_sum_kernel,
    _sum_slots_kernel,
    dot_dtype,
    dot_precision,
)
from .utils import interpreter_active


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


def launch_act_bwd(
    dy: torch.Tensor,
    w2: torch.Tensor,
    pre: torch.Tensor,
    dpre: torch.Tensor,
    gated_h: torch.Tensor,
    offsets: torch.Tensor,
    slots: torch.Tensor,
    gates: torch.Tensor,
    b2: torch.Tensor | None,
    dgate_parts: torch.Tensor,
    top_k: int,
    activation: str,
) -> None:
    """Fills dpre, gated_h (both (M, f), sorted order) and dgate_parts (T*k, >= f / BLOCK_N tiles,
    zero-initialised, slot order); w2 is (E, f, d)."""
    M, f = pre.shape
    E, _, d = w2.shape
    w2_t = w2.transpose(1, 2)
    if b2 is not None:
        b2 = b2.contiguous()
    _grouped_mm_act_bwd_kernel[_grid_rows(M, E, f)](
        dy,
        w2_t,
        pre,
        dpre,
        gated_h,
        offsets,
        slots,
        gates,
        b2 if b2 is not None else dpre,
        dgate_parts,
        M,
        f,
        d,
        E,
        top_k,
        dy.stride(0),
        dy.stride(1),
        w2_t.stride(0),
        w2_t.stride(1),
        w2_t.stride(2),
        pre.stride(0),
        b2.stride(0) if b2 is not None else 0,
        dgate_parts.stride(0),
        HAS_BIAS=b2 is not None,
        ACTIVATION=ACTIVATION_CODES[activation],
        DOT_DTYPE=dot_dtype(dy.dtype),
        DOT_PRECISION=dot_precision(),
        E_POW2=triton.next_power_of_2(E + 1),
    )


def launch_grouped_wgrad(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    offsets: torch.Tensor,
    *,
    slots: torch.Tensor | None = None,
    top_k: int = 1,
    gather_a: bool = False,
    gather_b: bool = False,
    gates: torch.Tensor | None = None,
    bias_grad: torch.Tensor | None = None,
) -> None:
    """out[e] = a_e^T @ b_e (E, Dm, Dn) over each expert's sorted rows; bias_grad[e] = the
    column sums of b_e, each row scaled by gates[slots[r]] when gates are given. Rows are
    gathered by slots[r] // top_k where asked."""
    E, Dm, Dn = out.shape
    has_bias = bias_grad is not None
    grid = lambda meta: (  # noqa: E731
        (triton.cdiv(Dm, meta["BLOCK_M"]) + has_bias) * triton.cdiv(Dn, meta["BLOCK_N"]),
        E,
    )
    _grouped_wgrad_kernel[grid](
        a,
        b,
        out,
        bias_grad if bias_grad is not None else out,
        offsets,
        slots if slots is not None else offsets,
        gates if gates is not None else out,
        Dm,
        Dn,
        top_k,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        bias_grad.stride(0) if bias_grad is not None else 0,
        GATHER_A=gather_a,
        GATHER_B=gather_b,
        BIAS_GRAD=bias_grad is not None,
        GATE_BIAS=gates is not None,
        DOT_DTYPE=dot_dtype(a.dtype),
        DOT_PRECISION=dot_precision(),
    )


def launch_sum_slots(
    src: torch.Tensor, out: torch.Tensor, top_k: int, gates: torch.Tensor | None = None
) -> None:
    """out[t] = sum_j gates[t*k+j] * src[t*k+j] (gates optional); src (T*k, N), out (T, N)."""
    T, N = out.shape
    block_n = min(triton.next_power_of_2(N), 128 if interpreter_active() else 512)
    block_t = max(1, 4096 // block_n)
    grid = (triton.cdiv(T, block_t), triton.cdiv(N, block_n))
    _sum_slots_kernel[grid](
        src,
        gates if gates is not None else src,
        out,
        T,
        N,
        top_k,
        src.stride(0),
        out.stride(0),
        GATE=gates is not None,
        BLOCK_T=block_t,
        BLOCK_N=block_n,
    )


def launch_segment_sum(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """out[t] = sum of the rows i of src with index[i] == t, in ascending i (deterministic,
    unlike an atomic scatter-add); src (M, N), index (M,), out (T, N)."""
    T, N = out.shape
    order = torch.sort(index, stable=True).indices.to(torch.int32)
    bounds = torch.zeros(T + 1, dtype=torch.int32, device=src.device)
    bounds[1:] = torch.cumsum(torch.bincount(index, minlength=T), 0)
    block_n = min(triton.next_power_of_2(N), 1024)
    grid = (T, triton.cdiv(N, block_n))
    _segment_sum_kernel[grid](
        src, order, bounds, out, N, src.stride(0), out.stride(0), BLOCK_N=block_n
    )
