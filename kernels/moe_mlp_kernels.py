"""Triton kernels that only `moe_mlp` launches (from `moe_mlp.py`): the activation backward
fused into a GEMM through the second layer, and the fixed-order sum of each token's k slots.
They share the tile schedule, activations and autotune configurations of the grouped GEMMs in
`grouped_matmul_kernels.py`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .grouped_matmul_kernels import (
    GEMM_CONFIGS,
    PRUNE,
    _activation,
    _activation_grad,
    _swizzle,
    _tile_segment,
)


# Configs with wider column tiles write fewer partial columns: zero them between tuning runs.
@triton.autotune(
    configs=GEMM_CONFIGS,
    key=["N", "K", "HAS_BIAS", "ACTIVATION"],
    prune_configs_by=PRUNE,
    reset_to_zero=["dgate_ptr"],
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
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
    bias_ptr,
    dgate_ptr,
    M,
    N,
    K,
    E,
    top_k,
    stride_dym,
    stride_dyk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_hm,
    stride_be,
    stride_gm,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """Backward through the second GEMM and the activation, per sorted row r of slot s:
    g = dy[s // k] @ w2[e]^T; dpre = gate[s] * g * act'(pre); gated_h = gate[s] * act(pre),
    recomputed for dw2 = gated_h^T @ dy (the gate rides on h so that GEMM streams both
    operands straight from memory); and this column tile's share of
    d gate[s] = <g, act(pre)> + <dy[s // k], b2[e]>."""
    pid_m, pid_n = _swizzle(M, N, E, BLOCK_M, BLOCK_N, GROUP_M)
    expert, row_start, row_end = _tile_segment(offsets_ptr, pid_m, M, E, BLOCK_M, E_POW2)
    if expert >= E:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]

    slots = tl.load(slots_ptr + rows, mask=row_mask, other=0)
    ks = tl.arange(0, BLOCK_K)
    dy_ptrs = (
        dy_ptr + (slots // top_k).to(tl.int64)[:, None] * stride_dym + ks[None, :] * stride_dyk
    )
    w_ptrs = (
        w_ptr
        + expert.to(tl.int64) * stride_we
        + ks[:, None] * stride_wk
        + cols[None, :] * stride_wn
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    bias_dot = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            dy = tl.load(dy_ptrs, mask=row_mask[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            k_mask = ks < K - k0
            dy = tl.load(dy_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(dy.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            if pid_n == 0:  # <dy, b2> once per row, by the first column tile
                b_offs = expert * stride_be + k0 + ks
                b = tl.load(bias_ptr + b_offs, mask=ks < K - k0, other=0.0).to(tl.float32)
                bias_dot += tl.sum(dy.to(tl.float32) * b[None, :], axis=1)
        dy_ptrs += BLOCK_K * stride_dyk
        w_ptrs += BLOCK_K * stride_wk

    offs = rows.to(tl.int64)[:, None] * stride_hm + cols[None, :]
    pre = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = _activation(pre, ACTIVATION)
    gate = tl.load(gate_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
    gated_h = h * gate[:, None]
    tl.store(gated_h_ptr + offs, gated_h.to(gated_h_ptr.dtype.element_ty), mask=mask)
    dpre = acc * gate[:, None] * _activation_grad(pre, ACTIVATION)
    tl.store(dpre_ptr + offs, dpre.to(dpre_ptr.dtype.element_ty), mask=mask)
    # act(0) = 0 for every activation, so masked columns add nothing.
    dgate = tl.sum(acc * h, axis=1) + bias_dot
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
