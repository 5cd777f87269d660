"""Triton kernels of the prompt-conditioned top-k router and their block configurations
(launched from `route.py`). Just over 400 lines: four kernels of one op that share block
sizes; split further, one launch contract would span files.

Forward: `_route_fwd_kernel` reads each token once and writes its experts and gate weights,
plus per-token-block partials (expert histogram, probability column sums, sum of lse^2);
`_route_sort_kernel` turns the partials into counts, offsets, the stable expert-sorted slot
order and the load-balancing statistics. Backward: `_route_bwd_logits_kernel` forms
d(logits) from the saved logits and writes dx; `_route_bwd_dw_kernel` reduces x^T d(logits)
over token splits whose partials are summed in a fixed order (no float atomics).

Precision: logits, softmax and all reductions in fp32. Half-precision operands (HALF_DOT)
go through tensor cores with fp32 accumulation; an fp32 operand that meets a half one is
split into hi + lo halves so the product keeps about 16 more bits. fp32 inputs (and every
input under the interpreter, whose bf16 arithmetic is wrong) use a full-precision fp32 dot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import interpreter_active, sm_count

# tl.dot needs every block dimension >= 16: fewer experts are padded and masked.
MIN_BLOCK_E = 16


def expert_block(E: int) -> int:
    """BLOCK_E: the E experts padded to a power of 2 of at least MIN_BLOCK_E."""
    return max(MIN_BLOCK_E, triton.next_power_of_2(E))


def _interpreter_block_d(D: int) -> int:
    # The interpreter pays per program and per loop step: one step over small d.
    return min(256, max(16, triton.next_power_of_2(D)))


def fwd_config(T: int, D: int, E: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Block sizes, warps and stages of the gate kernel."""
    if interpreter_active():
        return dict(BLOCK_T=64, BLOCK_D=_interpreter_block_d(D), num_warps=4, num_stages=1)
    if dtype == torch.float32:
        # The full-precision fp32 dot runs on CUDA cores: compute-bound, small tiles.
        return dict(BLOCK_T=64, BLOCK_D=32, num_warps=4, num_stages=3)
    block_e = expert_block(E)
    # Bigger token blocks reuse each w_gate tile more; keep at least one block per SM.
    block_t = 128 if block_e <= 64 and triton.cdiv(T, 128) >= sm_count(device) else 64
    warps = 8 if block_t * block_e >= 8192 else 4
    return dict(BLOCK_T=block_t, BLOCK_D=64, num_warps=warps, num_stages=4)


