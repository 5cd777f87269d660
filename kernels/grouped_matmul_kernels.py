"""Triton kernels of the grouped GEMMs, shared by `grouped_matmul` and `moe_mlp`: the forward
GEMM with gather, scatter, bias, activation and gate epilogues; the per-expert weight-gradient
GEMM; the fixed-order segment sum; and the tile schedule, activation and dot-type helpers and
autotune configurations that `moe_mlp_kernels.py` reuses. Their launchers are in
`grouped_matmul.py`, which `moe_mlp.py` calls too.

Autotune configurations: a small set per architecture, pruned to those whose tiles fit the
device's shared memory, and a single large-block one under the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import autotune_enabled, device_properties, interpreter_active

ACTIVATION_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}

# Hopper and Ampere: 64/128-row tiles, 128/256-column tiles, 64-deep K steps, 3-4 stages;
# the two 32-deep ones fit fp32 operands into an A100's shared memory.
_CUDA_CONFIGS = [
    triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w
    )
    for bm, bn, bk, s, w in [
        (128, 256, 64, 3, 8),
        (128, 256, 64, 4, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 64, 3, 4),
        (64, 256, 64, 4, 8),
        (64, 128, 64, 4, 4),
        (128, 128, 32, 3, 8),
        (64, 128, 32, 4, 4),
    ]
]
# The interpreter runs one config (autotuning needs a device) and pays per program and K step,
# so it gets large blocks; 64 still leaves several tiles for the tests' d, f < 128.
_INTERPRETER_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4)
]
GEMM_CONFIGS = _INTERPRETER_CONFIGS if interpreter_active() else _CUDA_CONFIGS
MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in GEMM_CONFIGS)


def pipeline_buffers(num_stages: int, capability: int) -> int:
    """Operand buffers Triton allocates in shared memory for a num_stages-deep software
    pipeline: num_stages on Hopper (capability 90), num_stages - 1 on earlier GPUs, whose
    pipeline loads one stage straight into registers (compiled and read off the cubin:
    `benchmarks/compile_report.py`)."""
    return num_stages if capability >= 90 else max(1, num_stages - 1)


def operand_footprint(config: triton.Config, element_size: int, capability: int) -> int:
    """Shared-memory bytes of a GEMM config's pipelined A and B tiles."""
    kw = config.kwargs
    tiles = kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]
    return tiles * element_size * pipeline_buffers(config.num_stages, capability)


def _fits_shared_memory(configs, named_args, **kwargs):
    """Drop configs whose operand pipeline exceeds the device's shared memory for this dtype,
    instead of timing launches that cannot start. With CLASP_AUTOTUNE=0 keep only the first
    that fits: one compile per kernel variant, no timing (the compiled tests' setting)."""
    operand = next(iter(named_args.values()))
    element_size = operand.element_size()
    device = device_properties(operand.device)

    def footprint(c):
        return operand_footprint(c, element_size, device.capability)

    fitting = [c for c in configs if footprint(c) <= device.max_shared_mem]
    fitting = fitting or [min(configs, key=footprint)]
    return fitting if autotune_enabled() else fitting[:1]


PRUNE = {"early_config_prune": _fits_shared_memory}

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


@triton.autotune(
    configs=GEMM_CONFIGS,
    key=["N", "K", "GATHER", "SCATTER", "HAS_BIAS", "ACTIVATION", "STORE_PRE", "GATE"],
    prune_configs_by=PRUNE,
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
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

    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_be + cols, mask=col_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if STORE_PRE:
        pre_offs = rows.to(tl.int64)[:, None] * stride_pm + cols[None, :]
        tl.store(pre_ptr + pre_offs, acc.to(pre_ptr.dtype.element_ty), mask=mask)
    acc = _activation(acc, ACTIVATION)
    if GATE:
        acc *= tl.load(gate_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    if SCATTER:
        out_rows = slots.to(tl.int64)
    else:
        out_rows = rows.to(tl.int64)
    out_offs = out_rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=GEMM_CONFIGS,
    key=["Dm", "Dn", "GATHER_A", "GATHER_B", "BIAS_GRAD", "GATE_BIAS"],
    prune_configs_by=PRUNE,
)
@triton.jit
def _grouped_wgrad_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    bias_grad_ptr,
    offsets_ptr,
    slots_ptr,
    gate_ptr,
    Dm,
    Dn,
    top_k,
    stride_am,
    stride_ak,
    stride_bm,
    stride_bn,
    stride_oe,
    stride_om,
    stride_on,
    stride_ge,
    GATHER_A: tl.constexpr,  # A row of sorted row r is slots[r] // top_k (else r)
    GATHER_B: tl.constexpr,  # B row likewise
    BIAS_GRAD: tl.constexpr,  # also sum B over the expert's rows
    GATE_BIAS: tl.constexpr,  # ... with B row r scaled by gate[slots[r]] in that sum
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[e] = A_e^T @ B_e over expert e's rows (zero for an empty expert): (Dm, Dn) per
    expert, with A (rows, Dm) and B (rows, Dn); the rows are the reduction axis. With
    BIAS_GRAD, programs past the GEMM tiles sum B over the rows into bias_grad[e], one per
    column tile, which keeps the GEMM loop free of register uses of its operands."""
    expert = tl.program_id(1)
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(Dn, BLOCK_N)
    num_tiles = tl.cdiv(Dm, BLOCK_M) * num_pid_n
    lo = tl.load(offsets_ptr + expert)
    hi = tl.load(offsets_ptr + expert + 1)
    if BIAS_GRAD:
        if pid >= num_tiles:
            cols_n = (pid - num_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = cols_n < Dn
            bias_acc = tl.zeros((BLOCK_N,), tl.float32)
            for r0 in range(lo, hi, BLOCK_K):
                rows = r0 + tl.arange(0, BLOCK_K)
                row_mask = rows < hi
                slots = tl.load(slots_ptr + rows, mask=row_mask, other=0)
                if GATHER_B:
                    b_rows = (slots // top_k).to(tl.int64)
                else:
                    b_rows = rows.to(tl.int64)
                b = tl.load(
                    b_ptr + b_rows[:, None] * stride_bm + cols_n[None, :] * stride_bn,
                    mask=row_mask[:, None] & mask_n[None, :],
                    other=0.0,
                ).to(tl.float32)
                if GATE_BIAS:
                    b *= tl.load(gate_ptr + slots, mask=row_mask, other=0.0)[:, None]
                bias_acc += tl.sum(b, axis=0)
            bias_ptrs = bias_grad_ptr + expert * stride_ge + cols_n
            tl.store(bias_ptrs, bias_acc.to(bias_grad_ptr.dtype.element_ty), mask=mask_n)
            return

    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    cols_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = cols_m < Dm
    mask_n = cols_n < Dn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in range(lo, hi, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        row_mask = rows < hi
        if GATHER_A or GATHER_B:
            slots = tl.load(slots_ptr + rows, mask=row_mask, other=0)
        if GATHER_A:
            a_rows = (slots // top_k).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        if GATHER_B:
            b_rows = (slots // top_k).to(tl.int64)
        else:
            b_rows = rows.to(tl.int64)
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_am + cols_m[None, :] * stride_ak,
            mask=row_mask[:, None] & mask_m[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + b_rows[:, None] * stride_bm + cols_n[None, :] * stride_bn,
            mask=row_mask[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = tl.dot(tl.trans(a.to(DOT_DTYPE)), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
    out_offs = cols_m[:, None] * stride_om + cols_n[None, :] * stride_on
    out_base = out_ptr + expert.to(tl.int64) * stride_oe
    tl.store(
        out_base + out_offs,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


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
