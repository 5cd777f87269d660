"""Triton kernels of the grouped GEMMs, shared by `grouped_matmul` and `moe_mlp`: the forward
GEMM with gather, scatter, bias, activation and gate epilogues (run in column chunks); the
per-expert weight-gradient GEMM over expert-ordered rows; the per-expert sum of per-tile
partials and the fixed-order segment sum; and the tile schedule, activation and dot-type
helpers that `moe_mlp_kernels.py` reuses. Their launchers are in `grouped_matmul.py`, which
`moe_mlp.py` calls too; their autotune configurations in `grouped_matmul_configs.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grouped_matmul_configs import GEMM_CONFIGS, PRUNE, WGRAD_CONFIGS, epilogue_split
from .utils import interpreter_active

ACTIVATION_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def dot_dtype(dtype: torch.dtype):
    """Operand type of `tl.dot`: the input's, except fp32 in the interpreter, whose bf16
    arithmetic is wrong."""
    return tl.float32 if interpreter_active() else _TL_DTYPES[dtype]


def dot_precision() -> str:
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == 2:
        x = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACTIVATION == 3:
        x = x * tl.sigmoid(x)
    return x


@triton.jit
def _activation_grad(x, ACTIVATION: tl.constexpr):
    """d act(x) / dx."""
    if ACTIVATION == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        grad = cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACTIVATION == 2:
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
        grad = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dinner
    elif ACTIVATION == 3:
        s = tl.sigmoid(x)
        grad = s * (1.0 + x * (1.0 - s))
    else:
        grad = tl.full(x.shape, 1.0, tl.float32)
    return grad


@triton.jit
def _column_halves(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The left and right column halves of a (BLOCK_M, BLOCK_N) tile."""
    halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
    return tl.split(halves)


