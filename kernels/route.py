"""Fused prompt-conditioned top-k router: one pass over the tokens gives everything the MoE
layer and its auxiliary losses need.

Forward, two launches: the gate kernel computes logits = x @ w_gate + prompt_bias[b] per
token block, softmax, top-k and the gate weights, and leaves per-block partials; the sort
kernel turns those into counts, offsets, the stable expert-sorted slot order, probs_mean and
z_loss. No host synchronisation and no float atomics: every reduction runs in a fixed
order, so the same input gives bitwise the same routing. Backward, two launches plus two
small on-device sums: d(logits) from the gradients on weights, probs_mean and z_loss, then
dx = d(logits) @ w_gate^T, dw_gate = x^T @ d(logits) and d(prompt_bias) = sum over tokens.

The fp32 logits are kept for the backward when a gradient is needed: at E experts they cost
4 E bytes per token against the d * itemsize bytes of x that the backward would otherwise
read again to recompute them (1/6 of it at E = 64, d = 768, bf16).

Just over 400 lines: two custom ops (forward, backward) and their Function, with the block
configurations and jit bodies already in `route_kernels.py`.
"""

from __future__ import annotations

import torch
import triton

from . import reference
from .route_kernels import (
    _route_bwd_dw_kernel,
    _route_bwd_logits_kernel,
    _route_fwd_kernel,
    _route_sort_kernel,
    bwd_config,
    expert_block,
    fwd_config,
)
from .types import Routing
from .utils import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    derived_operand,
    interpreter_active,
    new_output,
    sm_count,
    use_triton,
)

MAX_EXPERTS = 128
MAX_TOP_K = 8


