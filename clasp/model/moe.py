"""The Prompt-Controlled Mixture-of-Experts layer that replaces a ViT block's MLP.

Tokens are routed to `top_k` of `num_experts` expert MLPs by `x @ w_gate + prompt @ w_prompt`:
the task prompt of a token's sample shifts every router logit of that sample, so one prompt
can steer a whole image towards the experts its task needs. Capacity-free: every token is
processed by all its chosen experts, however unbalanced the routing; the load-balance loss
(from the routing statistics kept in `last_routing`) is what keeps experts in use.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

import clasp.kernels
from clasp.kernels import reference

BACKENDS = ("auto", "triton", "reference")


def kernel_ops(backend: str):
    """(route, moe_mlp) for `backend`: the one place the model picks its kernels.

    "auto" and "triton" call `clasp.kernels.route` / `moe_mlp` (Triton on CUDA or under
    TRITON_INTERPRET=1, which dispatch themselves); "reference" calls the eager references
    directly, which also accept fp64 (for exact tests).
    """
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return _reference_route, _reference_moe_mlp
    return clasp.kernels.route, clasp.kernels.moe_mlp


def _reference_route(x, w_gate, prompt_bias, top_k, *, normalize=True, backend="reference"):
    return reference.route(x, w_gate, prompt_bias, top_k, normalize=normalize)


def _reference_moe_mlp(x, routing, w1, w2, b1, b2, activation, *, backend="reference"):
    # Same dtype rule as the Triton op: under autocast everything runs in the autocast dtype.
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w1, w2, b1, b2 = (t.to(dtype) if t is not None else None for t in (x, w1, w2, b1, b2))
    with torch.autocast(x.device.type, enabled=False):
        return reference.moe_mlp(x, routing, w1, w2, b1, b2, activation)


class PCMoE(nn.Module):
    """A drop-in for timm's `Mlp`: `forward(x)` with x (B, N, d) -> (B, N, d).

    The per-sample prompt (B, prompt_dim) must be set with `set_prompt` before each forward
    (the backbone does this for every MoE block), because timm blocks call `mlp(x)` with x only.
    After a forward, `last_routing` holds the `Routing` (counts, probs_mean, z_loss) for the
    auxiliary losses.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int,
        prompt_dim: int,
        *,
        activation: str = "gelu",
        normalize: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.dim, self.hidden_dim = dim, hidden_dim
        self.num_experts, self.top_k = num_experts, top_k
        self.activation, self.normalize = activation, normalize
        self.backend = backend
        kernel_ops(backend)  # fail at construction on a bad backend
        self.w_gate = nn.Parameter(torch.empty(dim, num_experts))
        self.w_prompt = nn.Parameter(torch.empty(prompt_dim, num_experts))
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.prompt: torch.Tensor | None = None
        self.last_routing: reference.Routing | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Experts start like timm's Mlp (trunc-normal 0.02, zero bias); a small router keeps
        # the initial routing close to uniform so every expert receives tokens early on.
        for w in (self.w1, self.w2):
            nn.init.trunc_normal_(w, std=0.02)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)
        nn.init.normal_(self.w_gate, std=1.0 / math.sqrt(self.dim))
        nn.init.normal_(self.w_prompt, std=1.0 / math.sqrt(self.w_prompt.shape[0]))

    def set_prompt(self, prompt: torch.Tensor | None) -> None:
        """prompt: (B, prompt_dim) per-sample task prompt for the next forward (None clears it)."""
        self.prompt = prompt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prompt is None:
            raise RuntimeError(
                "PCMoE needs a task prompt: call set_prompt((B, prompt_dim)) before forward "
                "(ClaspViT does this for every MoE block)"
            )
        B, N, d = x.shape
        if self.prompt.shape != (B, self.w_prompt.shape[0]):
            raise ValueError(
                f"prompt must be ({B}, {self.w_prompt.shape[0]}) for x {tuple(x.shape)}, "
                f"got {tuple(self.prompt.shape)}"
            )
        route, moe_mlp = kernel_ops(self.backend)
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # One low-precision copy of the tokens feeds both ops; the router still computes
            # its logits and softmax in fp32 from them and from fp32 gate weights.
            x = x.to(torch.get_autocast_dtype(device))
        router_dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device, enabled=False):
            prompt_bias = self.prompt.to(router_dtype) @ self.w_prompt.to(router_dtype)
            routing = route(
                x,
                self.w_gate.to(router_dtype),
                prompt_bias,
                self.top_k,
                normalize=self.normalize,
                backend=self.backend,
            )
        self.last_routing = routing
        y = moe_mlp(
            x.reshape(B * N, d),
            routing,
            self.w1,
            self.w2,
            self.b1,
            self.b2,
            self.activation,
            backend=self.backend,
        )
        return y.reshape(B, N, d)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, experts={self.num_experts}, "
            f"top_k={self.top_k}, activation={self.activation}, backend={self.backend}"
        )
