"""Eager PyTorch references for every op in `clasp.kernels`.

Each function has the same signature and semantics as its Triton op; autograd through these
is the ground truth for gradients. They compute at the precision of their inputs (router
logits and softmax at least fp32), so tests call them on fp64 copies of the inputs, and the
public ops run them for fp64 inputs. `routing_metadata` is the one place that groups slots by
expert: `route` returns it, and the grouped-GEMM backward groups rows by token with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .types import PatchLabels, Routing

ACTIVATIONS = ("gelu", "gelu_tanh", "silu")


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """x / max(||x||_2, eps) over the last dimension, like `F.normalize(x, dim=-1)`."""
    return F.normalize(x, dim=-1, eps=eps)


def routing_metadata(
    expert_idx: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A stable counting sort of the flattened indices: the slots of each expert, in order.

    expert_idx: (T, k) (or any shape) integer indices in [0, num_experts) ->
    counts (E,), offsets (E+1,) (exclusive cumulative sum of counts, offsets[0] = 0) and
    sorted_slots (T*k,) (flat positions grouped by index, ascending within one), all int64.
    """
    flat = expert_idx.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    sorted_slots = torch.sort(flat, stable=True).indices
    return counts, offsets, sorted_slots


def router_logits(x: torch.Tensor, w_gate: torch.Tensor, prompt_bias: torch.Tensor) -> torch.Tensor:
    """(B*N, E) logits in at least fp32: x @ w_gate + prompt_bias of each token's sample."""
    B, N, d = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    logits = x.reshape(B * N, d).to(dtype) @ w_gate.to(dtype)
    return logits + prompt_bias.to(dtype).repeat_interleave(N, dim=0)


def route(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    prompt_bias: torch.Tensor,
    top_k: int,
    *,
    normalize: bool = True,
) -> Routing:
    """Prompt-conditioned top-k routing.

    x: (B, N, d), w_gate: (d, E), prompt_bias: (B, E). Ties go to the lower expert index.
    A token whose logits are not all finite takes experts 0..top_k-1 with NaN weights, and
    its probabilities and logsumexp are NaN (so are probs_mean and z_loss), as in `route`.
    """
    logits = router_logits(x, w_gate, prompt_bias)
    T, E = logits.shape
    non_finite = ~torch.isfinite(logits.detach()).all(-1, keepdim=True)
    # Added, not selected with torch.where: the NaN must reach the gradients too.
    logits = logits + torch.where(non_finite, float("nan"), 0.0).to(logits.dtype)
    probs = torch.softmax(logits, dim=-1)
    # A stable descending sort puts the lower index first among equal probabilities; the
    # sort key of a non-finite token is -index, which puts experts 0, 1, ... first.
    lowest_first = -torch.arange(E, dtype=probs.dtype, device=probs.device).expand(T, E)
    key = torch.where(non_finite, lowest_first, probs.detach())
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :top_k]
    top_probs = probs.gather(1, order)
    weights = top_probs / top_probs.sum(-1, keepdim=True) if normalize else top_probs
    counts, offsets, sorted_slots = routing_metadata(order, E)
    z_loss = torch.logsumexp(logits, dim=-1).square().mean()
    return Routing(
        expert_idx=order.to(torch.int32),
        weights=weights.to(torch.promote_types(weights.dtype, torch.float32)),
        counts=counts.to(torch.int32),
        offsets=offsets.to(torch.int32),
        sorted_slots=sorted_slots.to(torch.int32),
        probs_mean=probs.mean(0),
        z_loss=z_loss,
    )


def activation_fn(name: str):
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda h: F.gelu(h, approximate="tanh")
    if name == "silu":
        return F.silu
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def grouped_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    gather_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows offsets[e]:offsets[e+1] of x (or of x[gather_idx]) times w[e].

    x: (T, d), w: (E, d, f), offsets: (E+1,), gather_idx: (M,) -> out (M, f), M = offsets[-1].
    """
    rows = x if gather_idx is None else x[gather_idx.long()]
    out = rows.new_zeros(rows.shape[0], w.shape[2])
    bounds = offsets.tolist()
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = rows[lo:hi] @ w[e]
    return out


def moe_mlp(
    x: torch.Tensor,
    routing: Routing,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    activation: str = "gelu",
) -> torch.Tensor:
    """y[t] = sum_j weights[t, j] * expert_{e}(x[t]), e = expert_idx[t, j].

    x: (T, d), w1: (E, d, f), w2: (E, f, d), b1: (E, f), b2: (E, d) -> y (T, d) in x.dtype.
    """
    act = activation_fn(activation)
    T, k = routing.expert_idx.shape
    slots = routing.sorted_slots.long()
    tokens = slots // k
    gates = routing.weights.reshape(-1)[slots].to(x.dtype)
    h = grouped_matmul(x, w1, routing.offsets, tokens)
    if b1 is not None:
        h = h + b1.repeat_interleave(routing.counts.long(), dim=0, output_size=h.shape[0])
    h = act(h)
    y = grouped_matmul(h, w2, routing.offsets)
    if b2 is not None:
        y = y + b2.repeat_interleave(routing.counts.long(), dim=0, output_size=y.shape[0])
    out = x.new_zeros(T, w2.shape[2])
    return out.index_add(0, tokens, y * gates[:, None])


def patch_text_labels(
    patches: torch.Tensor,
    text: torch.Tensor,
    temperature: float,
    *,
    threshold: float | None = None,
    return_probs: bool = False,
) -> PatchLabels:
    """Label each patch with its nearest text prompt.

    patches: (B, N, D), text: (C, D). probs = softmax(cos(patch, text) / temperature) over C.
    A patch whose probabilities are not all finite (a NaN or infinite feature, or any
    non-finite text row, which reaches every patch) gets label -1 and confidence NaN, and
    its probabilities are all NaN, with or without a threshold.
    """
    dtype = torch.promote_types(patches.dtype, torch.float32)
    p = F.normalize(patches.to(dtype), dim=-1)
    t = F.normalize(text.to(dtype), dim=-1)
    probs = torch.softmax((p @ t.T) / temperature, dim=-1)
    non_finite = ~torch.isfinite(probs).all(-1)
    probs = torch.where(non_finite[..., None], float("nan"), probs)
    confidence, labels = probs.max(dim=-1)
    if threshold is not None:
        labels = torch.where(confidence < threshold, -1, labels)
    labels = torch.where(non_finite, -1, labels)
    return PatchLabels(labels, confidence.float(), probs.float() if return_probs else None)
