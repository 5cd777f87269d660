import math

import pytest
import torch
from clasp.kernels import poison_outputs, reference, route

from tests.utils import (
    as_reference_input,
    assert_all_written,
    assert_close,
    forbid_triton_path,
    randn,
    run_poisoned,
)

FP32, BF16, FP16, FP64 = torch.float32, torch.bfloat16, torch.float16, torch.float64

# (B, N, d, E, top_k, x dtype, normalize, strided x). Token counts are not multiples of the
# 64-token block; E covers 1, non-powers of 2 and the 128 maximum.
CASES = [
    pytest.param(2, 33, 48, 1, 1, FP32, True, False, id="E1-k1-fp32"),
    pytest.param(3, 37, 64, 6, 2, BF16, True, True, id="E6-k2-bf16-strided"),
    pytest.param(2, 45, 40, 6, 4, FP16, True, False, id="E6-k4-fp16"),
    pytest.param(2, 50, 64, 8, 2, FP32, False, False, id="E8-k2-fp32-unnormalized"),
    pytest.param(3, 29, 32, 8, 1, BF16, True, False, id="E8-k1-bf16"),
    pytest.param(2, 41, 64, 16, 4, FP32, True, True, id="E16-k4-fp32-strided"),
    pytest.param(2, 35, 300, 16, 2, FP16, False, False, id="E16-k2-fp16-d-over-block"),
    pytest.param(2, 70, 64, 60, 4, BF16, True, False, id="E60-k4-bf16"),
    pytest.param(1, 130, 32, 60, 2, FP32, True, False, id="E60-k2-fp32"),
    pytest.param(3, 21, 48, 60, 1, FP16, True, True, id="E60-k1-fp16-strided"),
    pytest.param(1, 1, 24, 8, 2, FP32, True, False, id="single-token"),
    pytest.param(2, 40, 32, 128, 8, BF16, True, False, id="E128-k8-bf16"),
]


def make_inputs(B, N, d, E, dtype, device, *, non_contiguous=False, w_dtype=None):
    x = randn(
        B, N, d, dtype=dtype, device=device, requires_grad=True, non_contiguous=non_contiguous
    )
    w = randn(d, E, dtype=w_dtype or dtype, device=device, scale=1 / math.sqrt(d))
    bias = randn(B, E, dtype=w_dtype or dtype, device=device)
    return x, w.requires_grad_(), bias.requires_grad_()


def reference_with_choice(x, w_gate, prompt_bias, expert_idx, normalize):
    """reference.route's differentiable outputs for a given expert choice."""
    logits = reference.router_logits(x, w_gate, prompt_bias)
    probs = torch.softmax(logits, dim=-1)
    top = probs.gather(1, expert_idx.long())
    weights = top / top.sum(-1, keepdim=True) if normalize else top
    return weights, probs.mean(0), torch.logsumexp(logits, dim=-1).square().mean()


def assert_choice_matches(expert_idx, ref, ref_probs, tie_tol):
    """Experts equal to the reference's, except where two reference probabilities are tied
    within `tie_tol`; there the choice may go either way but must keep the same values."""
    expert_idx = expert_idx.long().cpu()
    ref_idx = ref.expert_idx.long().cpu()
    ref_probs = ref_probs.detach().cpu()
    E = ref_probs.shape[1]
    assert expert_idx.min() >= 0 and expert_idx.max() < E
    distinct = torch.sort(expert_idx, dim=1).values.diff(dim=1)
    assert (distinct > 0).all(), "a token chose the same expert twice"
    differ = expert_idx != ref_idx
    gap = (ref_probs.gather(1, expert_idx) - ref_probs.gather(1, ref_idx)).abs()
    assert (gap[differ] <= tie_tol).all(), (
        f"{int(differ.sum())} slots chose another expert than the reference, "
        f"probability gaps up to {gap[differ].max():.3g} (ties allowed up to {tie_tol})"
    )
    assert differ.float().mean() <= 0.01, "too many near-ties: the inputs are degenerate"


def assert_grouping(routing, E):
    """counts, offsets and sorted_slots are exactly a stable counting sort of expert_idx."""
    counts, offsets, sorted_slots = reference.routing_metadata(routing.expert_idx.cpu(), E)
    assert torch.equal(routing.counts.cpu(), counts.int())
    assert torch.equal(routing.offsets.cpu(), offsets.int())
    slots = routing.sorted_slots.long().cpu()
    assert torch.equal(torch.sort(slots).values, torch.arange(counts.sum())), "not a permutation"
    assert torch.equal(slots, sorted_slots)


