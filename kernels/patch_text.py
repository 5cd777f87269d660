"""Fused patch-to-text labeling: each patch feature is read once and turned into a part label.

For every patch x and L2-normalised text embedding t_c the kernel computes
softmax_c(cos(x, t_c) / temperature), then writes the argmax (or -1 under a confidence
threshold), the max probability and, when asked, all C probabilities. The patch norm and
the C dot products accumulate in the same loop over D, so the only pass over the (B, N, D)
features is the one that the bandwidth bound allows.

Precision: half-precision patches stay in their dtype for the tensor-core dot, and the text
side is split into a high and a low half-precision part (t = t_hi + t_lo), so the product
keeps about 16 bits more than a plain bf16 dot. fp32 patches use the 3-pass TF32 dot on
CUDA. Both keep cosines within ~1e-5 of an fp32 computation: temperatures near 0.01 turn
a 1e-3 cosine error into a 10% error in the probabilities.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import reference
from .types import PatchLabels
from .utils import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    derived_operand,
    interpreter_active,
    new_output,
    use_triton,
)

MIN_CLASSES, MAX_CLASSES = 2, 64
# tl.dot needs every block dimension >= 16; smaller class counts are padded and masked.
MIN_BLOCK_C = 16
NORM_EPS = 1e-12  # as F.normalize, so zero patches get uniform probabilities like the reference


@triton.jit
def _patch_text_labels_kernel(
    x_ptr,
    text_ptr,
    labels_ptr,
    confidence_ptr,
    probs_ptr,
    M,
    N,
    D,
    C,
    stride_xb,
    stride_xn,
    stride_xd,
    stride_text_part,
    inv_temperature,
    threshold,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SPLIT_TEXT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr,
    WRITE_PROBS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    # Patches are addressed through (b, n, d) strides, so strided views need no copy.
    row_offsets = (rows // N).to(tl.int64) * stride_xb + (rows % N).to(tl.int64) * stride_xn
    classes = tl.arange(0, BLOCK_C)
    dims = tl.arange(0, BLOCK_D)

    sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dots = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dims
        d_ok = d < D
        x = tl.load(
            x_ptr + row_offsets[:, None] + d[None, :] * stride_xd,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        x32 = x.to(tl.float32)
        sum_sq += tl.sum(x32 * x32, axis=1)
        # text is stored transposed, (D, BLOCK_C) per part, zero in the padded classes.
        t_offsets = d[:, None] * BLOCK_C + classes[None, :]
        if SPLIT_TEXT:
            t_hi = tl.load(text_ptr + t_offsets, mask=d_ok[:, None], other=0.0)
            t_lo = tl.load(text_ptr + stride_text_part + t_offsets, mask=d_ok[:, None], other=0.0)
            dots = tl.dot(x, t_hi, dots)
            dots = tl.dot(x, t_lo, dots)
        else:
            t = tl.load(text_ptr + t_offsets, mask=d_ok[:, None], other=0.0)
            dots = tl.dot(x32, t, dots, input_precision=DOT_PRECISION)

    rnorm = 1.0 / tl.maximum(tl.sqrt(sum_sq), 1e-12)
    logits = dots * (rnorm * inv_temperature)[:, None]
    class_ok = classes[None, :] < C
    # Non-finite patch (a NaN or infinite feature or text value): label -1, NaN confidence
    # and probabilities. Decided by comparison: max and argmax treat NaN differently on a
    # GPU and in the interpreter.
    non_finite = tl.sum((class_ok & ~(tl.abs(logits) < float("inf"))).to(tl.int32), 1) > 0
    logits = tl.where(class_ok, logits, float("-inf"))
    row_max = tl.max(logits, axis=1)
    exps = tl.exp(logits - row_max[:, None])
    exps = tl.where(non_finite[:, None], float("nan"), exps)
    denom = tl.sum(exps, axis=1)
    # The max class has exp(0) = 1 in the numerator.
    confidence = 1.0 / denom
    labels = tl.argmax(logits, axis=1, tie_break_left=True).to(tl.int64)
    if HAS_THRESHOLD:
        labels = tl.where(confidence < threshold, -1, labels)
    labels = tl.where(non_finite, -1, labels)
    tl.store(labels_ptr + rows, labels, mask=row_ok)
    tl.store(confidence_ptr + rows, confidence, mask=row_ok)
    if WRITE_PROBS:
        probs = exps / denom[:, None]
        tl.store(
            probs_ptr + rows.to(tl.int64)[:, None] * C + classes[None, :],
            probs,
            mask=row_ok[:, None] & (classes[None, :] < C),
        )


def _launch_config(D: int) -> dict:
    """A fixed function of the shape, not autotuned: a different block over D would change
    the fp32 summation order, and with it near-tied labels, from one process to the next,
    and a resumed labeling run must reproduce the labels of an uninterrupted one."""
    if interpreter_active():
        # Large blocks: the interpreter pays per program and per loop step.
        return dict(BLOCK_M=64, BLOCK_D=64, num_warps=4)
    block_d = min(128, max(16, triton.next_power_of_2(D)))
    return dict(BLOCK_M=64, BLOCK_D=block_d, num_warps=4, num_stages=3)


def _block_c(C: int) -> int:
    return max(MIN_BLOCK_C, triton.next_power_of_2(C))


def _text_operand(text: torch.Tensor, patch_dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """Normalised text as the kernel reads it: (parts, D, BLOCK_C), zero-padded classes.
    About eight small torch ops: `patch_text_labels` keeps the result per text tensor
    (`derived_operand`), so calls with the same, unchanged text skip them.

    Half-precision patches get two parts, hi and lo, in the patches' dtype (see module doc);
    fp32 patches and every dtype under the interpreter (whose bf16 arithmetic is wrong) get
    one fp32 part, and their patches are upcast before the dot.
    """
    C, D = text.shape
    t = F.normalize(text.float(), dim=-1, eps=NORM_EPS)
    padded = t.new_zeros(D, _block_c(C))
    padded[:, :C] = t.T
    split = patch_dtype != torch.float32 and not (
        interpreter_active() and patch_dtype == torch.bfloat16
    )
    if not split:
        return padded.unsqueeze(0), False
    hi = padded.to(patch_dtype)
    lo = (padded - hi.float()).to(patch_dtype)
    return torch.stack([hi, lo]), True


@torch.library.custom_op("clasp::patch_text_labels", mutates_args=())
def _patch_text_labels_op(
    patches: torch.Tensor,
    text: torch.Tensor,
    temperature: float,
    threshold: float,
    has_threshold: bool,
    return_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N, D = patches.shape
    C = text.shape[0]
    M = B * N
    labels = new_output((B, N), torch.int64, patches.device)
    confidence = new_output((B, N), torch.float32, patches.device)
    probs = new_output((B, N, C) if return_probs else (0,), torch.float32, patches.device)
    if M == 0:
        return labels, confidence, probs
    text_operand, split = derived_operand(
        text, ("patch_text", patches.dtype, interpreter_active()),
        lambda: _text_operand(text, patches.dtype),
    )  # fmt: skip
    # Without tensor cores in the interpreter, any precision is exact fp32.
    precision = "ieee" if interpreter_active() else "tf32x3"
    config = _launch_config(D)
    grid = (triton.cdiv(M, config["BLOCK_M"]),)
    _patch_text_labels_kernel[grid](
        patches,
        text_operand,
        labels,
        confidence,
        probs,
        M,
        N,
        D,
        C,
        patches.stride(0),
        patches.stride(1),
        patches.stride(2),
        text_operand.stride(0),
        1.0 / temperature,
        threshold,
        BLOCK_C=_block_c(C),
        SPLIT_TEXT=split,
        DOT_PRECISION=precision,
        HAS_THRESHOLD=has_threshold,
        WRITE_PROBS=return_probs,
        **config,
    )
    return labels, confidence, probs


@_patch_text_labels_op.register_fake
def _(patches, text, temperature, threshold, has_threshold, return_probs):
    B, N, _ = patches.shape
    C = text.shape[0]
    return (
        patches.new_empty((B, N), dtype=torch.int64),
        patches.new_empty((B, N), dtype=torch.float32),
        patches.new_empty((B, N, C) if return_probs else (0,), dtype=torch.float32),
    )


def _check_inputs(patches, text, temperature, threshold) -> None:
    check_tensor("patches", patches, 3, FLOAT_DTYPES)
    check_tensor("text", text, 2, FLOAT_DTYPES)
    check_same_device(patches=patches, text=text)
    B, N, D = patches.shape
    C, D_text = text.shape
    if D == 0:
        raise ValueError("patches must have a feature dimension D >= 1, got D = 0")
    if D_text != D:
        raise ValueError(
            f"text (C, D) must have the patches' feature size D = {D}, got text shape "
            f"{tuple(text.shape)}; project patches and text into the same embedding space"
        )
    if not MIN_CLASSES <= C <= MAX_CLASSES:
        raise ValueError(
            f"the number of text classes C must be in [{MIN_CLASSES}, {MAX_CLASSES}], got {C}"
        )
    if isinstance(temperature, torch.Tensor):
        raise TypeError("temperature must be a Python float, not a tensor (call .item())")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a probability and must be in [0, 1], got {threshold}")


def patch_text_labels(
    patches: torch.Tensor,
    text: torch.Tensor,
    temperature: float,
    *,
    threshold: float | None = None,
    return_probs: bool = False,
    backend: str = "auto",
) -> PatchLabels:
    """Label every patch with its most similar text prompt, reading the patches once.

    probs[b, n] = softmax_c(cos(patches[b, n], text[c]) / temperature).

    Args:
        patches: (B, N, D) dense image features, fp32, bf16 or fp16 (fp64 runs the
            reference); any strides.
        text: (C, D) class embeddings (normalised inside), 2 <= C <= 64, the same dtypes.
        temperature: positive float; CLIP uses 1 / logit_scale.exp() (about 0.01).
        threshold: labels whose max probability is below it become -1; None keeps all.
            A patch whose probabilities are not finite (a NaN or infinite feature, or a
            non-finite text row, which reaches every patch) gets label -1, confidence NaN
            and NaN probabilities, with or without a threshold.
        return_probs: also return the (B, N, C) probabilities.
        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1; the reference for
            fp64), "triton" or "reference".
    Returns:
        PatchLabels(labels (B, N) int64, confidence (B, N) fp32, probs (B, N, C) fp32 or None).
        Inference only: no gradient flows back to patches or text. Autocast does not apply:
        both backends compute from the inputs as given.
    """
    _check_inputs(patches, text, temperature, threshold)
    patches, text = patches.detach(), text.detach()
    if not use_triton("patch_text_labels", backend, patches=patches, text=text):
        with torch.autocast(patches.device.type, enabled=False):
            return reference.patch_text_labels(
                patches, text, temperature, threshold=threshold, return_probs=return_probs
            )
    labels, confidence, probs = _patch_text_labels_op(
        patches,
        text,
        float(temperature),
        0.0 if threshold is None else float(threshold),
        threshold is not None,
        return_probs,
    )
    return PatchLabels(labels, confidence, probs if return_probs else None)
