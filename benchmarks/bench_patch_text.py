"""Patch-to-text labeling: the fused kernel against eager and torch.compile, and the whole
teacher pass (ViT forward + labeling) in images/s with the fused kernel or the eager path.

On a CPU the Triton backend is not timed, and the teacher's "auto" labeling path is the eager
reference anyway (the interpreter is no speed target), so only the eager rows exist there.
"""

import pytest
import torch
from clasp.kernels import patch_text_labels, reference
from harness import cases

CUDA = torch.cuda.is_available()
# (B, N, D, C): the shapes on CUDA, a small one on the CPU.
KERNEL_SHAPES = (
    [(256, 196, d, c) for d in (512, 768) for c in (7, 20)] if CUDA else [(16, 196, 512, 7)]
)
THRESHOLD = 0.3
TEMPERATURE = 0.01


@pytest.mark.parametrize(
    "shape,mode,backend", cases(KERNEL_SHAPES, modes=("labels", "labels+probs"))
)
def test_patch_text_labels(shape, mode, backend, device, measure):
    B, N, D, C = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    patches = torch.randn(B, N, D, device=device, dtype=dtype)
    text = torch.randn(C, D, device=device, dtype=dtype)
    probs = mode == "labels+probs"
    fn = {
        "triton": lambda p, t: patch_text_labels(
            p, t, TEMPERATURE, threshold=THRESHOLD, return_probs=probs, backend="triton"
        ),
        "eager": lambda p, t: reference.patch_text_labels(
            p, t, TEMPERATURE, threshold=THRESHOLD, return_probs=probs
        ),
    }
    fn["compile"] = torch.compile(fn["eager"])
    run = fn[backend]
    # One read of the patches, the labels (int64) and confidences (fp32), and the probs.
    moved = patches.numel() * patches.element_size() + B * N * (8 + 4 + (4 * C if probs else 0))
    measure(
        lambda: run(patches, text),
        op="patch_text_labels",
        mode=mode,
        backend=backend,
        shape=dict(B=B, N=N, D=D, C=C),
        dtype=dtype,
        bytes=moved,
    )


def vit_forward_flops(visual, images: int) -> float:
    """Matmul FLOPs of a VisionTransformer forward: patch embedding, attention projections,
    attention scores and values, MLP, output projection."""
    width = visual.conv1.out_channels
    patch = visual.conv1.kernel_size[0] * visual.conv1.kernel_size[1]
    tokens = visual.grid_size[0] * visual.grid_size[1] + 1
    block = visual.transformer.resblocks[0]
    hidden = block.mlp.c_fc.out_features
    per_block = 2 * tokens * (4 * width * width + 2 * width * hidden) + 4 * tokens * tokens * width
    embed = 2 * (tokens - 1) * width * 3 * patch
    head = 2 * tokens * width * visual.proj.shape[1]
    return images * (embed + len(visual.transformer.resblocks) * per_block + head)


TEACHER = {"cuda": ("ViT-B-16", 256), "cpu": ("ViT-B-16", 2)}


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_teacher_label_throughput(backend, device, measure):
    from clasp.teacher import load_prompts, load_teacher

    name, batch = TEACHER[device.type]
    teacher = load_teacher(name, "random", device=device)
    text = teacher.text_embeddings(load_prompts())
    images = torch.randint(0, 256, (batch, 3, *teacher.image_size), dtype=torch.uint8)
    images = images.to(device)
    kernel_backend = "triton" if backend == "triton" else "reference"
    run = lambda: teacher.label(images, text, threshold=THRESHOLD, backend=kernel_backend)
    entry = measure(
        run,
        op="teacher_label",
        mode="maskclip",
        backend=backend,
        shape=dict(model=name, images=batch, H=teacher.image_size[0]),
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        flops=vit_forward_flops(teacher.model.visual, batch),
    )
    entry["images_per_s"] = batch / (entry["median_ms"] / 1e3)
    measure.update(entry)