def check_route(x, w, bias, top_k, normalize, device):
    """Forward and gradients of route against reference.route run in fp64."""
    routing = run_poisoned(route, x, w, bias, top_k, normalize=normalize, backend="triton")
    T, E = x.shape[0] * x.shape[1], w.shape[1]
    assert routing.expert_idx.shape == (T, top_k) and routing.expert_idx.dtype == torch.int32
    assert routing.weights.dtype == FP32 and routing.probs_mean.dtype == FP32
    assert routing.sorted_slots.shape == (T * top_k,) and routing.offsets.shape == (E + 1,)
    ref_inputs = [as_reference_input(t) for t in (x, w, bias)]
    ref = reference.route(*ref_inputs, top_k, normalize=normalize)
    ref_probs = torch.softmax(reference.router_logits(*ref_inputs), dim=-1)
    tie_tol = 1e-4 if device.type == "cuda" else 1e-5
    assert_choice_matches(routing.expert_idx, ref, ref_probs, tie_tol)
    assert_grouping(routing, E)
    ref_weights, ref_probs_mean, ref_z_loss = ref.weights, ref.probs_mean, ref.z_loss
    if not torch.equal(routing.expert_idx.long().cpu(), ref.expert_idx.long().cpu()):
        # A near-tie went the other way: compare gradients for the kernel's choice.
        ref_weights, ref_probs_mean, ref_z_loss = reference_with_choice(
            *ref_inputs, routing.expert_idx, normalize
        )
    # Logits and softmax are fp32 whatever the input dtype.
    assert_close(routing.weights, ref_weights, FP32, scale=4)
    assert_close(routing.probs_mean, ref_probs_mean, FP32, scale=4)
    assert_close(routing.z_loss, ref_z_loss, FP32, scale=4)

    d_weights = torch.randn_like(routing.weights)
    d_probs_mean = torch.randn_like(routing.probs_mean)
    d_z_loss = torch.randn((), device=device)
    loss = (
        (routing.weights * d_weights).sum()
        + (routing.probs_mean * d_probs_mean).sum()
        + routing.z_loss * d_z_loss
    )
    grads = run_poisoned(torch.autograd.grad, loss, (x, w, bias))
    ref_loss = (
        (ref_weights * d_weights.double()).sum()
        + (ref_probs_mean * d_probs_mean.double()).sum()
        + ref_z_loss * d_z_loss.double()
    )
    ref_grads = torch.autograd.grad(ref_loss, ref_inputs)
    for name, grad, ref_grad, t in zip(
        ("dx", "dw_gate", "dprompt_bias"), grads, ref_grads, (x, w, bias), strict=True
    ):
        assert grad.dtype == t.dtype and grad.shape == t.shape
        assert_close(grad, ref_grad, t.dtype, scale=2, msg=name)
    return routing


@pytest.mark.parametrize("B,N,d,E,top_k,dtype,normalize,non_contiguous", CASES)
def test_route_matches_reference(B, N, d, E, top_k, dtype, normalize, non_contiguous, device):
    x, w, bias = make_inputs(B, N, d, E, dtype, device, non_contiguous=non_contiguous)
    check_route(x, w, bias, top_k, normalize, device)


@pytest.mark.parametrize(
    "x_dtype,w_dtype",
    [pytest.param(BF16, FP32, id="x-bf16-w-fp32"), pytest.param(FP32, FP16, id="x-fp32-w-fp16")],
)
def test_route_mixed_dtypes_match_reference(x_dtype, w_dtype, device):
    x, w, bias = make_inputs(2, 40, 64, 16, x_dtype, device, w_dtype=w_dtype)
    check_route(x, w, bias, 2, True, device)


def test_route_strided_gate_and_bias(device):
    x, _, _ = make_inputs(2, 30, 32, 12, FP32, device)
    w = randn(12, 32, device=device, scale=0.2).T.requires_grad_()  # (d, E) with strides (1, d)
    bias = randn(12, 2, device=device).T.requires_grad_()
    assert not w.is_contiguous() and not bias.is_contiguous()
    check_route(x, w, bias, 3, True, device)


