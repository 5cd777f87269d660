import pytest
import torch
from clasp.kernels import Routing, moe_mlp, poison_outputs, reference, route

from tests.utils import (
    DTYPE_IDS,
    as_reference_input,
    assert_close_normalised,
    forbid_triton_path,
    randn,
    run_poisoned,
)

FP32, BF16, FP16, FP64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
NAMES = ("x", "weights", "w1", "w2", "b1", "b2")


def routing_from_choices(expert_idx: torch.Tensor, weights: torch.Tensor, E: int) -> Routing:
    """A Routing for hand-picked expert choices (T, k), laid out as `route` lays it out."""
    counts, offsets, sorted_slots = reference.routing_metadata(expert_idx, E)
    return Routing(
        expert_idx=expert_idx.to(torch.int32),
        weights=weights.float(),
        counts=counts.to(torch.int32),
        offsets=offsets.to(torch.int32),
        sorted_slots=sorted_slots.to(torch.int32),
        probs_mean=torch.full((E,), 1.0 / E, device=expert_idx.device),
        z_loss=torch.zeros((), device=expert_idx.device),
    )


def random_routing(T: int, E: int, k: int, device) -> Routing:
    x = torch.randn(1, T, 16, device=device)
    return reference.route(
        x, torch.randn(16, E, device=device), torch.randn(1, E, device=device), k
    )


def make_inputs(T, d, f, E, routing, dtype, device, bias=True, non_contiguous=False):
    """Leaf inputs in NAMES order; the gate weights are a leaf so their gradient is checked."""
    return [
        randn(T, d, dtype=dtype, device=device, requires_grad=True, non_contiguous=non_contiguous),
        routing.weights.detach().clone().requires_grad_(True),
        randn(E, d, f, dtype=dtype, device=device, scale=d**-0.5, requires_grad=True),
        randn(E, f, d, dtype=dtype, device=device, scale=f**-0.5, requires_grad=True),
        randn(E, f, dtype=dtype, device=device, scale=0.5, requires_grad=True) if bias else None,
        randn(E, d, dtype=dtype, device=device, scale=0.5, requires_grad=True) if bias else None,
    ]


def check_against_reference(inputs, routing, activation, dtype):
    """Forward, then every gradient, against the reference run on fp64 copies of the inputs."""
    x, weights, w1, w2, b1, b2 = inputs
    routed = routing._replace(weights=weights)
    y = run_poisoned(moe_mlp, x, routed, w1, w2, b1, b2, activation, backend="triton")
    ref = [None if t is None else as_reference_input(t) for t in inputs]
    y_ref = reference.moe_mlp(ref[0], routing._replace(weights=ref[1]), *ref[2:], activation)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close_normalised(y, y_ref, dtype, msg="y")

    dy = torch.randn_like(y)
    wrt = [t for t in inputs if t is not None]
    grads = run_poisoned(torch.autograd.grad, y, wrt, dy)
    grads_ref = torch.autograd.grad(y_ref, [t for t in ref if t is not None], dy.double())
    names = [n for n, t in zip(NAMES, inputs, strict=True) if t is not None]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert g.dtype == (FP32 if name == "weights" else dtype), name
        assert_close_normalised(g, g_ref, dtype, msg=f"d{name}")
    return dict(zip(names, grads, strict=True))


# (T, d, f, E, k, activation, bias, non-contiguous x)
CASES = [
    pytest.param(1, 32, 48, 1, 1, "gelu", True, False, id="T1-E1-k1"),
    pytest.param(1, 40, 64, 3, 2, "silu", True, False, id="T1-E3-k2"),
    pytest.param(24, 80, 96, 3, 2, "gelu_tanh", True, True, id="E3-k2-strided-x"),
    pytest.param(20, 72, 136, 3, 1, "silu", False, False, id="E3-k1-no-bias-f3tiles"),
    pytest.param(32, 64, 96, 8, 2, "gelu", False, True, id="E8-k2-no-bias-strided-x"),
    pytest.param(40, 96, 80, 8, 1, "gelu_tanh", True, False, id="E8-k1"),
]


@pytest.mark.parametrize("T,d,f,E,k,activation,bias,non_contiguous", CASES)
def test_moe_mlp_fp32_matches_reference(T, d, f, E, k, activation, bias, non_contiguous, device):
    routing = random_routing(T, E, k, device)
    inputs = make_inputs(T, d, f, E, routing, FP32, device, bias, non_contiguous)
    check_against_reference(inputs, routing, activation, FP32)


