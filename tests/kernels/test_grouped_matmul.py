import pytest
import torch
from clasp.kernels import grouped_matmul, reference

from tests.utils import (
    DTYPE_IDS,
    as_reference_input,
    assert_close_normalised,
    forbid_triton_path,
    randn,
    run_poisoned,
)

FP64, BF16 = torch.float64, torch.bfloat16
DTYPES = [pytest.param(d, id=DTYPE_IDS[d]) for d in (torch.float32, torch.bfloat16, torch.float16)]


def segment_offsets(counts: list[int], device) -> torch.Tensor:
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(torch.tensor(counts), 0)
    return offsets.to(device)


# (rows T, d, f, counts per expert, gather rows M or None)
CASES = [
    pytest.param(8, 32, 48, [8], None, id="E1-one-segment"),
    pytest.param(40, 80, 96, [11, 0, 29], None, id="E3-empty-expert-odd-sizes"),
    pytest.param(50, 64, 72, [3, 9, 0, 14, 1, 0, 20, 3], None, id="E8-tail-rows-zero"),
    pytest.param(10, 48, 40, [7, 0, 16], 23, id="E3-gather-repeats"),
    pytest.param(30, 96, 64, [0, 2, 5, 0, 9, 4, 0, 12], 32, id="E8-gather"),
    pytest.param(1, 32, 40, [0, 1, 0], 1, id="T1-gather"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,d,f,counts,M", CASES)
def test_grouped_matmul_matches_reference(T, d, f, counts, M, dtype, device):
    E = len(counts)
    x = randn(T, d, dtype=dtype, device=device, requires_grad=True, non_contiguous=T > 20)
    w = randn(E, d, f, dtype=dtype, device=device, scale=d**-0.5, requires_grad=True)
    offsets = segment_offsets(counts, device)
    gather_idx = None if M is None else torch.randint(0, T, (M,), device=device)
    out = run_poisoned(grouped_matmul, x, w, offsets, gather_idx, backend="triton")

    x_ref, w_ref = as_reference_input(x), as_reference_input(w)
    out_ref = reference.grouped_matmul(x_ref, w_ref, offsets, gather_idx)
    assert out.dtype == dtype and out.shape == out_ref.shape
    assert_close_normalised(out, out_ref, dtype)
    if sum(counts) < out.shape[0]:
        assert out[sum(counts) :].eq(0).all(), "rows past offsets[E] must be zero"

    dout = torch.randn_like(out)
    dx, dw = run_poisoned(torch.autograd.grad, out, (x, w), dout)
    dx_ref, dw_ref = torch.autograd.grad(out_ref, (x_ref, w_ref), dout.double())
    assert_close_normalised(dx, dx_ref, dtype, msg="dx")
    assert_close_normalised(dw, dw_ref, dtype, msg="dw")
    for e in range(E):
        if counts[e] == 0:
            assert dw[e].eq(0).all(), f"expert {e} has no rows: its gradient must be zero"


def test_grouped_matmul_gradient_of_repeated_rows_is_deterministic(device):
    x = torch.randn(6, 64, device=device, requires_grad=True)
    w = torch.randn(2, 64, 64, device=device)
    offsets = segment_offsets([20, 12], device)
    gather_idx = torch.randint(0, 6, (32,), device=device)
    out = grouped_matmul(x, w, offsets, gather_idx, backend="triton")
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, x, dout, retain_graph=True)[0]
    second = torch.autograd.grad(out, x, dout)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_grouped_matmul_fp64_runs_the_reference(backend, monkeypatch, device):
    forbid_triton_path(monkeypatch, "grouped_matmul", "GroupedMatmul")
    x = randn(10, 16, dtype=FP64, device=device, requires_grad=True, non_contiguous=True)
    w = randn(3, 16, 8, dtype=FP64, device=device, requires_grad=True)
    offsets = segment_offsets([4, 0, 9], device)
    gather_idx = torch.randint(0, 10, (13,), device=device)
    out = grouped_matmul(x, w, offsets, gather_idx, backend=backend)
    x_ref, w_ref = as_reference_input(x), as_reference_input(w)
    expected = reference.grouped_matmul(x_ref, w_ref, offsets, gather_idx)
    assert out.dtype == FP64 and torch.equal(out, expected)
    dout = torch.randn_like(out)
    for g, g_ref in zip(
        torch.autograd.grad(out, (x, w), dout),
        torch.autograd.grad(expected, (x_ref, w_ref), dout),
        strict=True,
    ):
        assert torch.equal(g, g_ref)


def test_grouped_matmul_triton_rejects_fp64():
    x, w = torch.randn(5, 8, dtype=FP64), torch.randn(2, 8, 3, dtype=FP64)
    with pytest.raises(
        TypeError,
        match=r"grouped_matmul with backend='triton' takes float32, bfloat16 or float16 "
        r"inputs, got x float64, w float64: .*backend='reference'",
    ):
        grouped_matmul(x, w, torch.tensor([0, 2, 5]), backend="triton")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_grouped_matmul_under_autocast_runs_in_autocast_dtype(backend, device):
    x = randn(20, 32, device=device, requires_grad=True)
    w = randn(2, 32, 24, device=device, scale=32**-0.5, requires_grad=True)
    offsets = segment_offsets([12, 8], device)
    with torch.autocast(device.type, dtype=BF16):
        out = grouped_matmul(x, w, offsets, backend=backend)
    assert out.dtype == BF16
    cast = [t.detach().to(BF16).double() for t in (x, w)]
    assert_close_normalised(out, reference.grouped_matmul(*cast, offsets), BF16)
    (dw,) = torch.autograd.grad(out.float().sum(), w)
    assert dw.dtype == torch.float32 and torch.isfinite(dw).all()


def test_grouped_matmul_cpu_auto_uses_reference_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w = torch.randn(5, 8), torch.randn(2, 8, 3)
    offsets = torch.tensor([0, 2, 5])
    expected = torch.cat([x[:2] @ w[0], x[2:] @ w[1]])
    torch.testing.assert_close(grouped_matmul(x, w, offsets), expected)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        grouped_matmul(x, w, offsets, backend="triton")


def test_grouped_matmul_rejects_bad_input():
    x, w, offsets = torch.randn(5, 8), torch.randn(2, 8, 3), torch.tensor([0, 2, 5])
    with pytest.raises(ValueError, match=r"w must be \(E, d=8, f\)"):
        grouped_matmul(x, torch.randn(2, 7, 3), offsets)
    with pytest.raises(ValueError, match="offsets must have E\\+1 = 3"):
        grouped_matmul(x, w, torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="w must have x's dtype"):
        grouped_matmul(x, w.half(), offsets)
    with pytest.raises(TypeError, match="offsets must be one of int32, int64"):
        grouped_matmul(x, w, offsets.float())
