"""Mixture-of-experts MLP over routed tokens: its launchers, custom ops, autograd Function and
public op, built on the grouped GEMMs of `grouped_matmul.py`.

    y[t] = sum_j weights[t, j] * (act(x[t] @ w1[e] + b1[e]) @ w2[e] + b2[e]),  e = expert_idx[t, j]

Forward is two grouped GEMMs over the expert-sorted slots: the first gathers token rows
x[slot // k] and fuses bias and activation; the second fuses bias, gate weight and the
scatter back to slot order, and the k slots of each token are summed in a fixed order (for
k = 1 the second GEMM writes token rows directly). Backward: one pass copies x and dy rows
into expert order (and takes the b2 terms), one fused GEMM goes through the second layer
and the activation (its epilogue also sums db1 per tile), two weight-gradient GEMMs stream
the expert-ordered rows, and one GEMM gives dx, summed per token in the same fixed order:
every result is bitwise the same from run to run. No launch reads a device value on the
host.

Just over 400 lines: the launchers of the backward's gather, activation backward and slot
sum beside the two custom ops and their autograd Function; the jit bodies are already in
`moe_mlp_kernels.py`.
"""

from __future__ import annotations

import torch
import triton

from . import reference
from .grouped_matmul import (
    _grid_rows,
    launch_grouped_mm,
    launch_grouped_wgrad,
    launch_sum_tile_partials,
)
from .grouped_matmul_configs import ACT_BWD_BLOCK_M, MIN_BLOCK_N
from .grouped_matmul_kernels import ACTIVATION_CODES, dot_dtype, dot_precision
from .moe_mlp_kernels import _gather_rows_kernel, _grouped_mm_act_bwd_kernel, _sum_slots_kernel
from .reference import ACTIVATIONS
from .types import Routing
from .utils import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    autocast_inputs,
    check_same_device,
    check_tensor,
    interpreter_active,
    new_output,
    use_triton,
)

# Rows per tile of the backward's gather (and of its db2 partials).
GATHER_BLOCK_M = 64


def _empty(like: torch.Tensor) -> torch.Tensor:
    """Placeholder for an output a custom op has no value for (custom ops return tensors)."""
    return like.new_empty(0)


def launch_gather_rows(
    x: torch.Tensor,
    dy: torch.Tensor,
    x_sorted: torch.Tensor,
    dy_sorted: torch.Tensor,
    offsets: torch.Tensor,
    slots: torch.Tensor,
    gates: torch.Tensor,
    top_k: int,
    b2: torch.Tensor | None,
    dgate_bias: torch.Tensor,
    db2_parts: torch.Tensor,
) -> None:
    """Fills x_sorted and dy_sorted (M, d): rows x[s // k], dy[s // k] of the sorted slots s;
    with b2 also dgate_bias[s] = <dy[s // k], b2[e]> (a column view of the d(gate) partials)
    and db2_parts, per GATHER_BLOCK_M-row tile, the tile's sum of gate[s] * dy[s // k]."""
    M, d = x_sorted.shape
    E = offsets.shape[0] - 1
    grid = (triton.cdiv(M, GATHER_BLOCK_M) + E,)
    _gather_rows_kernel[grid](
        x,
        dy,
        x_sorted,
        dy_sorted,
        offsets,
        slots,
        gates,
        b2 if b2 is not None else x,
        dgate_bias,
        db2_parts,
        M,
        d,
        E,
        top_k,
        *x.stride(),
        *dy.stride(),
        x_sorted.stride(0),
        b2.stride(0) if b2 is not None else 0,
        dgate_bias.stride(0),
        db2_parts.stride(0),
        HAS_BIAS=b2 is not None,
        E_POW2=triton.next_power_of_2(E + 1),
        BLOCK_M=GATHER_BLOCK_M,
        # 32 elements of each of x and dy per thread: 64 x 256 at 4 warps spilled.
        BLOCK_D=min(128, triton.next_power_of_2(d)),
        num_warps=8,
    )


