"""The PC-MoE layer against an explicit per-token loop, prompt control of the routing, and the
Triton path of the whole model against its reference path."""

import clasp.kernels
import pytest
import torch
import torch.nn.functional as F

from clasp.model import PCMoE, build_backbone
from tests.utils import assert_close


def dense_loop(layer: PCMoE, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """y[b, n] = sum over the top-k experts of gate * expert(x[b, n]), one token at a time."""
    B, N, d = x.shape
    logits = x @ layer.w_gate + (prompt @ layer.w_prompt)[:, None, :]
    probs = logits.softmax(-1)
    out = torch.zeros_like(x)
    for b in range(B):
        for n in range(N):
            p = probs[b, n]
            # Highest probabilities first; equal ones by lower index.
            chosen = sorted(range(layer.num_experts), key=lambda e: (-p[e].item(), e))
            chosen = chosen[: layer.top_k]
            gates = p[chosen] / p[chosen].sum() if layer.normalize else p[chosen]
            for gate, e in zip(gates, chosen, strict=True):
                h = F.gelu(x[b, n] @ layer.w1[e] + layer.b1[e])
                out[b, n] = out[b, n] + gate * (h @ layer.w2[e] + layer.b2[e])
    return out


@pytest.mark.parametrize(
    "top_k, normalize",
    [pytest.param(1, True, id="top1"), pytest.param(2, True, id="top2"),
     pytest.param(2, False, id="top2-unnormalised"), pytest.param(4, True, id="all-experts")],
)  # fmt: skip
def test_pcmoe_matches_a_per_token_loop(top_k, normalize):
    d, E, P = 8, 4, 6
    layer = PCMoE(d, 12, E, top_k, P, normalize=normalize, backend="reference").double()
    with torch.no_grad():
        for p in (layer.b1, layer.b2):
            p.normal_()
    x = torch.randn(3, 5, d, dtype=torch.float64, requires_grad=True)
    prompt = torch.randn(3, P, dtype=torch.float64, requires_grad=True)
    layer.set_prompt(prompt)
    y = layer(x)
    expected = dense_loop(layer, x, prompt)
    assert_close(y, expected)
    grad = torch.randn_like(y)
    params = [x, prompt, *layer.parameters()]
    got = torch.autograd.grad(y, params, grad)
    want = torch.autograd.grad(expected, params, grad)
    for name, g, w in zip(["x", "prompt", *dict(layer.named_parameters())], got, want, strict=True):
        assert_close(g, w, msg=name)
    assert layer.last_routing.counts.sum() == 3 * 5 * top_k


def test_prompt_steers_each_samples_routing():
    d, E, P = 8, 4, 4
    layer = PCMoE(d, 8, E, 1, P, backend="reference")
    with torch.no_grad():
        layer.w_prompt.copy_(100 * torch.eye(P, E))  # prompt i adds 100 to expert i's logit
    experts = torch.tensor([2, 0, 3])
    layer.set_prompt(F.one_hot(experts, P).float())
    layer(torch.randn(3, 7, d))
    chosen = layer.last_routing.expert_idx.view(3, 7)
    assert (chosen == experts[:, None]).all()


def test_pcmoe_errors_name_the_problem():
    layer = PCMoE(8, 8, 4, 2, 4, backend="reference")
    with pytest.raises(RuntimeError, match="set_prompt"):
        layer(torch.randn(2, 3, 8))
    layer.set_prompt(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"prompt must be \(2, 4\)"):
        layer(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="top_k"):
        PCMoE(8, 8, 4, 5, 4)
    with pytest.raises(ValueError, match="kernel backend"):
        PCMoE(8, 8, 4, 2, 4, backend="cuda")


TINY = {
    "img_size": [16, 16],
    "patch_size": 8,
    "embed_dim": 16,
    "depth": 2,
    "num_heads": 2,
    "moe": {"blocks": [0, 1], "num_experts": 4, "top_k": 2, "mlp_ratio": 2.0},
}


def test_triton_path_matches_reference_path():
    """The model with the Triton route + moe_mlp (interpreter on CPU) against the same model
    on the eager references: features and every parameter's gradient."""
    missing = [op for op in ("route", "moe_mlp") if not hasattr(clasp.kernels, op)]
    assert not missing, f"clasp.kernels does not export {missing}"
    reference = build_backbone({**TINY, "kernels": "reference"})
    triton = build_backbone({**TINY, "kernels": "triton"})
    triton.load_state_dict(reference.state_dict())
    images = torch.randn(2, 3, 16, 16)
    weights = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0.5, 0, 0, 0.5]])
    outs = []
    for model in (reference, triton):
        tokens, routings = model.forward_tokens(images, weights)
        aux = sum(r.z_loss + (r.probs_mean * r.counts).sum() for r in routings)
        (tokens.square().mean() + aux).backward()
        outs.append((tokens, routings, {n: p.grad for n, p in model.named_parameters()}))
    (ref_tokens, ref_routing, ref_grads), (tri_tokens, tri_routing, tri_grads) = outs
    for r, t in zip(ref_routing, tri_routing, strict=True):
        assert torch.equal(r.expert_idx.int(), t.expert_idx.int())
        assert torch.equal(r.counts.int(), t.counts.int())
    assert_close(tri_tokens, ref_tokens, scale=10)
    for name, grad in ref_grads.items():
        assert_close(tri_grads[name], grad, scale=10, msg=name)
