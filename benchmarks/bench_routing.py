import pytest
import torch
from clasp.kernels import reference, route
from harness import cases, machine_shapes

TOP_K = 2
# (B, N, d, E): ViT-B token grids on CUDA, a smaller batch on the CPU.
SHAPES = {
    "cuda": [(256, 129, 768, E) for E in (8, 16, 64)],
    "cpu": [(8, 129, 768, E) for E in (8, 16, 64)],
}


def minimum_bytes(B, N, d, E, element_size, mode) -> int:
    """What any implementation must read and write.

    Forward: x, w_gate and prompt_bias once; expert_idx, weights and sorted_slots (4 bytes
    per slot each) and the per-expert outputs. Backward adds one more read of x (dw_gate =
    x^T dlogits needs it after the upstream gradients exist), the write of dx, the weights'
    gradient and the small tensors; intermediates such as logits are not counted.
    """
    T = B * N
    params = (d * E + B * E) * element_size
    forward = T * d * element_size + params + 3 * T * TOP_K * 4 + (3 * E + 2) * 4
    if mode == "fwd":
        return forward
    return forward + 2 * T * d * element_size + params + 2 * T * TOP_K * 4 + (E + 1) * 4


@pytest.mark.parametrize("shape,mode,backend", cases(machine_shapes(SHAPES)))
def test_route(shape, mode, backend, device, measure):
    B, N, d, E = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    train = mode != "fwd"
    x = torch.randn(B, N, d, device=device, dtype=dtype, requires_grad=train)
    w_gate = (torch.randn(d, E, device=device) / d**0.5).to(dtype).requires_grad_(train)
    prompt_bias = torch.randn(B, E, device=device, dtype=dtype, requires_grad=train)
    fn = {
        "triton": lambda *a: route(*a, backend="triton"),
        "eager": reference.route,
        "compile": torch.compile(reference.route),
    }[backend]
    inputs = (x, w_gate, prompt_bias)
    if mode == "fwd":
        run = lambda: fn(*inputs, TOP_K)
    else:
        T = B * N
        upstream = (
            torch.randn(T, TOP_K, device=device),
            torch.randn(E, device=device),
            torch.randn((), device=device),
        )

        def run():
            routing = fn(*inputs, TOP_K)
            outputs = (routing.weights, routing.probs_mean, routing.z_loss)
            return torch.autograd.grad(outputs, inputs, upstream)

    measure(
        run,
        op="route",
        mode=mode,
        backend=backend,
        shape=dict(B=B, N=N, d=d, E=E, k=TOP_K),
        dtype=dtype,
        bytes=minimum_bytes(B, N, d, E, x.element_size(), mode),
    )
