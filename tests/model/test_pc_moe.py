"""The PC-MoE layer against an explicit per-token loop, prompt control of the routing, the
Triton path of the whole model against its reference path, gradient checkpointing and
torch.compile of the MoE block."""

import clasp.kernels
import pytest
import torch
import torch.nn.functional as F

from clasp.model import PCMoE, PCMoEBlock, build_backbone
from clasp.model.pc_moe import PromptModulation
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
    y, routing = layer(x, prompt)
    expected = dense_loop(layer, x, prompt)
    assert_close(y, expected)
    grad = torch.randn_like(y)
    params = [x, prompt, *layer.parameters()]
    got = torch.autograd.grad(y, params, grad)
    want = torch.autograd.grad(expected, params, grad)
    for name, g, w in zip(["x", "prompt", *dict(layer.named_parameters())], got, want, strict=True):
        assert_close(g, w, msg=name)
    assert routing.counts.sum() == 3 * 5 * top_k


def test_prompt_steers_each_samples_routing():
    d, E, P = 8, 4, 4
    layer = PCMoE(d, 8, E, 1, P, backend="reference")
    with torch.no_grad():
        layer.w_prompt.copy_(100 * torch.eye(P, E))  # prompt i adds 100 to expert i's logit
    experts = torch.tensor([2, 0, 3])
    _, routing = layer(torch.randn(3, 7, d), F.one_hot(experts, P).float())
    chosen = routing.expert_idx.view(3, 7)
    assert (chosen == experts[:, None]).all()


def test_pcmoe_errors_name_the_problem():
    layer = PCMoE(8, 8, 4, 2, 4, backend="reference")
    with pytest.raises(ValueError, match=r"prompt must be \(2, 4\)"):
        layer(torch.randn(2, 3, 8), torch.randn(3, 4))
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


def _run_backbone(model, images, weights):
    """Tokens, routing statistics and every parameter's gradient of one forward/backward."""
    model.zero_grad(set_to_none=True)
    tokens, routings = model.forward_tokens(images, weights)
    aux = sum(r.z_loss + (r.probs_mean * r.counts).sum() for r in routings)
    (tokens.square().mean() + aux).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return tokens.detach(), routings, grads


@pytest.mark.parametrize(
    "kernels, dtype",
    [pytest.param("reference", torch.float64, id="reference-fp64"),
     pytest.param("triton", torch.float32, id="triton-interpreter")],
)  # fmt: skip
def test_grad_checkpointing_gives_the_same_tokens_and_gradients(kernels, dtype):
    """Checkpointing re-runs every block, the PC-MoE ones with their prompt, in backward."""
    config = {**TINY, "kernels": kernels, "drop_path_rate": 0.2}
    plain = build_backbone(config, seed=0).to(dtype).train()
    recomputed = build_backbone({**config, "grad_checkpointing": True}, seed=0).to(dtype).train()
    recomputed.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 16, 16, dtype=dtype)
    weights = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0.5, 0, 0, 0.5]], dtype=dtype)
    with torch.random.fork_rng():  # the same drop-path draws in both runs
        want = _run_backbone(plain, images, weights)
    with torch.random.fork_rng():
        got = _run_backbone(recomputed, images, weights)
    assert_close(got[0], want[0])
    for r, g in zip(want[1], got[1], strict=True):
        assert torch.equal(r.expert_idx, g.expert_idx)
    assert got[2].keys() == want[2].keys() and len(want[2]) == len(list(plain.parameters()))
    for name, grad in want[2].items():
        assert_close(got[2][name], grad, msg=name)


def test_compiled_moe_block_matches_eager():
    backbone = build_backbone({**TINY, "kernels": "reference"}, seed=0)
    block = backbone.vit.blocks[0]
    assert isinstance(block, PCMoEBlock)
    x = torch.randn(2, 5, TINY["embed_dim"], requires_grad=True)
    prompt = torch.randn(2, TINY["embed_dim"])
    want, want_routing = block(x, prompt)
    (want_dx,) = torch.autograd.grad(want.square().sum(), x)
    compiled = torch.compile(block, backend="aot_eager")
    got, got_routing = compiled(x, prompt)
    (got_dx,) = torch.autograd.grad(got.square().sum(), x)
    assert_close(got, want)
    assert_close(got_dx, want_dx)
    assert torch.equal(got_routing.sorted_slots, want_routing.sorted_slots)


def test_prompt_modulation_starts_as_the_identity_and_conditions_each_sample():
    modulation = PromptModulation(4, 6)
    x, prompt = torch.randn(2, 3, 6), torch.randn(2, 4)
    assert torch.equal(modulation(x, prompt), x)
    with torch.no_grad():
        modulation.scale.weight.normal_()
        modulation.shift.weight.normal_()
    y = modulation(x, prompt)
    alone = modulation(x[1:], prompt[1:])
    assert_close(y[1:], alone)
    scale = 1 + prompt @ modulation.scale.weight.T + modulation.scale.bias
    shift = prompt @ modulation.shift.weight.T + modulation.shift.bias
    assert_close(y, x * scale[:, None] + shift[:, None])


def test_without_prompt_routing_the_router_ignores_the_prompt():
    layer = PCMoE(8, 8, 4, 2, 4, prompt_routing=False, backend="reference")
    assert layer.w_prompt is None
    x = torch.randn(2, 5, 8)
    _, a = layer(x, torch.randn(2, 4))
    _, b = layer(x, torch.randn(2, 4))
    assert torch.equal(a.expert_idx, b.expert_idx) and torch.equal(a.weights, b.weights)


def test_normalised_prompts_have_a_tokens_scale_whatever_the_embeddings_norm():
    backbone = build_backbone({**TINY, "kernels": "reference"}, seed=0)
    prompts = backbone.prompts
    weights = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0.3, 0.7, 0, 0]])
    before = prompts(weights)
    assert_close(before.norm(dim=1), torch.full((2,), TINY["embed_dim"] ** 0.5), scale=1e4)
    with torch.no_grad():
        prompts.embedding.mul_(100.0)
    assert_close(prompts(weights), before, scale=1e4)
