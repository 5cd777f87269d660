import pytest
import torch
from clasp.kernels import BACKENDS, l2_normalize, reference

from tests.utils import DTYPE_IDS, as_reference_input, assert_close, randn, run_poisoned

DTYPES = [pytest.param(d, id=DTYPE_IDS[d]) for d in (torch.float32, torch.bfloat16, torch.float16)]
SHAPES = [
    pytest.param((1, 1), id="one-row-one-col"),
    pytest.param((3, 5, 7), id="odd-sizes"),
    pytest.param((130, 96), id="rows-not-multiple-of-block"),
    pytest.param((2, 4, 768), id="vit-b-width"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "strided"])
def test_l2_normalize_matches_reference(shape, dtype, non_contiguous, device):
    x = randn(
        *shape,
        dtype=dtype,
        device=device,
        scale=3.0,
        requires_grad=True,
        non_contiguous=non_contiguous,
    )
    x_ref = as_reference_input(x)
    y = run_poisoned(l2_normalize, x, backend="triton")
    y_ref = reference.l2_normalize(x_ref)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref, dtype)

    dy = torch.randn_like(y)
    (dx,) = run_poisoned(torch.autograd.grad, y, x, dy)
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, dy.double())
    assert_close(dx, dx_ref, dtype, scale=2.0)


def test_l2_normalize_zero_rows_are_clamped_like_reference(device):
    x = torch.zeros(4, 16, device=device, requires_grad=True)
    x_ref = as_reference_input(x)
    y = l2_normalize(x, backend="triton")
    (dx,) = torch.autograd.grad(y.sum(), x)
    y_ref = reference.l2_normalize(x_ref)
    (dx_ref,) = torch.autograd.grad(y_ref.sum(), x_ref)
    assert_close(y, y_ref)
    assert_close(dx, dx_ref, scale=1e3)  # gradient magnitude is 1/eps


def test_l2_normalize_gradcheck_fp64(device):
    x = torch.randn(5, 9, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: l2_normalize(t, backend="triton"), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_l2_normalize_takes_fp64_on_every_backend(backend, device):
    # Unlike the other kernels, these take fp64 (fp64 accumulation): "triton" runs them.
    x = randn(7, 33, dtype=torch.float64, device=device, requires_grad=True)
    x_ref = as_reference_input(x)
    y = run_poisoned(l2_normalize, x, backend=backend)
    y_ref = reference.l2_normalize(x_ref)
    assert y.dtype == torch.float64
    assert_close(y, y_ref)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, dy)
    assert_close(dx, dx_ref)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_l2_normalize_keeps_its_dtype_under_autocast(backend, device):
    x = randn(4, 40, dtype=torch.bfloat16, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = l2_normalize(x, backend=backend)
    assert y.dtype == torch.bfloat16
    assert_close(y, reference.l2_normalize(x.double()), torch.bfloat16)


def test_l2_normalize_cpu_auto_uses_reference_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(3, 4)
    torch.testing.assert_close(l2_normalize(x), torch.nn.functional.normalize(x, dim=-1))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        l2_normalize(x, backend="triton")


def test_l2_normalize_rejects_bad_input():
    with pytest.raises(TypeError, match="x must be one of"):
        l2_normalize(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend"):
        l2_normalize(torch.ones(3, 4), backend="cuda")


def test_l2_normalize_under_torch_compile_matches_eager(device):
    x = torch.randn(6, 40, device=device)
    compiled = torch.compile(
        lambda t: l2_normalize(t, backend="triton"), fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(compiled(x), l2_normalize(x, backend="triton"))