@pytest.mark.parametrize(
    "top_k,dtype", [pytest.param(1, FP32, id="k1-fp32"), pytest.param(2, BF16, id="k2-bf16")]
)
def test_route_prompt_bias_sends_every_token_to_one_expert(top_k, dtype, device):
    B, N, E, favourite = 3, 25, 8, 5
    x, w, _ = make_inputs(B, N, 32, E, dtype, device)
    bias = torch.zeros(B, E, device=device)
    bias[:, favourite] = 30.0
    bias = bias.to(dtype).requires_grad_()
    routing = check_route(x, w, bias, top_k, True, device)
    T = B * N
    assert (routing.expert_idx[:, 0] == favourite).all()
    if top_k == 1:
        expected = torch.zeros(E, dtype=torch.int32)
        expected[favourite] = T
        assert torch.equal(routing.counts.cpu(), expected)
        assert torch.equal(routing.sorted_slots.cpu(), torch.arange(T, dtype=torch.int32))
        assert torch.equal(routing.weights.cpu(), torch.ones(T, 1))


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "unnormalized"])
def test_route_exact_ties_go_to_the_lower_expert(normalize, device):
    B, N, E, top_k = 2, 9, 6, 3
    x = torch.zeros(B, N, 16, device=device)
    w = torch.randn(16, E, device=device)
    bias = torch.full((B, E), 0.25, device=device)
    routing = run_poisoned(route, x, w, bias, top_k, normalize=normalize, backend="triton")
    ref = reference.route(x, w, bias, top_k, normalize=normalize)
    assert torch.equal(
        routing.expert_idx.cpu(), torch.arange(top_k, dtype=torch.int32).expand(B * N, -1)
    )
    assert torch.equal(routing.expert_idx.cpu(), ref.expert_idx.cpu())
    assert torch.equal(routing.sorted_slots.cpu(), ref.sorted_slots.cpu())
    assert_close(routing.weights, ref.weights)


@pytest.mark.parametrize(
    "output", ["weights", "probs_mean", "z_loss"], ids=lambda o: f"only-{o.replace('_', '-')}"
)
def test_route_gradient_from_one_output_and_some_inputs(output, device):
    x, w, bias = make_inputs(2, 40, 32, 8, FP32, device)
    x = x.detach()  # no dx wanted: the kernel skips it
    routing = route(x, w, bias, 2, backend="triton")
    ref_inputs = [as_reference_input(t) for t in (x, w, bias)]
    ref = reference.route(*ref_inputs, 2)
    value, ref_value = getattr(routing, output), getattr(ref, output)
    upstream = torch.randn_like(value)
    grads = run_poisoned(torch.autograd.grad, (value * upstream).sum(), (w, bias))
    ref_grads = torch.autograd.grad((ref_value * upstream.double()).sum(), ref_inputs[1:])
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert_close(grad, ref_grad, scale=2)


def test_route_is_deterministic(device):
    x, w, bias = make_inputs(2, 100, 64, 16, BF16, device)

    def run():
        routing = route(x, w, bias, 2, backend="triton")
        loss = routing.weights.square().sum() + routing.probs_mean.sum() + routing.z_loss
        return (*routing, *torch.autograd.grad(loss, (x, w, bias)))

    first, second = run(), run()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():  # the inference path skips saving logits and must agree bitwise
        inference = route(x, w, bias, 2, backend="triton")
    for a, b in zip(inference, first[: len(inference)], strict=True):
        assert torch.equal(a, b)


def test_route_under_torch_compile_matches_eager(device):
    x, w, bias = make_inputs(2, 20, 32, 8, FP32, device)

    def loss_and_slots(x, w, bias):
        routing = route(x, w, bias, 2, backend="triton")
        return routing.weights.square().sum() + routing.z_loss, routing.sorted_slots

    compiled = torch.compile(loss_and_slots, fullgraph=True, backend="aot_eager")
    loss, slots = loss_and_slots(x, w, bias)
    loss_c, slots_c = compiled(x, w, bias)
    assert torch.equal(slots, slots_c)
    torch.testing.assert_close(loss_c, loss)
    for g, g_c in zip(
        torch.autograd.grad(loss, (x, w, bias)),
        torch.autograd.grad(loss_c, (x, w, bias)),
        strict=True,
    ):
        torch.testing.assert_close(g_c, g)