@pytest.mark.parametrize("dtype", [pytest.param(d, id=DTYPE_IDS[d]) for d in (BF16, FP16)])
@pytest.mark.parametrize(
    "T,E,k,activation",
    [
        pytest.param(24, 3, 2, "gelu", id="E3-k2-gelu"),
        pytest.param(28, 8, 2, "silu", id="E8-k2-silu"),
    ],
)
def test_moe_mlp_half_precision_matches_reference(T, E, k, activation, dtype, device):
    routing = random_routing(T, E, k, device)
    inputs = make_inputs(T, 80, 96, E, routing, dtype, device, non_contiguous=True)
    check_against_reference(inputs, routing, activation, dtype)


def test_moe_mlp_empty_expert_gets_zero_gradients(device):
    T, E, k = 16, 3, 2
    # Every token picks experts 0 and 2; expert 1 receives nothing.
    expert_idx = torch.tensor([[0, 2], [2, 0]], device=device).repeat(T // 2, 1)
    routing = routing_from_choices(expert_idx, torch.rand(T, k, device=device), E)
    inputs = make_inputs(T, 48, 72, E, routing, FP32, device)
    grads = check_against_reference(inputs, routing, "gelu", FP32)
    for name in ("w1", "w2", "b1", "b2"):
        assert grads[name][1].eq(0).all(), f"d{name} of the empty expert must be zero"


@pytest.mark.parametrize("dtype", [pytest.param(d, id=DTYPE_IDS[d]) for d in (FP32, BF16)])
def test_moe_mlp_all_tokens_on_one_expert(dtype, device):
    T, E = 36, 8
    expert_idx = torch.full((T, 1), 5, device=device)
    routing = routing_from_choices(expert_idx, torch.rand(T, 1, device=device), E)
    inputs = make_inputs(T, 64, 96, E, routing, dtype, device)
    grads = check_against_reference(inputs, routing, "silu", dtype)
    others = [e for e in range(E) if e != 5]
    assert grads["w1"][others].eq(0).all() and grads["w2"][others].eq(0).all()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_moe_mlp_after_routing_a_nan_token_gives_nan_there_only(device):
    """route sends a NaN token to experts 0..k-1 with NaN weights: both backends run the
    layer on that routing and give a NaN output row for that token, finite rows elsewhere."""
    T, d, f, E, k = 24, 32, 48, 4, 2
    router_x = torch.randn(1, T, 16, device=device)
    router_x[0, 5, 7] = float("nan")
    routing = route(
        router_x, torch.randn(16, E, device=device), torch.randn(1, E, device=device), k,
        backend="triton",
    )  # fmt: skip
    inputs = make_inputs(T, d, f, E, routing, FP32, device)
    x, weights, w1, w2, b1, b2 = inputs
    with poison_outputs():
        y = moe_mlp(x, routing, w1, w2, b1, b2, backend="triton")
    ref = [as_reference_input(t) for t in inputs]
    y_ref = reference.moe_mlp(ref[0], routing._replace(weights=ref[1]), *ref[2:])
    nan_rows = torch.isnan(y).any(1).cpu()
    expected = torch.zeros(T, dtype=torch.bool)
    expected[5] = True
    assert torch.equal(nan_rows, expected) and torch.isnan(y[5]).all()
    assert torch.equal(torch.isnan(y_ref).cpu(), torch.isnan(y).cpu())
    assert_close_normalised(y[~nan_rows], y_ref[~nan_rows], FP32)


def test_moe_mlp_is_deterministic(device):
    T, E, k = 32, 3, 2
    routing = random_routing(T, E, k, device)
    x, weights, w1, w2, b1, b2 = make_inputs(T, 64, 64, E, routing, FP32, device)
    routed = routing._replace(weights=weights)
    dy = torch.randn(T, 64, device=device)
    runs = []
    for _ in range(2):
        y = moe_mlp(x, routed, w1, w2, b1, b2, backend="triton")
        runs.append([y, *torch.autograd.grad(y, (x, weights, w1, w2, b1, b2), dy)])
    for name, a, b in zip(("y", *NAMES), *runs, strict=True):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_moe_mlp_under_autocast_runs_in_autocast_dtype(backend, device):
    T, E, k = 16, 3, 2
    routing = random_routing(T, E, k, device)
    x, _, w1, w2, b1, b2 = make_inputs(T, 48, 64, E, routing, FP32, device)
    with torch.autocast(device.type, dtype=BF16):
        y = moe_mlp(x, routing, w1, w2, b1, b2, backend=backend)
    assert y.dtype == BF16
    cast = [t.detach().to(BF16).double() for t in (x, w1, w2, b1, b2)]
    y_ref = reference.moe_mlp(cast[0], routing, *cast[1:])
    assert_close_normalised(y, y_ref, BF16)
    (dw1,) = torch.autograd.grad(y.float().sum(), w1)
    assert dw1.dtype == FP32 and torch.isfinite(dw1).all()


def test_moe_mlp_under_torch_compile_matches_eager(device):
    T, E, k = 16, 3, 2
    routing = random_routing(T, E, k, device)
    x, _, w1, w2, _, _ = make_inputs(T, 32, 64, E, routing, FP32, device, bias=False)

    def layer(x, routing, w1, w2):
        return moe_mlp(x, routing, w1, w2, activation="silu", backend="triton")

    # fullgraph: the launches are opaque custom ops, forward and backward, so nothing breaks.
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, layer):
        y = fn(x, routing, w1, w2)
        results.append([y, *torch.autograd.grad(y.square().sum(), (x, w1, w2))])
    for name, a, b in zip(("y", "x", "w1", "w2"), *results, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_moe_mlp_fp64_runs_the_reference(backend, monkeypatch, device):
    forbid_triton_path(monkeypatch, "moe_mlp", "MoEMLP")
    T, E, k = 12, 3, 2
    x = randn(1, T, 16, dtype=FP64, device=device)
    routing = reference.route(x, randn(16, E, dtype=FP64, device=device), x.new_zeros(1, E), k)
    assert routing.weights.dtype == FP64
    inputs = make_inputs(T, 16, 24, E, routing, FP64, device)
    x, weights, w1, w2, b1, b2 = inputs
    y = moe_mlp(x, routing._replace(weights=weights), w1, w2, b1, b2, "silu", backend=backend)
    ref = [as_reference_input(t) for t in inputs]
    y_ref = reference.moe_mlp(ref[0], routing._replace(weights=ref[1]), *ref[2:], "silu")
    assert y.dtype == FP64 and torch.equal(y, y_ref)
    dy = torch.randn_like(y)
    for name, g, g_ref in zip(
        NAMES, torch.autograd.grad(y, inputs, dy), torch.autograd.grad(y_ref, ref, dy), strict=True
    ):
        assert torch.equal(g, g_ref), f"d{name}"


def test_moe_mlp_triton_rejects_fp64():
    routing = random_routing(6, 3, 2, "cpu")
    x, w1, w2 = (torch.randn(*s, dtype=FP64) for s in ((6, 8), (3, 8, 12), (3, 12, 8)))
    with pytest.raises(
        TypeError,
        match=r"moe_mlp with backend='triton' takes float32, bfloat16 or float16 inputs, got "
        r"x float64, w1 float64, w2 float64: .*backend='reference'",
    ):
        moe_mlp(x, routing, w1, w2, backend="triton")


def test_moe_mlp_cpu_auto_uses_reference_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    routing = random_routing(6, 3, 2, "cpu")
    x, w1, w2 = torch.randn(6, 8), torch.randn(3, 8, 12), torch.randn(3, 12, 8)
    torch.testing.assert_close(moe_mlp(x, routing, w1, w2), reference.moe_mlp(x, routing, w1, w2))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        moe_mlp(x, routing, w1, w2, backend="triton")


def test_moe_mlp_rejects_bad_input():
    routing = random_routing(6, 3, 2, "cpu")
    x, w1, w2 = torch.randn(6, 8), torch.randn(3, 8, 12), torch.randn(3, 12, 8)
    with pytest.raises(ValueError, match="activation must be one of"):
        moe_mlp(x, routing, w1, w2, activation="relu")
    with pytest.raises(ValueError, match="x has 5 tokens: route x itself"):
        moe_mlp(x[:5], routing, w1, w2)
    with pytest.raises(ValueError, match=r"w1 must be \(E, d, f\)"):
        moe_mlp(x, routing, w1, w2.transpose(1, 2))
    with pytest.raises(ValueError, match="routing has 3 experts, w1 has 2"):
        moe_mlp(x, routing, w1[:2], w2[:2])
    with pytest.raises(ValueError, match=r"b1 must be \(3, 12\)"):
        moe_mlp(x, routing, w1, w2, b1=torch.zeros(3, 8))
    with pytest.raises(TypeError, match="must have x's dtype"):
        moe_mlp(x, routing, w1.half(), w2)
    with pytest.raises(TypeError, match="routing must be a clasp.kernels.Routing"):
        moe_mlp(x, tuple(routing), w1, w2)
