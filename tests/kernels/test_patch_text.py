import pytest
import torch
from clasp.kernels import PatchLabels, patch_text_labels, poison_outputs, reference

from tests.utils import (
    DTYPE_IDS,
    assert_all_written,
    assert_close,
    forbid_triton_path,
    randn,
    run_poisoned,
    tolerance,
)

DTYPES = [pytest.param(d, id=DTYPE_IDS[d]) for d in (torch.float32, torch.bfloat16, torch.float16)]
# (B, N, D, C)
SHAPES = [
    pytest.param((1, 1, 16, 2), id="one-patch-two-classes"),
    pytest.param((2, 37, 96, 7), id="c7-rows-not-multiple-of-block"),
    pytest.param((3, 25, 200, 20), id="c20-d-loop-with-tail"),
    pytest.param((1, 70, 48, 64), id="c64-max-classes"),
    pytest.param((2, 9, 33, 3), id="c3-odd-d"),
]


def _tolerances(device, temperature: float) -> tuple[float, float]:
    # Output errors scale with the logits, which grow as 1 / temperature.
    return tolerance(torch.float32, device, scale=max(1.0, 0.05 / temperature))


def assert_labels_agree(out, ref, threshold, atol: float):
    """Labels equal the reference's wherever rounding cannot flip them: the top two reference
    probabilities differ by more than the tolerance and the confidence is not at the
    threshold. Elsewhere the label must still be one of the near-maximal classes."""
    top2 = ref.probs.topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) > 4 * atol
    if threshold is not None:
        decided &= (ref.confidence.double() - threshold).abs() > 4 * atol
    labels, expected = out.labels.cpu(), ref.labels.cpu()
    mismatched = (labels != expected) & decided.cpu()
    assert not mismatched.any(), f"{int(mismatched.sum())} decided labels differ"
    kept = labels >= 0
    chosen = ref.probs.cpu().gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert (chosen[kept] >= ref.confidence.cpu()[kept] - 4 * atol).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "strided"])
def test_patch_text_labels_matches_reference(shape, dtype, non_contiguous, device):
    B, N, D, C = shape
    patches = randn(B, N, D, dtype=dtype, device=device, scale=2.0, non_contiguous=non_contiguous)
    text = randn(C, D, dtype=dtype, device=device)
    temperature, threshold = 0.02, 0.4
    out = run_poisoned(
        patch_text_labels,
        patches,
        text,
        temperature,
        threshold=threshold,
        return_probs=True,
        backend="triton",
    )
    ref = reference.patch_text_labels(
        patches.double(), text.double(), temperature, threshold=threshold, return_probs=True
    )
    assert out.labels.dtype == torch.int64 and out.labels.shape == (B, N)
    assert out.confidence.dtype == torch.float32 and out.probs.shape == (B, N, C)
    atol, _ = _tolerances(device, temperature)
    scale = atol / tolerance(torch.float32, device)[0]
    assert_close(out.probs, ref.probs, torch.float32, scale=scale)
    assert_close(out.confidence, ref.confidence, torch.float32, scale=scale)
    assert_labels_agree(out, ref, threshold, atol)


@pytest.mark.parametrize(
    "threshold", [None, 0.0, 0.5, 1.0], ids=["no-threshold", "zero", "half", "one"]
)
def test_patch_text_labels_threshold_and_optional_probs(threshold, device):
    patches = randn(2, 40, 64, device=device)
    text = randn(5, 64, device=device)
    out = run_poisoned(patch_text_labels, patches, text, 0.1, threshold=threshold, backend="triton")
    ref = reference.patch_text_labels(patches.double(), text.double(), 0.1, threshold=threshold)
    assert out.probs is None
    assert_close(out.confidence, ref.confidence, torch.float32)
    assert_labels_agree(out, ref._replace(probs=_ref_probs(patches, text, 0.1)), threshold, 1e-5)
    if threshold == 1.0:
        assert (out.labels == -1).all()  # no confidence reaches 1 with 5 distinct classes
    if threshold in (None, 0.0):
        assert (out.labels >= 0).all()


def _ref_probs(patches, text, temperature):
    return reference.patch_text_labels(
        patches.double(), text.double(), temperature, return_probs=True
    ).probs


