"""`clasp export`: the student backbone of a training checkpoint as a safetensors file.

    clasp export --checkpoint runs/demo/checkpoint.pt --out clasp-demo.safetensors [--task reid]

The file holds timm VisionTransformer weight names for the dense parts, the PC-MoE router
and expert weights and the task prompts, and the model config in its metadata (see
`clasp.model.io`); a student trained with `loss.image_text` keeps its image-text head and
the name of its text teacher beside them (for `clasp eval text-search`). Load it with
`clasp.load_backbone(path, task=...)`; a plain timm ViT takes its dense weights through
`clasp.model.timm_state_dict(path)`.
"""

from __future__ import annotations

import argparse
import json
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (checkpoint.pt)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument(
        "--weights",
        choices=("student", "teacher"),
        default="student",
        help="export the student (default) or the EMA teacher backbone",
    )
    parser.add_argument(
        "--task",
        default=None,
        help="default task of the exported backbone: a task name or a JSON mix like "
        '\'{"reid": 0.7, "attributes": 0.3}\' (default: generic)',
    )


def parse_task(text: str | None):
    if text is None or not text.strip().startswith("{"):
        return text
    try:
        return {str(k): float(v) for k, v in json.loads(text).items()}
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(
            f"--task {text!r} is not a JSON mix of task weights like "
            f'\'{{"reid": 0.7, "attributes": 0.3}}\' ({error})'
        ) from None


def main(args: argparse.Namespace) -> int:
    # A missing, damaged or mismatched checkpoint, or an output that cannot be written,
    # raises; `clasp.cli` says it in one line.
    from clasp.model import ImageTextHead, load_backbone, save_backbone
    from clasp.model.io import is_safetensors, read_checkpoint, read_head, read_metadata

    from .captions import text_teacher_source

    task = parse_task(args.task)
    path = args.checkpoint
    # A training checkpoint is read once for the backbone, its head and its config.
    read = (
        {}
        if not os.path.isfile(path) or is_safetensors(path)
        else {"checkpoint": read_checkpoint(path)}
    )
    backbone = load_backbone(path, task, weights=args.weights, **read)
    head = read_head(path, "image_text", weights=args.weights, **read)
    metadata = {"source": args.checkpoint, "weights": args.weights}
    heads = {}
    if head is not None:
        heads["image_text"] = ImageTextHead.from_state_dict(head)
        name, pretrained = text_teacher_source(read_metadata(path, **read)["training_config"])
        metadata["text_teacher"] = {"teacher": name, "pretrained": pretrained}
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        os.makedirs(parent)
        print(f"created {parent}")
    save_backbone(backbone, args.out, default_task=task, metadata=metadata, heads=heads)
    n = sum(p.numel() for p in backbone.parameters())
    print(
        f"wrote {args.out}: {args.weights} backbone, {n / 1e6:.2f}M parameters, "
        f"{len(backbone.moe_blocks)} PC-MoE block(s), tasks {list(backbone.tasks)}"
        + (", with its image-text head" if heads else "")
    )
    return 0