def poison_input(x, w, bias, where):
    """Copies of the inputs with one non-finite value planted; returns them and the tokens
    whose logits it reaches."""
    x, w, bias = (t.detach().clone() for t in (x, w, bias))
    B, N, d = x.shape
    tokens = torch.zeros(B * N, dtype=torch.bool)
    if where in ("nan-token", "inf-token", "neg-inf-token"):
        value = {"nan-token": math.nan, "inf-token": math.inf, "neg-inf-token": -math.inf}[where]
        x[1, 3, d // 2] = value
        tokens[N + 3] = True
    elif where == "nan-prompt-bias":
        bias[0, 1] = math.nan
        tokens[:N] = True
    elif where == "nan-w-gate":
        w[d // 3, 0] = math.nan
        tokens[:] = True
    return [t.requires_grad_() for t in (x, w, bias)], tokens


def assert_same_nans_and_close(actual, expected, dtype, scale, msg):
    nan, nan_ref = torch.isnan(actual.detach().cpu()), torch.isnan(expected.detach().cpu())
    assert torch.equal(nan, nan_ref), f"{msg}: NaN at other positions than the reference's"
    assert not torch.isinf(actual).any(), msg
    assert_close(actual[~nan], expected[~nan_ref], dtype, scale=scale, msg=msg)


NON_FINITE = ["nan-token", "inf-token", "neg-inf-token", "nan-prompt-bias", "nan-w-gate"]
# The interpreter's numpy warns about the NaN arithmetic these inputs ask for.
IGNORE_NAN_WARNINGS = pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")


@IGNORE_NAN_WARNINGS
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("where", NON_FINITE)
def test_route_non_finite_input_matches_reference(where, dtype, device):
    """A token with a non-finite logit takes experts 0..k-1 and NaN weights; counts, offsets
    and sorted_slots stay a complete grouping; both backends agree on all of it, on where
    the NaNs are (forward and gradients) and on every finite value."""
    B, N, d, E, top_k = 2, 37, 32, 6, 2
    (x, w, bias), tokens = poison_input(*make_inputs(B, N, d, E, dtype, device), where)
    # Outputs poisoned: an unwritten integer shows as its minimum, an unwritten float as a NaN
    # where the reference has none.
    with poison_outputs():
        routing = route(x, w, bias, top_k, backend="triton")
    assert_all_written(routing.expert_idx, routing.counts, routing.offsets, routing.sorted_slots)
    ref_inputs = [as_reference_input(t) for t in (x, w, bias)]
    ref = reference.route(*ref_inputs, top_k)
    for name in ("expert_idx", "counts", "offsets", "sorted_slots"):
        assert torch.equal(getattr(routing, name).cpu(), getattr(ref, name).cpu()), name
    assert_grouping(routing, E)
    assert int(routing.counts.sum()) == B * N * top_k
    lowest = torch.arange(top_k, dtype=torch.int32).expand(int(tokens.sum()), -1)
    assert torch.equal(routing.expert_idx.cpu()[tokens], lowest)
    assert torch.equal(torch.isnan(routing.weights).any(1).cpu(), tokens)
    assert torch.isnan(routing.weights[tokens]).all()
    for name in ("weights", "probs_mean", "z_loss"):
        assert_same_nans_and_close(getattr(routing, name), getattr(ref, name), FP32, 4, name)
    assert torch.isnan(routing.z_loss) and torch.isnan(routing.probs_mean).all()

    upstream = (torch.randn_like(routing.weights), torch.randn(E, device=device), torch.randn(()))
    with poison_outputs():
        outputs = (routing.weights, routing.probs_mean, routing.z_loss)
        grads = torch.autograd.grad(outputs, (x, w, bias), upstream)
    ref_grads = torch.autograd.grad(
        (ref.weights, ref.probs_mean, ref.z_loss), ref_inputs, [u.double() for u in upstream]
    )
    for name, grad, ref_grad in zip(("dx", "dw_gate", "dbias"), grads, ref_grads, strict=True):
        assert_same_nans_and_close(grad, ref_grad, grad.dtype, 2, name)
    assert torch.isnan(grads[0].reshape(B * N, d)[tokens]).all(), "dx of non-finite tokens"


def test_route_no_tokens_returns_empty_routing(device):
    x, w, bias = make_inputs(2, 0, 16, 4, FP32, device)
    routing = route(x, w, bias, 2, backend="triton")
    assert routing.expert_idx.shape == (0, 2) and routing.sorted_slots.numel() == 0
    assert torch.equal(routing.counts.cpu(), torch.zeros(4, dtype=torch.int32))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_route_fp64_runs_the_reference(backend, monkeypatch, device):
    forbid_triton_path(monkeypatch, "route", "_RouteFunction")
    x, w, bias = make_inputs(2, 9, 16, 6, FP64, device)
    routing = route(x, w, bias, 2, backend=backend)
    ref_inputs = [as_reference_input(t) for t in (x, w, bias)]
    ref = reference.route(*ref_inputs, 2)
    for name, a, b in zip(ref._fields, routing, ref, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert routing.weights.dtype == routing.probs_mean.dtype == routing.z_loss.dtype == FP64
    loss = routing.weights.square().sum() + routing.probs_mean.sum() + routing.z_loss
    ref_loss = ref.weights.square().sum() + ref.probs_mean.sum() + ref.z_loss
    for g, g_ref in zip(
        torch.autograd.grad(loss, (x, w, bias)),
        torch.autograd.grad(ref_loss, ref_inputs),
        strict=True,
    ):
        assert torch.equal(g, g_ref)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_route_ignores_autocast(backend, device):
    x, w, bias = make_inputs(2, 30, 32, 8, FP32, device)
    with torch.autocast(device.type, dtype=BF16):
        routing = route(x, w, bias, 2, backend=backend)
    # Logits from a bf16 matmul would miss the fp32 tolerance by orders of magnitude.
    ref_inputs = [as_reference_input(t) for t in (x, w, bias)]
    ref = reference.route(*ref_inputs, 2)
    ref_probs = torch.softmax(reference.router_logits(*ref_inputs), dim=-1)
    assert_choice_matches(routing.expert_idx, ref, ref_probs, 1e-4 if x.is_cuda else 1e-5)
    ref_weights = reference_with_choice(*ref_inputs, routing.expert_idx, True)[0]
    assert routing.weights.dtype == FP32
    assert_close(routing.weights, ref_weights, FP32, scale=4)


def test_route_cpu_auto_uses_reference_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, bias = torch.randn(2, 5, 8), torch.randn(8, 4), torch.randn(2, 4)
    routing, ref = route(x, w, bias, 2), reference.route(x, w, bias, 2)
    for a, b in zip(routing, ref, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        route(x, w, bias, 2, backend="triton")


@pytest.mark.parametrize(
    "change,error,match",
    [
        pytest.param(
            dict(top_k=5),
            ValueError,
            r"top_k must be in \[1, min\(E, 8\)\] = \[1, 4\]",
            id="k-over-E",
        ),
        pytest.param(dict(top_k=0), ValueError, "top_k must be in", id="k-zero"),
        pytest.param(dict(top_k=2.0), TypeError, "top_k must be an int", id="k-float"),
        pytest.param(dict(E=16, top_k=9), ValueError, r"\[1, 8\]", id="k-over-8"),
        pytest.param(dict(E=129, top_k=2), ValueError, r"E must be in \[1, 128\]", id="E-over-128"),
        pytest.param(
            dict(w_rows=7), ValueError, "w_gate must be \\(d, E\\) with d = 8", id="w-wrong-d"
        ),
        pytest.param(
            dict(bias_rows=3), ValueError, "prompt_bias must be \\(B, E\\)", id="bias-wrong-B"
        ),
        pytest.param(
            dict(x_dtype=FP64, backend="triton"),
            TypeError,
            r"route with backend='triton' takes float32, bfloat16 or float16 inputs, got "
            r"x float64: .*backend='reference'",
            id="x-fp64-triton",
        ),
        pytest.param(dict(x_dtype=torch.int32), TypeError, "x must be one of", id="x-int"),
        pytest.param(dict(w_dtype=torch.int32), TypeError, "w_gate must be one of", id="w-int"),
        pytest.param(dict(x_ndim=2), ValueError, "x must have 3 dimensions", id="x-2d"),
        pytest.param(dict(bias_device="meta"), ValueError, "one device", id="bias-other-device"),
    ],
)
def test_route_rejects_bad_input(change, error, match):
    E = change.get("E", 4)
    x = torch.randn(2, 3, 8).to(change.get("x_dtype", FP32))
    if change.get("x_ndim") == 2:
        x = x[0]
    w = torch.randn(change.get("w_rows", 8), E).to(change.get("w_dtype", FP32))
    bias = torch.randn(change.get("bias_rows", 2), E, device=change.get("bias_device", "cpu"))
    with pytest.raises(error, match=match):
        route(x, w, bias, change.get("top_k", 2), backend=change.get("backend", "auto"))