def _gate_operand(
    w_gate: torch.Tensor, x_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """w_gate as the kernels read it: (w, w_lo or None, half_dot), each (d, BLOCK_E)
    contiguous with zero columns past E, so every row of the tile is whole and 16-byte
    aligned (at E = 8 a bf16 row of 16 bytes would otherwise leave the tile's rows
    misaligned: scalar loads and a synchronous MMA). Reused while w_gate is unchanged.

    Half-precision x on a GPU takes the tensor-core dot; a w_gate of another dtype is then
    split into hi + lo parts in x's dtype. fp32 x, and everything under the interpreter,
    reads w_gate as it is and computes in fp32.
    """
    half_dot = x_dtype != torch.float32 and not interpreter_active()
    split = half_dot and w_gate.dtype != x_dtype

    def build():
        D, E = w_gate.shape
        block_e = expert_block(E)
        if not split:
            if E == block_e and w_gate.is_contiguous():
                return w_gate, None
            padded = w_gate.new_zeros(D, block_e)
            padded[:, :E] = w_gate
            return padded, None
        w32 = w_gate.new_zeros(D, block_e, dtype=torch.float32)
        w32[:, :E] = w_gate
        hi = w32.to(x_dtype)
        return hi, (w32 - hi.float()).to(x_dtype)

    w, w_lo = derived_operand(w_gate, ("route_gate", x_dtype, half_dot), build)
    return w, w_lo, half_dot


@torch.library.custom_op("clasp::route_fwd", mutates_args=())
def _route_fwd(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    prompt_bias: torch.Tensor,
    top_k: int,
    normalize: bool,
    store_logits: bool,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    B, N, D = x.shape
    E = w_gate.shape[1]
    T = B * N
    device = x.device
    expert_idx = new_output((T, top_k), torch.int32, device)
    weights = new_output((T, top_k), torch.float32, device)
    counts = new_output((E,), torch.int32, device)
    offsets = new_output((E + 1,), torch.int32, device)
    sorted_slots = new_output((T * top_k,), torch.int32, device)
    probs_mean = new_output((E,), torch.float32, device)
    z_loss = new_output((), torch.float32, device)
    logits = new_output((T if store_logits else 0, E), torch.float32, device)

    config = fwd_config(T, D, E, x.dtype, device)
    block_t, block_e = config["BLOCK_T"], expert_block(E)
    n_blocks = triton.cdiv(T, block_t)
    # The per-block partials share one allocation (fewer host calls per route).
    partials = torch.empty(n_blocks * (2 * block_e + 1), dtype=torch.float32, device=device)
    block_counts = partials[: n_blocks * block_e].view(torch.int32)
    block_probs = partials[n_blocks * block_e : 2 * n_blocks * block_e]
    block_zsq = partials[2 * n_blocks * block_e :]
    w, w_lo, half_dot = _gate_operand(w_gate, x.dtype)
    _route_fwd_kernel[(n_blocks,)](
        x,
        w,
        w if w_lo is None else w_lo,
        prompt_bias,
        expert_idx,
        weights,
        logits,
        block_counts,
        block_probs,
        block_zsq,
        T,
        N,
        D,
        E,
        *x.stride(),
        *w.stride(),
        *prompt_bias.stride(),
        K=top_k,
        NORMALIZE=normalize,
        STORE_LOGITS=store_logits,
        HALF_DOT=half_dot,
        HAS_W_LO=w_lo is not None,
        BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k),
        **config,
    )

    if interpreter_active():
        # Two blocks per program: small tests still place slots after earlier programs' ones.
        blocks_per_program = 2
    else:
        blocks_per_program = triton.cdiv(n_blocks, sm_count(device))
    n_programs = triton.cdiv(n_blocks, blocks_per_program) + 1
    _route_sort_kernel[(n_programs,)](
        expert_idx,
        block_counts,
        block_probs,
        block_zsq,
        sorted_slots,
        counts,
        offsets,
        probs_mean,
        z_loss,
        T,
        E,
        n_blocks,
        blocks_per_program,
        K=top_k,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_B=max(2, min(triton.next_power_of_2(n_blocks), 4096 // block_e)),
        BLOCK_S=max(
            16, min(triton.next_power_of_2(blocks_per_program * block_t * top_k), 8192 // block_e)
        ),
        num_warps=4,
    )
    return expert_idx, weights, counts, offsets, sorted_slots, probs_mean, z_loss, logits


@_route_fwd.register_fake
def _(x, w_gate, prompt_bias, top_k, normalize, store_logits):
    B, N, _ = x.shape
    E = w_gate.shape[1]
    T = B * N
    i32, f32 = torch.int32, torch.float32
    return (
        x.new_empty((T, top_k), dtype=i32),
        x.new_empty((T, top_k), dtype=f32),
        x.new_empty((E,), dtype=i32),
        x.new_empty((E + 1,), dtype=i32),
        x.new_empty((T * top_k,), dtype=i32),
        x.new_empty((E,), dtype=f32),
        x.new_empty((), dtype=f32),
        x.new_empty((T if store_logits else 0, E), dtype=f32),
    )


@torch.library.custom_op("clasp::route_bwd", mutates_args=())
def _route_bwd(
    dweights: torch.Tensor | None,
    dprobs_mean: torch.Tensor | None,
    dz_loss: torch.Tensor | None,
    x: torch.Tensor,
    w_gate: torch.Tensor,
    expert_idx: torch.Tensor,
    logits: torch.Tensor,
    normalize: bool,
    need_dx: bool,
    need_dw: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N, D = x.shape
    T, top_k = expert_idx.shape
    E = w_gate.shape[1]
    device = x.device
    block_t, block_d = bwd_config(D, x.dtype)
    block_e = expert_block(E)
    n_blocks = triton.cdiv(T, block_t)
    warps = 8 if block_t * block_e >= 8192 else 4
    dlogits = new_output((T, E), torch.float32, device)
    dx = new_output((B, N, D) if need_dx else (0,), x.dtype, device)
    w, w_lo, half_dot = _gate_operand(w_gate, x.dtype)
    _route_bwd_logits_kernel[(n_blocks,)](
        logits,
        expert_idx,
        logits if dweights is None else dweights,
        logits if dprobs_mean is None else dprobs_mean,
        logits if dz_loss is None else dz_loss,
        w,
        w if w_lo is None else w_lo,
        dlogits,
        dx,
        T,
        D,
        E,
        *w.stride(),
        K=top_k,
        NORMALIZE=normalize,
        HAS_DWEIGHTS=dweights is not None,
        HAS_DPROBS_MEAN=dprobs_mean is not None,
        HAS_DZ_LOSS=dz_loss is not None,
        COMPUTE_DX=need_dx,
        HALF_DOT=half_dot,
        HAS_W_LO=w_lo is not None,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k),
        num_warps=warps,
    )

    dw = w_gate.new_empty((0,))
    if need_dw:
        d_blocks = triton.cdiv(D, block_d)
        if interpreter_active():
            splits = min(n_blocks, 2)
        else:
            # About one program per SM: each split adds a (D, E) fp32 partial to write and sum.
            splits = max(1, min(n_blocks, sm_count(device) // max(d_blocks, 1)))
        blocks_per_split = triton.cdiv(n_blocks, splits)
        splits = triton.cdiv(n_blocks, blocks_per_split)
        partial = new_output((splits, D, E), torch.float32, device)
        if D > 0:
            _route_bwd_dw_kernel[(d_blocks, splits)](
                x,
                dlogits,
                partial,
                T,
                N,
                D,
                E,
                *x.stride(),
                n_blocks,
                blocks_per_split,
                HALF_DOT=half_dot,
                BLOCK_T=block_t,
                BLOCK_D=block_d,
                BLOCK_E=block_e,
                num_warps=warps,
            )
        dw = partial.sum(0).to(w_gate.dtype)
    dbias = logits.new_empty((0,))
    if need_dbias:
        dbias = dlogits.view(B, N, E).sum(1)
    return dx, dw, dbias


@_route_bwd.register_fake
def _(
    dweights,
    dprobs_mean,
    dz_loss,
    x,
    w_gate,
    expert_idx,
    logits,
    normalize,
    need_dx,
    need_dw,
    need_dbias,
):
    B, N, D = x.shape
    E = w_gate.shape[1]
    return (
        x.new_empty((B, N, D) if need_dx else (0,)),
        w_gate.new_empty((D, E) if need_dw else (0,)),
        logits.new_empty((B, E) if need_dbias else (0,)),
    )


class _RouteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, prompt_bias, top_k: int, normalize: bool, store_logits: bool):
        *routing, logits = _route_fwd(x, w_gate, prompt_bias, top_k, normalize, store_logits)
        expert_idx, _, counts, offsets, sorted_slots, _, _ = routing
        ctx.mark_non_differentiable(expert_idx, counts, offsets, sorted_slots)
        ctx.save_for_backward(x, w_gate, expert_idx, logits)
        ctx.normalize = normalize
        ctx.bias_dtype = prompt_bias.dtype
        ctx.set_materialize_grads(False)
        return tuple(routing)

    @staticmethod
    def backward(ctx, _idx, dweights, _counts, _offsets, _slots, dprobs_mean, dz_loss):
        x, w_gate, expert_idx, logits = ctx.saved_tensors
        need_dx, need_dw, need_dbias = ctx.needs_input_grad[:3]
        if dweights is None and dprobs_mean is None and dz_loss is None:
            return (None,) * 6
        if logits.shape[0] != expert_idx.shape[0]:
            raise RuntimeError("route: backward through a call made with gradients disabled")
        dx, dw, dbias = _route_bwd(
            None if dweights is None else dweights.contiguous(),
            None if dprobs_mean is None else dprobs_mean.contiguous(),
            dz_loss,
            x,
            w_gate,
            expert_idx,
            logits,
            ctx.normalize,
            need_dx,
            need_dw,
            need_dbias,
        )
        return (
            dx if need_dx else None,
            dw if need_dw else None,
            dbias.to(ctx.bias_dtype) if need_dbias else None,
            None,
            None,
            None,
        )


def _check_inputs(x, w_gate, prompt_bias, top_k) -> None:
    check_tensor("x", x, 3, FLOAT_DTYPES)
    check_tensor("w_gate", w_gate, 2, FLOAT_DTYPES)
    check_tensor("prompt_bias", prompt_bias, 2, FLOAT_DTYPES)
    check_same_device(x=x, w_gate=w_gate, prompt_bias=prompt_bias)
    B, N, d = x.shape
    d_gate, E = w_gate.shape
    if d_gate != d:
        raise ValueError(
            f"w_gate must be (d, E) with d = {d} (the last dimension of x), got shape "
            f"{tuple(w_gate.shape)}"
        )
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"the number of experts E must be in [1, {MAX_EXPERTS}], got {E}")
    if tuple(prompt_bias.shape) != (B, E):
        raise ValueError(
            f"prompt_bias must be (B, E) = ({B}, {E}), one row of expert biases per sample, "
            f"got shape {tuple(prompt_bias.shape)}"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= min(E, MAX_TOP_K):
        raise ValueError(
            f"top_k must be in [1, min(E, {MAX_TOP_K})] = [1, {min(E, MAX_TOP_K)}] for E = {E} "
            f"experts, got {top_k}"
        )


def route(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    prompt_bias: torch.Tensor,
    top_k: int,
    *,
    normalize: bool = True,
    backend: str = "auto",
) -> Routing:
    """Route each of the T = B * N tokens to its top_k experts, steered by a per-sample prompt.

    logits = x @ w_gate + prompt_bias[b] (fp32), probs = softmax over the E experts; each token
    takes the top_k experts by probability (ties to the lower index), with their probabilities
    as gate weights, renormalised to sum to 1 when `normalize`.

    Args:
        x: (B, N, d) tokens, fp32, bf16 or fp16 (fp64 runs the reference); any strides.
        w_gate: (d, E) gate weights, 1 <= E <= 128; any of these dtypes and strides.
        prompt_bias: (B, E) the task prompt's contribution to each sample's logits.
        top_k: experts per token, 1 <= top_k <= min(E, 8).
        normalize: renormalise the top_k probabilities of each token to sum to 1.
        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1; the reference for
            fp64), "triton" or "reference".
    Returns:
        Routing with expert_idx (T, top_k) int32 (by descending probability), weights
        (T, top_k) fp32, counts (E,) int32, offsets (E + 1,) int32, sorted_slots (T * top_k,)
        int32 (slot t * top_k + j grouped by expert, ascending within one), probs_mean (E,)
        fp32 and z_loss () fp32 (mean of logsumexp(logits)^2); the float ones are fp64 for
        fp64 inputs. weights, probs_mean and z_loss are differentiable with respect to x,
        w_gate and prompt_bias. Autocast does not apply: both backends compute from the
        inputs as given.

    Non-finite input: a token whose logits are not all finite (a NaN or infinite value in
    its row of x, in its sample's prompt_bias, or a NaN in w_gate, which reaches every
    token) still gets valid experts, 0..top_k-1, so counts sum to T * top_k and every
    sorted slot is written; its weights are NaN, so NaN reaches that token's MoE output,
    and probs_mean and z_loss are NaN, as are the gradients through that token. Both
    backends give the same experts, grouping and NaN positions.
    """
    _check_inputs(x, w_gate, prompt_bias, top_k)
    B, N, _ = x.shape
    triton_path = use_triton("route", backend, x=x, w_gate=w_gate, prompt_bias=prompt_bias)
    if not triton_path or B * N == 0:
        with torch.autocast(x.device.type, enabled=False):
            return reference.route(x, w_gate, prompt_bias, top_k, normalize=normalize)
    # The backward reads the saved fp32 logits; inference skips writing them.
    store_logits = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, w_gate, prompt_bias)
    )
    return Routing(
        *_RouteFunction.apply(x, w_gate, prompt_bias, top_k, bool(normalize), store_logits)
    )