def launch_act_bwd(
    dy_sorted: torch.Tensor,
    w2: torch.Tensor,
    pre: torch.Tensor,
    dpre: torch.Tensor,
    gated_h: torch.Tensor,
    offsets: torch.Tensor,
    slots: torch.Tensor,
    gates: torch.Tensor,
    dgate_parts: torch.Tensor,
    db1_parts: torch.Tensor | None,
    activation: str,
) -> None:
    """Fills dpre, gated_h (both (M, f), sorted order), dgate_parts (T*k, >= f / BLOCK_N
    tiles, zero-initialised, slot order) and, when given, db1_parts (one row of column sums
    per ACT_BWD_BLOCK_M-row tile); dy_sorted is dy in expert order, w2 is (E, f, d)."""
    M, f = pre.shape
    E, _, d = w2.shape
    w2_t = w2.transpose(1, 2)
    _grouped_mm_act_bwd_kernel[_grid_rows(M, E, f)](
        dy_sorted,
        w2_t,
        pre,
        dpre,
        gated_h,
        offsets,
        slots,
        gates,
        dgate_parts,
        db1_parts if db1_parts is not None else dpre,
        M,
        f,
        d,
        E,
        dy_sorted.stride(0),
        dy_sorted.stride(1),
        w2_t.stride(0),
        w2_t.stride(1),
        w2_t.stride(2),
        pre.stride(0),
        dgate_parts.stride(0),
        db1_parts.stride(0) if db1_parts is not None else 0,
        BIAS_GRAD=db1_parts is not None,
        ACTIVATION=ACTIVATION_CODES[activation],
        DOT_DTYPE=dot_dtype(dy_sorted.dtype),
        DOT_PRECISION=dot_precision(),
        E_POW2=triton.next_power_of_2(E + 1),
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


@torch.library.custom_op("clasp::moe_mlp_fwd", mutates_args=())
def _moe_mlp_fwd(
    x: torch.Tensor,
    gates: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    offsets: torch.Tensor,
    sorted_slots: torch.Tensor,
    top_k: int,
    activation: str,
    save_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    T, d = x.shape
    M, f = sorted_slots.shape[0], w1.shape[2]
    gates = gates.reshape(-1)
    h = torch.empty(M, f, dtype=x.dtype, device=x.device)
    pre = new_output((M, f), x.dtype, x.device) if save_pre else _empty(x)
    launch_grouped_mm(
        x,
        w1,
        h,
        offsets,
        M,
        slots=sorted_slots,
        top_k=top_k,
        gather=True,
        bias=b1,
        activation=activation,
        pre=pre if save_pre else None,
    )
    y = new_output((T, d), x.dtype, x.device)
    # With one slot per token the slot is the token: the GEMM writes y itself.
    per_slot = y if top_k == 1 else torch.empty(M, d, dtype=x.dtype, device=x.device)
    launch_grouped_mm(
        h, w2, per_slot, offsets, M, slots=sorted_slots, scatter=True, bias=b2, gates=gates
    )
    if top_k > 1:
        launch_sum_slots(per_slot, y, top_k)
    return y, pre


@_moe_mlp_fwd.register_fake
def _(x, gates, w1, w2, b1, b2, offsets, sorted_slots, top_k, activation, save_pre):
    pre_shape = (sorted_slots.shape[0], w1.shape[2]) if save_pre else (0,)
    return torch.empty_like(x), x.new_empty(pre_shape)


@torch.library.custom_op("clasp::moe_mlp_bwd", mutates_args=())
def _moe_mlp_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    pre: torch.Tensor,
    gates: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    offsets: torch.Tensor,
    sorted_slots: torch.Tensor,
    top_k: int,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    M, f = pre.shape
    T, d = x.shape
    E = w1.shape[0]
    flat_gates = gates.reshape(-1)
    device = x.device
    # d(gate) partials: one column per column tile of the widest tiling of the activation
    # backward (the rest stay zero), and a last one for <dy, b2>.
    dgate_parts = torch.zeros(
        M, triton.cdiv(f, MIN_BLOCK_N) + 1, dtype=torch.float32, device=device
    )
    x_sorted = torch.empty(M, d, dtype=x.dtype, device=device)
    dy_sorted = torch.empty(M, d, dtype=dy.dtype, device=device)
    db2_parts = torch.empty(
        (triton.cdiv(M, GATHER_BLOCK_M) + E, d) if b2 is not None else (0, d),
        dtype=torch.float32,
        device=device,
    )
    launch_gather_rows(
        x, dy, x_sorted, dy_sorted, offsets, sorted_slots, flat_gates, top_k, b2,
        dgate_parts[:, -1], db2_parts,
    )  # fmt: skip

    dpre = torch.empty_like(pre)
    gated_h = torch.empty_like(pre)
    db1_parts = None
    if b1 is not None:
        db1_parts = torch.empty(
            triton.cdiv(M, ACT_BWD_BLOCK_M) + E, f, dtype=torch.float32, device=device
        )
    launch_act_bwd(
        dy_sorted, w2, pre, dpre, gated_h, offsets, sorted_slots, flat_gates,
        dgate_parts[:, :-1], db1_parts, activation,
    )  # fmt: skip
    dgates = new_output(gates.shape, torch.float32, device)
    torch.sum(dgate_parts, dim=1, out=dgates.view(-1))

    dw1 = new_output(w1.shape, w1.dtype, w1.device)
    launch_grouped_wgrad(x_sorted, dpre, dw1, offsets)
    dw2 = new_output(w2.shape, w2.dtype, w2.device)
    launch_grouped_wgrad(gated_h, dy_sorted, dw2, offsets)
    db1 = _empty(x)
    if b1 is not None:
        db1 = new_output(b1.shape, b1.dtype, device)
        launch_sum_tile_partials(db1_parts, db1, offsets, ACT_BWD_BLOCK_M)
    db2 = _empty(x)
    if b2 is not None:
        db2 = new_output(b2.shape, b2.dtype, device)
        launch_sum_tile_partials(db2_parts, db2, offsets, GATHER_BLOCK_M)

    dx = new_output(x.shape, x.dtype, x.device)
    per_slot = dx if top_k == 1 else torch.empty(M, x.shape[1], dtype=x.dtype, device=x.device)
    launch_grouped_mm(
        dpre, w1.transpose(1, 2), per_slot, offsets, M, slots=sorted_slots, scatter=True
    )
    if top_k > 1:
        launch_sum_slots(per_slot, dx, top_k)
    return dx, dgates, dw1, dw2, db1, db2


@_moe_mlp_bwd.register_fake
def _(dy, x, pre, gates, w1, w2, b1, b2, offsets, sorted_slots, top_k, activation):
    db1 = torch.empty_like(b1) if b1 is not None else x.new_empty(0)
    db2 = torch.empty_like(b2) if b2 is not None else x.new_empty(0)
    dgates = gates.new_empty(gates.shape, dtype=torch.float32)
    return torch.empty_like(x), dgates, torch.empty_like(w1), torch.empty_like(w2), db1, db2


class MoEMLP(torch.autograd.Function):
    """Saves x, the weights, the routing indices and the pre-activation (T*k, f); backward
    recomputes the activation from it (fused into its first GEMM) instead of keeping a second
    (T*k, f) tensor, and gets d(weights) from that GEMM's epilogue instead of keeping the
    per-slot expert outputs."""

    @staticmethod
    def forward(ctx, x, gates, w1, w2, b1, b2, offsets, sorted_slots, top_k, activation, save):
        y, pre = _moe_mlp_fwd(
            x, gates, w1, w2, b1, b2, offsets, sorted_slots, top_k, activation, save
        )
        ctx.save_for_backward(x, pre, gates, w1, w2, b1, b2, offsets, sorted_slots)
        ctx.top_k, ctx.activation = top_k, activation
        return y

    @staticmethod
    def backward(ctx, dy):
        x, pre, gates, w1, w2, b1, b2, offsets, sorted_slots = ctx.saved_tensors
        dx, dgates, dw1, dw2, db1, db2 = _moe_mlp_bwd(
            dy, x, pre, gates, w1, w2, b1, b2, offsets, sorted_slots, ctx.top_k, ctx.activation
        )
        return (
            dx,
            dgates,
            dw1,
            dw2,
            db1 if b1 is not None else None,
            db2 if b2 is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


def _check_moe_inputs(x, routing, w1, w2, b1, b2, activation) -> None:
    check_tensor("x", x, 2, FLOAT_DTYPES)
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a clasp.kernels.Routing, got {type(routing).__name__}")
    check_tensor("routing.expert_idx", routing.expert_idx, 2, INDEX_DTYPES)
    check_tensor("routing.weights", routing.weights, 2, FLOAT_DTYPES)
    check_tensor("routing.offsets", routing.offsets, 1, INDEX_DTYPES)
    check_tensor("routing.sorted_slots", routing.sorted_slots, 1, INDEX_DTYPES)
    check_tensor("w1", w1, 3, FLOAT_DTYPES)
    check_tensor("w2", w2, 3, FLOAT_DTYPES)
    check_same_device(
        x=x, weights=routing.weights, offsets=routing.offsets, w1=w1, w2=w2, b1=b1, b2=b2
    )
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    T, d = x.shape
    E, _, f = w1.shape
    if routing.expert_idx.shape[0] != T or routing.weights.shape != routing.expert_idx.shape:
        raise ValueError(
            f"routing is for {routing.expert_idx.shape[0]} tokens with weights of shape "
            f"{tuple(routing.weights.shape)}, but x has {T} tokens: route x itself"
        )
    if routing.sorted_slots.shape[0] != routing.expert_idx.numel():
        raise ValueError("routing.sorted_slots must list all T*k slots")
    if routing.offsets.shape[0] != E + 1:
        raise ValueError(f"routing has {routing.offsets.shape[0] - 1} experts, w1 has {E}")
    if w1.shape != (E, d, f) or w2.shape != (E, f, d):
        raise ValueError(
            f"w1 must be (E, d, f) and w2 (E, f, d) with d={d}, got {tuple(w1.shape)} and "
            f"{tuple(w2.shape)}"
        )
    for name, b, width in (("b1", b1, f), ("b2", b2, d)):
        if b is not None:
            check_tensor(name, b, 2, FLOAT_DTYPES)
            if b.shape != (E, width):
                raise ValueError(f"{name} must be ({E}, {width}), got {tuple(b.shape)}")


def moe_mlp(
    x: torch.Tensor,
    routing: Routing,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    activation: str = "gelu",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Mixture-of-experts MLP over routed tokens:
    y[t] = sum_j weights[t, j] * (act(x[t] @ w1[e] + b1[e]) @ w2[e] + b2[e]), e = expert_idx[t, j].

    Args:
        x: (T, d) fp32, bf16 or fp16 (fp64 runs the reference); any strides.
        routing: the `Routing` of x's T tokens (from `route`): expert_idx (T, k), weights
            (T, k), offsets (E+1,), sorted_slots (T*k,).
        w1: (E, d, f); w2: (E, f, d); b1: (E, f) or None; b2: (E, d) or None.
        activation: "gelu" (exact), "gelu_tanh" or "silu".
        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1; the reference for
            fp64), "triton" or "reference".
    Returns:
        (T, d) of x's dtype (the autocast dtype under autocast, which casts x, weights and
        biases, on either backend). Differentiable in x, routing.weights, w1, w2, b1 and b2;
        backward is deterministic. Saved for backward: x, weights, routing and the (T*k, f)
        pre-activation; the activation itself is recomputed. The kernels read the gate
        weights in fp32. fp32 inputs run on tf32 tensor cores on CUDA unless
        `torch.set_float32_matmul_precision("highest")`.
    """
    _check_moe_inputs(x, routing, w1, w2, b1, b2, activation)
    x, w1, w2, b1, b2 = autocast_inputs(x.device.type, x, w1, w2, b1, b2)
    params = [t for t in (w1, w2, b1, b2) if t is not None]
    if any(t.dtype != x.dtype for t in params):
        raise TypeError(
            f"w1, w2, b1 and b2 must have x's dtype {x.dtype}, got "
            f"{[t.dtype for t in params]}; cast them or run under torch.autocast"
        )
    T, k = routing.expert_idx.shape
    triton_path = use_triton("moe_mlp", backend, x=x, w1=w1, w2=w2, b1=b1, b2=b2)
    if not triton_path or 0 in (T, k, w1.shape[0], w1.shape[2]):
        with torch.autocast(x.device.type, enabled=False):
            return reference.moe_mlp(x, routing, w1, w2, b1, b2, activation)
    gates = routing.weights.float()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in [x, gates, *params])
    return MoEMLP.apply(
        x,
        gates,
        w1,
        w2,
        b1,
        b2,
        routing.offsets.to(torch.int32),
        routing.sorted_slots.to(torch.int32),
        k,
        activation,
        needs_grad,
    )
