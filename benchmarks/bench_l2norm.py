import pytest
import torch
from clasp.kernels import l2_normalize, reference
from harness import cases, machine_shapes

SHAPES = {"cuda": [(256, 196, 768), (256, 196, 512)], "cpu": [(16, 196, 768)]}


@pytest.mark.parametrize("shape,mode,backend", cases(machine_shapes(SHAPES)))
def test_l2_normalize(shape, mode, backend, device, measure):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=mode != "fwd")
    fn = {
        "triton": lambda t: l2_normalize(t, backend="triton"),
        "eager": reference.l2_normalize,
        "compile": torch.compile(reference.l2_normalize),
    }[backend]
    dy = torch.randn_like(x)
    element_bytes = x.numel() * x.element_size()
    if mode == "fwd":
        run, moved = (lambda: fn(x)), 2 * element_bytes
    else:
        run, moved = (lambda: torch.autograd.grad(fn(x), x, dy)), 5 * element_bytes
    measure(
        run,
        op="l2_normalize",
        mode=mode,
        backend=backend,
        shape=dict(zip("BND", shape, strict=True)),
        dtype=dtype,
        bytes=moved,
    )