def test_patch_text_labels_zero_and_tiny_patches(device):
    patches = torch.zeros(1, 4, 32, device=device)
    patches[0, 1] = 1e-6 * torch.randn(32, device=device)  # tiny but not zero: still normalised
    text = randn(6, 32, device=device)
    out = patch_text_labels(patches, text, 0.01, return_probs=True, backend="triton")
    uniform = torch.full((6,), 1 / 6, dtype=torch.float64)
    for n in (0, 2, 3):
        assert_close(out.probs[0, n], uniform, torch.float32)
        assert out.labels[0, n] == 0  # ties go to the lowest class, as torch.max does
    assert_close(out.probs, _ref_probs(patches, text, 0.01).float(), torch.float32)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("threshold", [None, 0.3], ids=["no-threshold", "threshold"])
@pytest.mark.parametrize("where", ["nan-patch", "inf-patch", "neg-inf-patch", "nan-text-row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_patch_text_labels_non_finite_input(where, threshold, dtype, device):
    """A patch whose probabilities are not finite gets label -1, confidence NaN and NaN
    probabilities on both backends, threshold or not; a non-finite text row reaches every
    patch. The other patches are labelled as usual."""
    B, N, D, C = 2, 40, 64, 5
    patches = randn(B, N, D, dtype=dtype, device=device)
    text = randn(C, D, dtype=dtype, device=device)
    bad = torch.zeros(B, N, dtype=torch.bool)
    if where == "nan-text-row":
        text[2, 11] = float("nan")
        bad[:] = True
    else:
        value = {"nan-patch": "nan", "inf-patch": "inf", "neg-inf-patch": "-inf"}[where]
        patches[1, 7, 30] = float(value)
        patches[0, 0, 0] = float(value)
        bad[1, 7] = bad[0, 0] = True
    with poison_outputs():
        out = patch_text_labels(
            patches, text, 0.05, threshold=threshold, return_probs=True, backend="triton"
        )
    assert_all_written(out.labels)
    ref = reference.patch_text_labels(
        patches.double(), text.double(), 0.05, threshold=threshold, return_probs=True
    )
    for name in ("labels", "confidence", "probs"):
        got, expected = getattr(out, name).cpu(), getattr(ref, name).cpu()
        if name != "labels":  # an unwritten float would be a NaN where the reference has none
            assert torch.equal(torch.isnan(got), torch.isnan(expected)), name
    assert (out.labels.cpu()[bad] == -1).all() and (ref.labels.cpu()[bad] == -1).all()
    assert torch.isnan(out.confidence.cpu()[bad]).all()
    assert torch.isnan(out.probs.cpu()[bad]).all()
    if not bad.all():
        good = ~bad
        atol, _ = _tolerances(device, 0.05)
        scale = atol / tolerance(torch.float32, device)[0]
        assert_close(out.probs.cpu()[good], ref.probs.cpu()[good], torch.float32, scale=scale)
        kept = PatchLabels(*(t.cpu()[good] for t in out))
        assert_labels_agree(kept, PatchLabels(*(t.cpu()[good] for t in ref)), threshold, atol)


def test_patch_text_labels_mixed_dtypes_and_empty_batch(device):
    patches = randn(2, 12, 48, dtype=torch.bfloat16, device=device)
    text = randn(4, 48, dtype=torch.float32, device=device)
    out = patch_text_labels(patches, text, 0.05, return_probs=True, backend="triton")
    assert_close(out.probs, _ref_probs(patches, text, 0.05), torch.float32)

    empty = patch_text_labels(patches[:0], text, 0.05, return_probs=True, backend="triton")
    assert empty.labels.shape == (0, 12) and empty.probs.shape == (0, 12, 4)


def test_patch_text_labels_takes_no_gradient(device):
    patches = randn(1, 8, 32, device=device, requires_grad=True)
    text = randn(3, 32, device=device, requires_grad=True)
    out = patch_text_labels(patches, text, 0.1, return_probs=True, backend="triton")
    assert not out.confidence.requires_grad and not out.probs.requires_grad


def test_patch_text_labels_under_torch_compile_matches_eager(device):
    patches = randn(2, 20, 40, device=device)
    text = randn(7, 40, device=device)
    fn = lambda p, t: patch_text_labels(p, t, 0.05, threshold=0.3, return_probs=True)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, expected = compiled(patches, text), fn(patches, text)
    torch.testing.assert_close(got.labels, expected.labels)
    torch.testing.assert_close(got.probs, expected.probs)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_patch_text_labels_fp64_runs_the_reference(backend, monkeypatch, device):
    forbid_triton_path(monkeypatch, "patch_text", "_patch_text_labels_op")
    patches = randn(2, 9, 24, dtype=torch.float64, device=device)
    text = randn(5, 24, dtype=torch.float64, device=device)
    out = patch_text_labels(patches, text, 0.05, threshold=0.3, return_probs=True, backend=backend)
    ref = reference.patch_text_labels(patches, text, 0.05, threshold=0.3, return_probs=True)
    for name, a, b in zip(ref._fields, out, ref, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize(
    "patches_dtype,text_dtype,got",
    [
        pytest.param(torch.float64, torch.float32, "patches float64", id="patches-fp64"),
        pytest.param(torch.bfloat16, torch.float64, "text float64", id="text-fp64"),
    ],
)
def test_patch_text_labels_triton_rejects_fp64(patches_dtype, text_dtype, got):
    patches, text = torch.randn(1, 2, 4).to(patches_dtype), torch.randn(3, 4).to(text_dtype)
    with pytest.raises(
        TypeError,
        match=rf"patch_text_labels with backend='triton' takes float32, bfloat16 or float16 "
        rf"inputs, got {got}: .*backend='reference'",
    ):
        patch_text_labels(patches, text, 0.1, backend="triton")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_patch_text_labels_ignore_autocast(backend, device):
    patches = randn(2, 12, 48, device=device)
    text = randn(4, 48, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = patch_text_labels(patches, text, 0.05, return_probs=True, backend=backend)
    # Cosines from a bf16 matmul would miss the fp32 tolerance by orders of magnitude.
    assert_close(out.probs, _ref_probs(patches, text, 0.05), torch.float32)


def test_patch_text_labels_cpu_auto_uses_reference_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    patches, text = torch.randn(2, 5, 16), torch.randn(3, 16)
    out = patch_text_labels(patches, text, 0.1, return_probs=True)
    ref = reference.patch_text_labels(patches, text, 0.1, return_probs=True)
    torch.testing.assert_close(out.probs, ref.probs)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        patch_text_labels(patches, text, 0.1, backend="triton")


@pytest.mark.parametrize(
    "patches,text,temperature,threshold,error,match",
    [
        pytest.param((2, 16), (3, 16), 0.1, None, ValueError, "patches must have 3", id="2d"),
        pytest.param((1, 2, 16), (3, 8), 0.1, None, ValueError, "feature size D = 16", id="d"),
        pytest.param((1, 2, 16), (1, 16), 0.1, None, ValueError, r"\[2, 64\], got 1", id="c1"),
        pytest.param((1, 2, 16), (65, 16), 0.1, None, ValueError, "got 65", id="c65"),
        pytest.param((1, 2, 16), (3, 16), 0.0, None, ValueError, "positive", id="temp0"),
        pytest.param((1, 2, 16), (3, 16), -1.0, None, ValueError, "positive", id="temp-neg"),
        pytest.param((1, 2, 16), (3, 16), 0.1, 1.5, ValueError, r"\[0, 1\]", id="threshold"),
        pytest.param((1, 2, 0), (3, 0), 0.1, None, ValueError, "D >= 1", id="d0"),
    ],
)
def test_patch_text_labels_rejects_bad_input(patches, text, temperature, threshold, error, match):
    with pytest.raises(error, match=match):
        patch_text_labels(
            torch.randn(*patches), torch.randn(*text), temperature, threshold=threshold
        )


def test_patch_text_labels_rejects_bad_dtype_and_devices():
    with pytest.raises(TypeError, match="patches must be one of"):
        patch_text_labels(torch.ones(1, 2, 4, dtype=torch.int64), torch.randn(3, 4), 0.1)
    with pytest.raises(TypeError, match="text must be one of"):
        patch_text_labels(torch.randn(1, 2, 4), torch.ones(3, 4, dtype=torch.int32), 0.1)
    with pytest.raises(TypeError, match="Python float"):
        patch_text_labels(torch.randn(1, 2, 4), torch.randn(3, 4), torch.tensor(0.1))
    with pytest.raises(ValueError, match="one device"):
        patch_text_labels(torch.randn(1, 2, 4), torch.randn(3, 4, device="meta"), 0.1)


def test_patch_text_labels_follow_text_changed_in_place(device):
    """The normalised text is kept per text tensor between calls: writing into the text
    must not leave the labels of the old text behind."""
    patches = randn(2, 30, 32, device=device)
    text = randn(4, 32, device=device)
    first = patch_text_labels(patches, text, 0.05, return_probs=True, backend="triton")
    again = patch_text_labels(patches, text, 0.05, return_probs=True, backend="triton")
    assert torch.equal(first.probs, again.probs)
    text.copy_(randn(4, 32, device=device))
    changed = patch_text_labels(patches, text, 0.05, return_probs=True, backend="triton")
    assert_close(changed.probs, _ref_probs(patches, text, 0.05), torch.float32)
    assert not torch.allclose(changed.probs, first.probs)