@triton.jit
def _tile_segment(offsets_ptr, pid_m, M, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """Segment owning M-tile `pid_m`: an expert e < E, E for the rows [offsets[E], M) past the
    last expert (written as zeros), or more than E when the tile is past every segment.
    Returns (segment, first row of the tile, end row of the segment)."""
    seg = tl.arange(0, E_POW2)
    lo = tl.load(offsets_ptr + seg, mask=seg <= E, other=0)
    hi = tl.load(offsets_ptr + seg + 1, mask=seg < E, other=0)
    hi = tl.where(seg == E, M, hi)
    tiles = tl.where(seg <= E, (hi - lo + BLOCK_M - 1) // BLOCK_M, 0)
    ends = tl.cumsum(tiles, 0)
    segment = tl.sum((ends <= pid_m).to(tl.int32), 0)
    here = seg == segment
    first_tile = tl.sum(tl.where(here, ends - tiles, 0), 0)
    row_start = tl.sum(tl.where(here, lo, 0), 0) + (pid_m - first_tile) * BLOCK_M
    return segment, row_start, tl.sum(tl.where(here, hi, 0), 0)


@triton.jit
def _swizzle(M, N, E, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) visiting GROUP_M row tiles per column sweep, so tiles that share an
    expert's weights run close together."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M) + E
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m
    return pid_m, pid_n


@triton.jit
def _expert_tile_gemm(
    a_ptr,
    a_rows,
    stride_am,
    stride_ak,
    w_ptr,
    expert,
    stride_we,
    stride_wk,
    stride_wn,
    cols,
    row_mask,
    col_mask,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The K loop of one (BLOCK_M, BLOCK_N) tile: A[a_rows] @ W[expert][:, cols] accumulated
    in fp32 (a_rows: int64 row indexes of A; masked rows and columns read as 0). The loop
    does nothing but the GEMM; the callers' epilogues follow it."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak
    w_ptrs = (
        w_ptr
        + expert.to(tl.int64) * stride_we
        + ks[:, None] * stride_wk
        + cols[None, :] * stride_wn
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            k_mask = ks < K - k0
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.autotune(
    configs=GEMM_CONFIGS,
    key=["N", "K", "GATHER", "SCATTER", "HAS_BIAS", "ACTIVATION", "STORE_PRE", "GATE"],
    prune_configs_by=PRUNE,
)
@triton.heuristics(
    {
        "EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
        "EPILOGUE_SPLIT": lambda args: epilogue_split(
            args["BLOCK_M"], args["BLOCK_N"], args.get("num_warps", 4)
        ),
    }
)
@triton.jit
def _grouped_mm_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    offsets_ptr,
    slots_ptr,
    bias_ptr,
    gate_ptr,
    pre_ptr,
    M,
    N,
    K,
    E,
    top_k,
    stride_am,
    stride_ak,
    stride_we,
    stride_wk,
    stride_wn,
    stride_om,
    stride_on,
    stride_be,
    stride_pm,
    GATHER: tl.constexpr,  # A row of sorted row r is slots[r] // top_k (else r)
    SCATTER: tl.constexpr,  # output row of sorted row r is slots[r] (else r)
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    STORE_PRE: tl.constexpr,  # also store the pre-activation, in sorted order
    GATE: tl.constexpr,  # multiply output row r by gate[slots[r]]
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,
):
    pid_m, pid_n = _swizzle(M, N, E, BLOCK_M, BLOCK_N, GROUP_M)
    expert, row_start, row_end = _tile_segment(offsets_ptr, pid_m, M, E, BLOCK_M, E_POW2)
    if expert > E:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    if expert == E:  # rows past offsets[E]: nothing multiplies them
        zeros = tl.zeros((BLOCK_M, BLOCK_N), out_ptr.dtype.element_ty)
        out_offs = rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(out_ptr + out_offs, zeros, mask=mask)
        return

    if GATHER or SCATTER or GATE:
        slots = tl.load(slots_ptr + rows, mask=row_mask, other=0)
    if GATHER:
        a_rows = (slots // top_k).to(tl.int64)
    else:
        a_rows = rows.to(tl.int64)
    acc = _expert_tile_gemm(
        a_ptr, a_rows, stride_am, stride_ak, w_ptr, expert, stride_we, stride_wk, stride_wn,
        cols, row_mask, col_mask, K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_DTYPE,
        DOT_PRECISION,
    )  # fmt: skip

    gate = tl.zeros((BLOCK_M,), tl.float32)
    if GATE:
        gate = tl.load(gate_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
    if SCATTER:
        out_rows = slots.to(tl.int64) * stride_om
    else:
        out_rows = rows.to(tl.int64) * stride_om
    # The pre-activation rows are contiguous: one 64-bit base, 32-bit offsets.
    pre_ptr += row_start.to(tl.int64) * stride_pm
    local = tl.arange(0, BLOCK_M)
    bias_ptr += expert * stride_be
    # The epilogue runs on column chunks of the accumulator (see `epilogue_split`).
    _mm_epilogue_chunks(
        acc, pid_n * BLOCK_N, local, out_rows, row_mask, N, gate, bias_ptr, pre_ptr, out_ptr,
        stride_pm, stride_on, HAS_BIAS, STORE_PRE, ACTIVATION, GATE, BLOCK_M, BLOCK_N,
        EPILOGUE_SPLIT,
    )  # fmt: skip


@triton.jit
def _mm_epilogue_chunks(
    acc,
    first_col,
    local_rows,
    out_rows,
    row_mask,
    N,
    gate,
    bias_ptr,
    pre_ptr,
    out_ptr,
    stride_pm,
    stride_on,
    HAS_BIAS: tl.constexpr,
    STORE_PRE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    WIDTH: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """`_mm_epilogue` over the WIDTH columns from first_col, in SPLIT chunks (halving
    recursively; the halves are register-level views of the accumulator)."""
    if SPLIT == 1:
        _mm_epilogue(
            acc, first_col + tl.arange(0, WIDTH), local_rows, out_rows, row_mask, N, gate,
            bias_ptr, pre_ptr, out_ptr, stride_pm, stride_on, HAS_BIAS, STORE_PRE,
            ACTIVATION, GATE,
        )  # fmt: skip
    else:
        a0, a1 = _column_halves(acc, BLOCK_M, WIDTH)
        _mm_epilogue_chunks(
            a0, first_col, local_rows, out_rows, row_mask, N, gate, bias_ptr, pre_ptr,
            out_ptr, stride_pm, stride_on, HAS_BIAS, STORE_PRE, ACTIVATION, GATE, BLOCK_M,
            WIDTH // 2, SPLIT // 2,
        )  # fmt: skip
        _mm_epilogue_chunks(
            a1, first_col + WIDTH // 2, local_rows, out_rows, row_mask, N, gate, bias_ptr,
            pre_ptr, out_ptr, stride_pm, stride_on, HAS_BIAS, STORE_PRE, ACTIVATION, GATE,
            BLOCK_M, WIDTH // 2, SPLIT // 2,
        )  # fmt: skip


@triton.jit
def _mm_epilogue(
    acc,
    cols,
    local_rows,
    out_rows,
    row_mask,
    N,
    gate,
    bias_ptr,
    pre_ptr,
    out_ptr,
    stride_pm,
    stride_on,
    HAS_BIAS: tl.constexpr,
    STORE_PRE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GATE: tl.constexpr,
):
    """One column chunk of `_grouped_mm_kernel`'s epilogue: + bias[e], the pre-activation
    stored (tile-relative rows), activation, gate, store to the output rows (byte-free
    element offsets `out_rows`, already multiplied by the row stride)."""
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if STORE_PRE:
        pre_offs = local_rows[:, None] * stride_pm + cols[None, :]
        tl.store(pre_ptr + pre_offs, acc.to(pre_ptr.dtype.element_ty), mask=mask)
    acc = _activation(acc, ACTIVATION)
    if GATE:
        acc *= gate[:, None]
    out_offs = out_rows[:, None] + cols[None, :] * stride_on
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=WGRAD_CONFIGS, key=["Dm", "Dn"], prune_configs_by=PRUNE)
@triton.jit
def _grouped_wgrad_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    offsets_ptr,
    Dm,
    Dn,
    stride_am,
    stride_ak,
    stride_bm,
    stride_bn,
    stride_oe,
    stride_om,
    stride_on,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[e] = A_e^T @ B_e over expert e's rows (zero for an empty expert): (Dm, Dn) per
    expert, with A (rows, Dm) and B (rows, Dn) both in expert order; the rows are the
    reduction axis. The operands are contiguous row ranges (callers gather rows into
    expert order first), so every load address is affine in the loop counter and the
    software pipeline can prefetch num_stages tiles ahead: no index load in the loop."""
    expert = tl.program_id(1)
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(Dn, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    lo = tl.load(offsets_ptr + expert)
    hi = tl.load(offsets_ptr + expert + 1)
    cols_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = cols_m < Dm
    mask_n = cols_n < Dn
    ks = tl.arange(0, BLOCK_K)
    rows = lo + ks
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + cols_m[None, :] * stride_ak
    b_ptrs = b_ptr + rows.to(tl.int64)[:, None] * stride_bm + cols_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in range(lo, hi, BLOCK_K):
        row_mask = ks < hi - r0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & mask_m[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=row_mask[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(tl.trans(a.to(DOT_DTYPE)), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_am
        b_ptrs += BLOCK_K * stride_bm
    out_offs = cols_m[:, None] * stride_om + cols_n[None, :] * stride_on
    out_base = out_ptr + expert.to(tl.int64) * stride_oe
    tl.store(
        out_base + out_offs,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


@triton.jit
def _sum_tile_partials_kernel(
    parts_ptr,
    out_ptr,
    offsets_ptr,
    N,
    E,
    stride_p,
    stride_oe,
    TILE_M: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[e] = sum of parts[t] over the M-tiles t of expert e, t ascending (the tiles of
    `_tile_segment` with TILE_M rows): bias gradients from per-tile column sums, in a fixed
    order. An expert with no rows gets zeros."""
    expert = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    seg = tl.arange(0, E_POW2)
    lo = tl.load(offsets_ptr + seg, mask=seg < E, other=0)
    hi = tl.load(offsets_ptr + seg + 1, mask=seg < E, other=0)
    tiles = (hi - lo + TILE_M - 1) // TILE_M
    first = tl.sum(tl.where(seg < expert, tiles, 0), 0)
    count = tl.sum(tl.where(seg == expert, tiles, 0), 0)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    part_ptrs = parts_ptr + first.to(tl.int64) * stride_p + cols
    for _ in range(count):
        acc += tl.load(part_ptrs, mask=col_mask, other=0.0)
        part_ptrs += stride_p
    out_offs = expert.to(tl.int64) * stride_oe + cols
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _segment_sum_kernel(
    src_ptr, order_ptr, bounds_ptr, out_ptr, N, stride_s, stride_o, BLOCK_N: tl.constexpr
):
    """out[t] = sum of src[order[i]] for bounds[t] <= i < bounds[t+1], i ascending."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    lo = tl.load(bounds_ptr + t)
    hi = tl.load(bounds_ptr + t + 1)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for i in range(lo, hi):
        row = tl.load(order_ptr + i).to(tl.int64)
        acc += tl.load(src_ptr + row * stride_s + cols, mask=col_mask, other=0.0).to(tl.float32)
    out_offs = t.to(tl.int64) * stride_o + cols
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=col_mask)
