import pytest
import torch
import torch.nn.functional as F
from clasp.kernels import moe_mlp, reference
from harness import cases, machine_shapes

# (T, d, f, E, k): ViT-B tokens of a 256-image batch at 256x128 (128 patches + cls), and an
# LLM-like layer with many small experts; on the CPU, one small shape.
SHAPES = {
    "cuda": [
        pytest.param((256 * 129, 768, 3072, 8, 2), id="vitb-E8"),
        pytest.param((256 * 129, 768, 3072, 16, 2), id="vitb-E16"),
        pytest.param((4096, 2048, 768, 64, 8), id="llm-E64-k8"),
    ],
    "cpu": [pytest.param((1024, 128, 256, 8, 2), id="small-E8")],
}
BACKENDS = ("triton", "eager", "compile", "grouped_mm")


def grouped_mm_moe_mlp(x, routing, w1, w2, b1=None, b2=None, activation="gelu"):
    """The MoE MLP on torch's grouped GEMM: an explicit gather of token rows, per-expert
    GEMMs over the sorted rows, then gate and scatter-add back to tokens."""
    k = routing.expert_idx.shape[1]
    tokens = routing.sorted_slots.long() // k
    ends = routing.offsets[1:]
    rows = x[tokens]
    h = F.grouped_mm(rows, w1, offs=ends)
    if b1 is not None:
        h = h + b1.repeat_interleave(routing.counts.long(), dim=0, output_size=h.shape[0])
    h = reference.activation_fn(activation)(h)
    y = F.grouped_mm(h, w2, offs=ends)
    if b2 is not None:
        y = y + b2.repeat_interleave(routing.counts.long(), dim=0, output_size=y.shape[0])
    gates = routing.weights.reshape(-1)[routing.sorted_slots.long()].to(x.dtype)
    return x.new_zeros(x.shape).index_add(0, tokens, y * gates[:, None])


def grouped_mm_unsupported(device, dtype) -> str | None:
    """Why torch's grouped GEMM cannot run here, or None when it can."""
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    try:
        a = torch.randn(32, 16, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(2, 16, 16, device=device, dtype=dtype)
        out = F.grouped_mm(a, w, offs=torch.tensor([16, 32], device=device, dtype=torch.int32))
        torch.autograd.grad(out, a, torch.randn_like(out))
    except (RuntimeError, NotImplementedError) as error:
        return f"torch.nn.functional.grouped_mm fails on {device} {dtype}: {error}"
    return None


@pytest.mark.parametrize("shape,mode,backend", cases(machine_shapes(SHAPES), backends=BACKENDS))
def test_moe_mlp(shape, mode, backend, device, measure):
    T, d, f, E, k = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if backend == "grouped_mm" and (reason := grouped_mm_unsupported(device, dtype)):
        pytest.skip(reason)
    train = mode != "fwd"
    x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=train)
    router_input = torch.randn(1, T, 64, device=device)
    routing = reference.route(
        router_input, torch.randn(64, E, device=device), torch.zeros(1, E, device=device), k
    )
    routing = routing._replace(weights=routing.weights.detach().requires_grad_(train))
    params = [
        (torch.randn(E, d, f, device=device) * d**-0.5).to(dtype),
        (torch.randn(E, f, d, device=device) * f**-0.5).to(dtype),
        torch.zeros(E, f, device=device, dtype=dtype),
        torch.zeros(E, d, device=device, dtype=dtype),
    ]
    params = [p.requires_grad_(train) for p in params]
    fn = {
        "triton": lambda *a: moe_mlp(*a, backend="triton"),
        "eager": reference.moe_mlp,
        # The reference loops over experts with host-side bounds: compile it without
        # shape specialisation so changing counts do not recompile.
        "compile": torch.compile(reference.moe_mlp, dynamic=True),
        "grouped_mm": grouped_mm_moe_mlp,
    }[backend]
    if mode == "fwd":
        run = lambda: fn(x, routing, *params)
    else:
        dy = torch.randn(T, d, device=device, dtype=dtype)
        inputs = [x, routing.weights, *params]
        run = lambda: torch.autograd.grad(fn(x, routing, *params), inputs, dy)
    forward_flops = 2 * T * k * d * f * 2
    measure(
        run,
        op="moe_mlp",
        mode=mode,
        backend=backend,
        shape=dict(T=T, d=d, f=f, E=E, k=k),
        dtype=dtype,
        flops=forward_flops if mode == "fwd" else 3 * forward_flops,
    )