def bwd_config(D: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D) of both backward kernels."""
    if interpreter_active():
        return 64, _interpreter_block_d(D)
    return 64, (32 if dtype == torch.float32 else 128)


@triton.jit
def _route_fwd_kernel(
    x_ptr,
    w_ptr,
    w_lo_ptr,
    bias_ptr,
    expert_idx_ptr,
    weights_ptr,
    logits_ptr,
    block_counts_ptr,
    block_probs_ptr,
    block_zsq_ptr,
    T,
    N,
    D,
    E,
    stride_xb,
    stride_xn,
    stride_xd,
    stride_wd,
    stride_we,
    stride_bb,
    stride_be,
    K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    HALF_DOT: tl.constexpr,
    HAS_W_LO: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    sample = rows // N
    # Tokens are addressed through (b, n, d) strides, so strided views of x need no copy.
    x_rows = x_ptr + sample.to(tl.int64) * stride_xb + (rows % N).to(tl.int64) * stride_xn
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    dims = tl.arange(0, BLOCK_D)

    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dims
        d_ok = d < D
        x_mask = row_ok[:, None] & d_ok[None, :]
        x = tl.load(x_rows[:, None] + d[None, :] * stride_xd, mask=x_mask, other=0.0)
        # w is padded to BLOCK_E zero columns (`_gate_operand`): whole, aligned rows.
        w_offsets = d[:, None] * stride_wd + cols[None, :] * stride_we
        w_mask = d_ok[:, None]
        w = tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0)
        if HALF_DOT:
            acc = tl.dot(x, w, acc)
            if HAS_W_LO:
                acc = tl.dot(x, tl.load(w_lo_ptr + w_offsets, mask=w_mask, other=0.0), acc)
        else:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")

    tile_mask = row_ok[:, None] & col_ok[None, :]
    bias_offsets = sample.to(tl.int64)[:, None] * stride_bb + cols[None, :] * stride_be
    bias = tl.load(bias_ptr + bias_offsets, mask=tile_mask, other=0.0).to(tl.float32)
    logits = acc + bias
    # A token with a NaN or infinite logit is non-finite: its logits are stored as NaN, it
    # takes experts 0..k-1 and NaN weights, probabilities and lse (see `route`). Decided by
    # comparisons, never by max/argmax, whose NaN handling differs between GPU and CPU.
    non_finite = tl.sum((col_ok[None, :] & ~(tl.abs(logits) < float("inf"))).to(tl.int32), 1) > 0
    logits = tl.where(non_finite[:, None], float("nan"), logits)
    logits = tl.where(col_ok[None, :], logits, float("-inf"))
    if STORE_LOGITS:
        logit_offsets = rows.to(tl.int64)[:, None] * E + cols[None, :]
        tl.store(logits_ptr + logit_offsets, logits, mask=tile_mask)
    row_max = tl.max(logits, axis=1)
    unnorm = tl.exp(logits - row_max[:, None])
    unnorm = tl.where(non_finite[:, None], float("nan"), unnorm)
    denom = tl.sum(unnorm, axis=1)
    lse = row_max + tl.log(denom)
    lse = tl.where(non_finite, float("nan"), lse)

    # Top-k by repeated max over the experts not yet taken. Selecting on fp32 logits rather
    # than on probabilities keeps apart experts whose probabilities round to the same value;
    # the min over equal candidates sends ties to the lower index. Non-finite tokens select
    # on -index, which picks experts 0, 1, ... in that order.
    select = tl.where(non_finite[:, None], -cols[None, :].to(tl.float32), logits)
    k_cols = tl.arange(0, BLOCK_K)
    top_idx = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    top_unnorm = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    free = col_ok[None, :] & (rows[:, None] >= 0)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for j in tl.static_range(K):
        candidates = tl.where(free, select, float("-inf"))
        best = tl.max(candidates, axis=1)
        tied = free & (candidates == best[:, None])
        choice = tl.min(tl.where(tied, cols[None, :], BLOCK_E), axis=1)
        hit = cols[None, :] == choice[:, None]
        free = free & (cols[None, :] != choice[:, None])
        top_idx = tl.where(k_cols[None, :] == j, choice[:, None], top_idx)
        chosen = tl.sum(tl.where(hit, unnorm, 0.0), axis=1)
        top_unnorm = tl.where(k_cols[None, :] == j, chosen[:, None], top_unnorm)
        counts += tl.sum((hit & row_ok[:, None]).to(tl.int32), axis=0)
    if NORMALIZE:
        weights = top_unnorm / tl.sum(top_unnorm, axis=1)[:, None]
    else:
        weights = top_unnorm / denom[:, None]

    slot_offsets = rows.to(tl.int64)[:, None] * K + k_cols[None, :]
    slot_mask = row_ok[:, None] & (k_cols[None, :] < K)
    tl.store(expert_idx_ptr + slot_offsets, top_idx, mask=slot_mask)
    tl.store(weights_ptr + slot_offsets, weights, mask=slot_mask)
    probs = unnorm / denom[:, None]
    tl.store(block_counts_ptr + pid * BLOCK_E + cols, counts)
    tl.store(
        block_probs_ptr + pid * BLOCK_E + cols,
        tl.sum(tl.where(row_ok[:, None], probs, 0.0), axis=0),
    )
    tl.store(block_zsq_ptr + pid, tl.sum(tl.where(row_ok, lse * lse, 0.0), axis=0))


@triton.jit
def _route_sort_kernel(
    expert_idx_ptr,
    block_counts_ptr,
    block_probs_ptr,
    block_zsq_ptr,
    sorted_slots_ptr,
    counts_ptr,
    offsets_ptr,
    probs_mean_ptr,
    z_loss_ptr,
    T,
    E,
    n_blocks,
    blocks_per_program,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Programs 0..P-2 each place the slots of `blocks_per_program` forward blocks; the last
    program writes counts, offsets, probs_mean and z_loss. Every program re-reads the small
    (n_blocks, BLOCK_E) histogram instead of waiting on a separate scan launch."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    first_block = pid * blocks_per_program
    total = tl.zeros((BLOCK_E,), dtype=tl.int32)
    before = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for b0 in range(0, n_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        tile = tl.load(
            block_counts_ptr + blocks[:, None] * BLOCK_E + cols[None, :],
            mask=(blocks < n_blocks)[:, None],
            other=0,
        )
        total += tl.sum(tile, axis=0)
        before += tl.sum(tl.where((blocks < first_block)[:, None], tile, 0), axis=0)
    starts = tl.cumsum(total, axis=0) - total

    if pid == tl.num_programs(0) - 1:
        tl.store(counts_ptr + cols, total, mask=col_ok)
        tl.store(offsets_ptr + cols, starts, mask=col_ok)
        tl.store(offsets_ptr + E, tl.sum(total, axis=0))
        # Fixed summation order: the same input gives bitwise the same statistics.
        prob_sum = tl.zeros((BLOCK_E,), dtype=tl.float32)
        zsq_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for b0 in range(0, n_blocks, BLOCK_B):
            blocks = b0 + tl.arange(0, BLOCK_B)
            block_ok = blocks < n_blocks
            prob_sum += tl.sum(
                tl.load(
                    block_probs_ptr + blocks[:, None] * BLOCK_E + cols[None, :],
                    mask=block_ok[:, None],
                    other=0.0,
                ),
                axis=0,
            )
            zsq_sum += tl.load(block_zsq_ptr + blocks, mask=block_ok, other=0.0)
        tl.store(probs_mean_ptr + cols, prob_sum / T, mask=col_ok)
        tl.store(z_loss_ptr, tl.sum(zsq_sum, axis=0) / T)
    else:
        # Slot s goes to offsets[e] + (slots of e in earlier blocks) + (earlier slots of e
        # in this block): a stable counting sort.
        next_pos = starts + before
        slot_start = first_block * (BLOCK_T * K)
        slot_end = tl.minimum(slot_start + blocks_per_program * (BLOCK_T * K), T * K)
        for s0 in range(slot_start, slot_end, BLOCK_S):
            slots = s0 + tl.arange(0, BLOCK_S)
            slot_ok = slots < slot_end
            experts = tl.load(expert_idx_ptr + slots, mask=slot_ok, other=BLOCK_E)
            hit = (experts[:, None] == cols[None, :]).to(tl.int32)
            rank = tl.cumsum(hit, axis=0) - hit
            position = tl.sum(hit * (rank + next_pos[None, :]), axis=1)
            # The bound only matters if the histogram were inconsistent: fail loudly (unwritten
            # slots) rather than write out of bounds.
            tl.store(sorted_slots_ptr + position, slots, mask=slot_ok & (position < T * K))
            next_pos += tl.sum(hit, axis=0)


@triton.jit
def _split_half(value, scale, dtype: tl.constexpr):
    """value / scale as hi + lo in a half dtype; scale is a power of 2, so it is exact and
    keeps small fp16 values out of the subnormal range."""
    scaled = value / scale
    hi = scaled.to(dtype)
    lo = (scaled - hi.to(tl.float32)).to(dtype)
    return hi, lo


@triton.jit
def _pow2_scale(tile):
    """The power of 2 at or above max|tile| (1 for an all-zero tile)."""
    peak = tl.max(tl.max(tl.abs(tile), axis=1), axis=0)
    return tl.where(peak > 0, tl.exp2(tl.ceil(tl.log2(peak))), 1.0)


@triton.jit
def _route_bwd_logits_kernel(
    logits_ptr,
    expert_idx_ptr,
    dweights_ptr,
    dprobs_mean_ptr,
    dz_loss_ptr,
    w_ptr,
    w_lo_ptr,
    dlogits_ptr,
    dx_ptr,
    T,
    D,
    E,
    stride_wd,
    stride_we,
    K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    HAS_DWEIGHTS: tl.constexpr,
    HAS_DPROBS_MEAN: tl.constexpr,
    HAS_DZ_LOSS: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    HALF_DOT: tl.constexpr,
    HAS_W_LO: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    tile_mask = row_ok[:, None] & col_ok[None, :]
    logits = tl.load(logits_ptr + rows64[:, None] * E + cols[None, :], mask=tile_mask, other=0.0)
    logits = tl.where(col_ok[None, :], logits, float("-inf"))
    row_max = tl.max(logits, axis=1)
    unnorm = tl.exp(logits - row_max[:, None])
    denom = tl.sum(unnorm, axis=1)
    probs = unnorm / denom[:, None]
    inv_T = 1.0 / T

    dprobs = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    if HAS_DPROBS_MEAN:
        dprobs_mean = tl.load(dprobs_mean_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        dprobs += dprobs_mean[None, :] * inv_T
    if HAS_DWEIGHTS:
        k_cols = tl.arange(0, BLOCK_K)
        slot_offsets = rows64[:, None] * K + k_cols[None, :]
        slot_mask = row_ok[:, None] & (k_cols[None, :] < K)
        top_idx = tl.load(expert_idx_ptr + slot_offsets, mask=slot_mask, other=-1)
        dtop = tl.load(dweights_ptr + slot_offsets, mask=slot_mask, other=0.0).to(tl.float32)
        if NORMALIZE:
            # weights_j = p_j / S with S = sum_i p_i: dp_j = (dw_j - sum_i dw_i weights_i) / S.
            top_probs = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
            for j in tl.static_range(K):
                choice = tl.sum(tl.where(k_cols[None, :] == j, top_idx, 0), axis=1)
                p_j = tl.sum(tl.where(cols[None, :] == choice[:, None], probs, 0.0), axis=1)
                top_probs = tl.where(k_cols[None, :] == j, p_j[:, None], top_probs)
            # Rows past T have no experts: keep their (masked) arithmetic finite.
            total = tl.where(row_ok, tl.sum(top_probs, axis=1), 1.0)
            dtop = (dtop - (tl.sum(dtop * top_probs, axis=1) / total)[:, None]) / total[:, None]
        for j in tl.static_range(K):
            choice = tl.sum(tl.where(k_cols[None, :] == j, top_idx, 0), axis=1)
            dtop_j = tl.sum(tl.where(k_cols[None, :] == j, dtop, 0.0), axis=1)
            dprobs += tl.where(cols[None, :] == choice[:, None], dtop_j[:, None], 0.0)
    dlogits = probs * (dprobs - tl.sum(dprobs * probs, axis=1)[:, None])
    if HAS_DZ_LOSS:
        # d lse^2 / d logits = 2 lse probs.
        lse = row_max + tl.log(denom)
        dz = tl.load(dz_loss_ptr).to(tl.float32)
        dlogits += (2.0 * dz * inv_T) * lse[:, None] * probs
    # A non-finite token's saved logits are NaN: its d(logits) is NaN, whatever the upstream
    # gradients (as autograd through the reference gives).
    non_finite = tl.sum((col_ok[None, :] & (logits != logits)).to(tl.int32), 1) > 0
    dlogits = tl.where(non_finite[:, None], float("nan"), dlogits)
    dlogits = tl.where(tile_mask, dlogits, 0.0)
    tl.store(dlogits_ptr + rows64[:, None] * E + cols[None, :], dlogits, mask=tile_mask)

    if COMPUTE_DX:
        dims = tl.arange(0, BLOCK_D)
        if HALF_DOT:
            scale = _pow2_scale(dlogits)
            dl_hi, dl_lo = _split_half(dlogits, scale, w_ptr.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + dims
            d_ok = d < D
            # (BLOCK_E, BLOCK_D) tile of w^T.
            wt_offsets = cols[:, None] * stride_we + d[None, :] * stride_wd
            wt_mask = d_ok[None, :]  # padded to BLOCK_E zero columns
            wt = tl.load(w_ptr + wt_offsets, mask=wt_mask, other=0.0)
            if HALF_DOT:
                dx = tl.dot(dl_hi, wt)
                dx = tl.dot(dl_lo, wt, dx)
                if HAS_W_LO:
                    dx = tl.dot(dl_hi, tl.load(w_lo_ptr + wt_offsets, mask=wt_mask, other=0.0), dx)
                dx = dx * scale
            else:
                dx = tl.dot(dlogits, wt.to(tl.float32), input_precision="ieee")
            dx_offsets = rows64[:, None] * D + d[None, :]
            tl.store(dx_ptr + dx_offsets, dx, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _route_bwd_dw_kernel(
    x_ptr,
    dlogits_ptr,
    dw_partial_ptr,
    T,
    N,
    D,
    E,
    stride_xb,
    stride_xn,
    stride_xd,
    n_blocks,
    blocks_per_split,
    HALF_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """dw_partial[split, d, e] = sum over this split's tokens of x[t, d] * dlogits[t, e]."""
    pid_d = tl.program_id(0)
    split = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    acc = tl.zeros((BLOCK_D, BLOCK_E), dtype=tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, n_blocks)
    for block in range(first, last):
        rows = block * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        x_rows = (rows // N).to(tl.int64) * stride_xb + (rows % N).to(tl.int64) * stride_xn
        x = tl.load(
            x_ptr + x_rows[:, None] + d[None, :] * stride_xd,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        dl = tl.load(
            dlogits_ptr + rows.to(tl.int64)[:, None] * E + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if HALF_DOT:
            scale = _pow2_scale(dl)
            dl_hi, dl_lo = _split_half(dl, scale, x_ptr.dtype.element_ty)
            xt = tl.trans(x)
            part = tl.dot(xt, dl_hi)
            part = tl.dot(xt, dl_lo, part)
            acc += part * scale
        else:
            acc = tl.dot(tl.trans(x.to(tl.float32)), dl, acc, input_precision="ieee")
    out = dw_partial_ptr + split.to(tl.int64) * D * E + d[:, None] * E + cols[None, :]
    tl.store(out, acc, mask=d_ok[:, None] & col_ok[None, :])
