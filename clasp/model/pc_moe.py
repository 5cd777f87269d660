"""The Prompt-Controlled Mixture-of-Experts layer, and the ViT block that holds it.

Tokens are routed to `top_k` of `num_experts` expert MLPs by `x @ w_gate + prompt @ w_prompt`:
the task prompt of a token's sample shifts every router logit of that sample, so one prompt
can steer a whole image towards the experts its task needs. Capacity-free: every token is
processed by all its chosen experts, however unbalanced the routing; the load-balance loss
(from the returned routing statistics) is what keeps experts in use.

Routing alone steers little while the experts still compute nearly the same function, so the
backbone can also modulate its tokens by the prompt (`PromptModulation`, SOLIDER's semantic
controller in ViT form) before chosen blocks. Both paths see the prompt at the scale of a
LayerNormed token (`TaskPrompts` normalises it).

The prompt is an argument and the routing a return value, `y, routing = moe(x, prompt)`, as
ScatterMoE's MLP takes its expert indices and torchtitan's router returns its counts: the
layer holds no per-call state, so gradient checkpointing can re-run it in backward and
`torch.compile` sees a pure function.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from clasp.kernels import BACKENDS, Routing, moe_mlp, route


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    return backend


class PCMoE(nn.Module):
    """In place of timm's `Mlp`: `forward(x (B, N, d), prompt (B, prompt_dim))` ->
    `(y (B, N, d), Routing)`; the routing carries counts, probs_mean and z_loss for the
    auxiliary losses. `backend` picks the kernels of `clasp.kernels.route` and `moe_mlp`."""

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
        prompt_routing: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.dim, self.hidden_dim = dim, hidden_dim
        self.num_experts, self.top_k = num_experts, top_k
        self.activation, self.normalize = activation, normalize
        self.backend = check_backend(backend)
        self.w_gate = nn.Parameter(torch.empty(dim, num_experts))
        self.prompt_dim = prompt_dim
        # Without prompt routing (an ablation), the router sees the tokens alone.
        self.w_prompt = (
            nn.Parameter(torch.empty(prompt_dim, num_experts)) if prompt_routing else None
        )
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Experts start like timm's Mlp (trunc-normal 0.02, zero bias); a small router keeps
        # the initial routing close to uniform so every expert receives tokens early on.
        for w in (self.w1, self.w2):
            nn.init.trunc_normal_(w, std=0.02)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)
        nn.init.normal_(self.w_gate, std=1.0 / math.sqrt(self.dim))
        if self.w_prompt is not None:
            nn.init.normal_(self.w_prompt, std=1.0 / math.sqrt(self.prompt_dim))

    def forward(self, x: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        B, N, d = x.shape
        if prompt.shape != (B, self.prompt_dim):
            raise ValueError(
                f"prompt must be ({B}, {self.prompt_dim}) for x {tuple(x.shape)}, "
                f"got {tuple(prompt.shape)}"
            )
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # One low-precision copy of the tokens feeds both ops; the router still computes
            # its logits and softmax in fp32 from them and from fp32 gate weights.
            x = x.to(torch.get_autocast_dtype(device))
        router_dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device, enabled=False):
            if self.w_prompt is None:
                prompt_bias = x.new_zeros(B, self.num_experts, dtype=router_dtype)
            else:
                prompt_bias = prompt.to(router_dtype) @ self.w_prompt.to(router_dtype)
        routing = route(
            x,
            self.w_gate.to(router_dtype),
            prompt_bias,
            self.top_k,
            normalize=self.normalize,
            backend=self.backend,
        )
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
        return y.reshape(B, N, d), routing

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, experts={self.num_experts}, "
            f"top_k={self.top_k}, activation={self.activation}, backend={self.backend}, "
            f"prompt_routing={self.w_prompt is not None}"
        )


class PromptModulation(nn.Module):
    """x (B, N, d) * (1 + scale(prompt)) + shift(prompt), prompt (B, prompt_dim): a per-sample,
    per-channel affine map of the tokens, zero-initialised so that training starts from the
    unconditioned backbone."""

    def __init__(self, prompt_dim: int, dim: int):
        super().__init__()
        self.scale = nn.Linear(prompt_dim, dim)
        self.shift = nn.Linear(prompt_dim, dim)
        for layer in (self.scale, self.shift):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        prompt = prompt.to(x.dtype)
        return x * (1 + self.scale(prompt)[:, None]) + self.shift(prompt)[:, None]


class PCMoEBlock(nn.Module):
    """A timm ViT `Block` whose MLP is a `PCMoE`: `forward(x, prompt) -> (x, Routing)`.

    It takes over the block's own submodules under their timm names (norm1, attn, ls1,
    drop_path1, norm2, ls2, drop_path2, and mlp for the MoE), so the dense weights keep their
    state-dict keys and load into a plain timm ViT.
    """

    def __init__(self, block: Block, moe: PCMoE):
        super().__init__()
        self.norm1, self.attn, self.ls1, self.drop_path1 = (
            block.norm1, block.attn, block.ls1, block.drop_path1
        )  # fmt: skip
        self.norm2, self.mlp = block.norm2, moe
        self.ls2, self.drop_path2 = block.ls2, block.drop_path2

    def forward(self, x: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        y, routing = self.mlp(self.norm2(x), prompt)
        return x + self.drop_path2(self.ls2(y)), routing
