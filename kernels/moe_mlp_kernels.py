"""Triton kernels that only `moe_mlp` launches (from `moe_mlp.py`): the backward's gather of
token rows into expert order (with the b2 terms), the activation backward fused into a GEMM
through the second layer, and the fixed-order sum of each token's k slots.
They share the tile schedule and activations of the grouped GEMMs in `grouped_matmul_kernels.py`
and their autotune configurations (`grouped_matmul_configs.py`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .grouped_matmul_configs import ACT_BWD_CONFIGS, PRUNE, epilogue_split
from .grouped_matmul_kernels import (
    _activation,
    _activation_grad,
    _column_halves,
    _expert_tile_gemm,
    _swizzle,
    _tile_segment,
)


@triton.jit
def _gather_rows_kernel(
    x_ptr,
    dy_ptr,
    x_out_ptr,
    dy_out_ptr,
    offsets_ptr,
    slots_ptr,
    gate_ptr,
    bias_ptr,
    dgate_bias_ptr,
    db_parts_ptr,
    M,
    D,
    E,
    top_k,
    stride_xm,
    stride_xd,
    stride_dym,
    stride_dyd,
    stride_om,
    stride_be,
    stride_gm,
    stride_pm,
    HAS_BIAS: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One pass over the token rows for the backward, per M-tile of one expert: x[s // k]
    and dy[s // k] copied into expert order (the weight-gradient GEMMs then stream contiguous
    rows), and with b2 the two terms of the backward that need dy and b2 only:
    d gate[s] += <dy[s // k], b2[e]> and this tile's share of db2[e] = sum gate[s] dy[s // k]
    (summed per expert by `_sum_tile_partials_kernel`)."""
    pid = tl.program_id(0)
    expert, row_start, row_end = _tile_segment(offsets_ptr, pid, M, E, BLOCK_M, E_POW2)
    if expert >= E:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    slots = tl.load(slots_ptr + rows, mask=row_mask, other=0)
    tokens = (slots // top_k).to(tl.int64)
    rows64 = rows.to(tl.int64)
    gate = tl.load(gate_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
    bias_dot = tl.zeros((BLOCK_M,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        mask = row_mask[:, None] & col_mask[None, :]
        x_offs = tokens[:, None] * stride_xm + cols[None, :] * stride_xd
        x = tl.load(x_ptr + x_offs, mask=mask, other=0.0)
        tl.store(x_out_ptr + rows64[:, None] * stride_om + cols[None, :], x, mask=mask)
        dy_offs = tokens[:, None] * stride_dym + cols[None, :] * stride_dyd
        dy = tl.load(dy_ptr + dy_offs, mask=mask, other=0.0)
        tl.store(dy_out_ptr + rows64[:, None] * stride_om + cols[None, :], dy, mask=mask)
        if HAS_BIAS:
            dy32 = dy.to(tl.float32)
            b = tl.load(bias_ptr + expert * stride_be + cols, mask=col_mask, other=0.0)
            bias_dot += tl.sum(dy32 * b.to(tl.float32)[None, :], axis=1)
            db = tl.sum(dy32 * gate[:, None], axis=0)
            tl.store(db_parts_ptr + pid.to(tl.int64) * stride_pm + cols, db, mask=col_mask)
    if HAS_BIAS:
        tl.store(dgate_bias_ptr + slots.to(tl.int64) * stride_gm, bias_dot, mask=row_mask)


@triton.jit
def _act_bwd_epilogue(
    g,
    rows,
    cols,
    row_mask,
    N,
    gate,
    pre_ptr,
    dpre_ptr,
    gated_h_ptr,
    db_parts_ptr,
    pid_m,
    stride_hm,
    stride_pm,
    BIAS_GRAD: tl.constexpr,
    ACTIVATION: tl.constexpr,
):
    """For the columns `cols` of one M-tile: stores dpre and gated_h and this tile's column
    sums of dpre (its share of db1); returns the rows' partial <g, act(pre)>. The (M, f)
    pointers point at the tile's first row and `rows` count from 0: 32-bit offsets from one
    64-bit base instead of a 64-bit pointer per element keep registers free."""
    mask = row_mask[:, None] & (cols < N)[None, :]
    offs = rows[:, None] * stride_hm + cols[None, :]
    pre = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = _activation(pre, ACTIVATION)
    tl.store(gated_h_ptr + offs, (h * gate[:, None]).to(gated_h_ptr.dtype.element_ty), mask=mask)
    dpre = g * gate[:, None] * _activation_grad(pre, ACTIVATION)
    tl.store(dpre_ptr + offs, dpre.to(dpre_ptr.dtype.element_ty), mask=mask)
    if BIAS_GRAD:
        # Masked rows have g = 0 and gate = 0, so they add nothing.
        db_offs = pid_m.to(tl.int64) * stride_pm + cols
        tl.store(db_parts_ptr + db_offs, tl.sum(dpre, axis=0), mask=cols < N)
    # act(0) = 0 for every activation, so masked columns add nothing.
    return tl.sum(g * h, axis=1)


@triton.jit
def _act_bwd_chunks(
    g,
    rows,
    first_col,
    row_mask,
    N,
    gate,
    pre_ptr,
    dpre_ptr,
    gated_h_ptr,
    db_parts_ptr,
    pid_m,
    stride_hm,
    stride_pm,
    BIAS_GRAD: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    WIDTH: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """`_act_bwd_epilogue` over the WIDTH columns from first_col, in SPLIT chunks (halving
    recursively; the halves are register-level views of the accumulator)."""
    if SPLIT == 1:
        cols = first_col + tl.arange(0, WIDTH)
        return _act_bwd_epilogue(
            g, rows, cols, row_mask, N, gate, pre_ptr, dpre_ptr, gated_h_ptr,
            db_parts_ptr, pid_m, stride_hm, stride_pm, BIAS_GRAD, ACTIVATION,
        )  # fmt: skip
    else:
        g0, g1 = _column_halves(g, BLOCK_M, WIDTH)
        left = _act_bwd_chunks(
            g0, rows, first_col, row_mask, N, gate, pre_ptr, dpre_ptr, gated_h_ptr,
            db_parts_ptr, pid_m, stride_hm, stride_pm, BIAS_GRAD, ACTIVATION, BLOCK_M,
            WIDTH // 2, SPLIT // 2,
        )  # fmt: skip
        right = _act_bwd_chunks(
            g1, rows, first_col + WIDTH // 2, row_mask, N, gate, pre_ptr, dpre_ptr,
            gated_h_ptr, db_parts_ptr, pid_m, stride_hm, stride_pm, BIAS_GRAD, ACTIVATION,
            BLOCK_M, WIDTH // 2, SPLIT // 2,
        )  # fmt: skip
        return left + right


# Configs with wider column tiles write fewer partial columns: zero them between tuning runs.
@triton.autotune(
    configs=ACT_BWD_CONFIGS,
    key=["N", "K", "BIAS_GRAD", "ACTIVATION"],
    prune_configs_by=PRUNE,
    reset_to_zero=["dgate_ptr"],
)
@triton.heuristics(
    {
        "EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
        # Its epilogue keeps more per element live (pre, act, act', two outputs): 16.
        "EPILOGUE_SPLIT": lambda args: epilogue_split(
            args["BLOCK_M"], args["BLOCK_N"], args.get("num_warps", 4), values=8
        ),
    }
)
@triton.jit
def _grouped_mm_act_bwd_kernel(
    dy_ptr,
    w_ptr,
    pre_ptr,
    dpre_ptr,
    gated_h_ptr,
    offsets_ptr,
    slots_ptr,
    gate_ptr,
    dgate_ptr,
    db_parts_ptr,
    M,
    N,
    K,
    E,
    stride_dym,
    stride_dyk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_hm,
    stride_gm,
    stride_pm,
    BIAS_GRAD: tl.constexpr,
    ACTIVATION: tl.constexpr,
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
    """Backward through the second GEMM and the activation, per sorted row r of slot s, with
    dy already in expert order (dy_ptr row r = dy[s // k]): g = dy_r @ w2[e]^T;
    dpre = gate[s] * g * act'(pre); gated_h = gate[s] * act(pre), recomputed for
    dw2 = gated_h^T @ dy (the gate rides on h so that GEMM streams both operands straight
    from memory); this column tile's share of d gate[s] = <g, act(pre)>; with BIAS_GRAD this
    M-tile's column sums of dpre (its share of db1). The K loop does nothing but the GEMM;
    the epilogue runs in EPILOGUE_SPLIT column chunks, so that only one chunk's pre, h and
    act'(pre) are live next to the accumulator."""
    pid_m, pid_n = _swizzle(M, N, E, BLOCK_M, BLOCK_N, GROUP_M)
    expert, row_start, row_end = _tile_segment(offsets_ptr, pid_m, M, E, BLOCK_M, E_POW2)
    if expert >= E:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N

    acc = _expert_tile_gemm(
        dy_ptr, rows.to(tl.int64), stride_dym, stride_dyk, w_ptr, expert, stride_we,
        stride_wk, stride_wn, cols, row_mask, col_mask, K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
        DOT_DTYPE, DOT_PRECISION,
    )  # fmt: skip

    slots = tl.load(slots_ptr + rows, mask=row_mask, other=0)
    gate = tl.load(gate_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
    # The epilogue runs on column chunks of the accumulator, the chunks taken by splitting
    # it in halves (a register-level reshape, no data movement).
    tile = row_start.to(tl.int64) * stride_hm
    pre_ptr += tile
    dpre_ptr += tile
    gated_h_ptr += tile
    rows = tl.arange(0, BLOCK_M)
    dgate = _act_bwd_chunks(
        acc, rows, pid_n * BLOCK_N, row_mask, N, gate, pre_ptr, dpre_ptr, gated_h_ptr,
        db_parts_ptr, pid_m, stride_hm, stride_pm, BIAS_GRAD, ACTIVATION, BLOCK_M, BLOCK_N,
        EPILOGUE_SPLIT,
    )  # fmt: skip
    tl.store(dgate_ptr + slots.to(tl.int64) * stride_gm + pid_n, dgate, mask=row_mask)


@triton.jit
def _sum_slots_kernel(
    src_ptr,
    gate_ptr,
    out_ptr,
    T,
    N,
    top_k,
    stride_s,
    stride_o,
    GATE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[t] = sum_j gate[t*k + j] * src[t*k + j], j ascending: a fixed order, so the sum is
    the same on every run."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    t_mask = tokens < T
    mask = t_mask[:, None] & (cols[None, :] < N)
    acc = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
    for j in range(top_k):
        slots = tokens.to(tl.int64) * top_k + j
        v = tl.load(src_ptr + slots[:, None] * stride_s + cols[None, :], mask=mask, other=0.0)
        v = v.to(tl.float32)
        if GATE:
            v *= tl.load(gate_ptr + slots, mask=t_mask, other=0.0).to(tl.float32)[:, None]
        acc += v
    out_offs = tokens.to(tl.int64)[:, None] * stride_o + cols[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
