"""The `clasp eval` subcommands that read text through a CLIP teacher's text tower
(registered by `clasp.eval.cli`); the JSON result is printed last.

    clasp eval zeroshot    --teacher NAME|DIR [--pretrained TAG|FILE] --data DIR
                           --format peta|market|synth [--split SPLIT] [--focus F]
    clasp eval text-search --checkpoint CKPT --data DIR --format synth|cuhk-pedes
                           [--teacher NAME|DIR [--pretrained TAG|FILE]] [--projection auto]

zeroshot scores the teacher's attribute prompts with no training, plain and subject-guided
(`clasp.eval.zeroshot`), on the held-out split of the attribute protocol by default.
text-search ranks test images for test captions (`clasp.eval.text_search`) with the
backbone's image-text head when it has one (`--teacher` defaults to the text tower it was
trained against), else with a linear probe fitted on the train split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from clasp import RANDOM_WEIGHTS

from .report import json_ready

ZEROSHOT_SPLITS = {"synth": "test", "peta": "test", "market": "gallery"}
COMMANDS = ("zeroshot", "text-search")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_parsers(sub) -> None:
    """Add the zeroshot and text-search parsers to `clasp eval`'s subparsers."""
    p = sub.add_parser("zeroshot", help="zero-shot attributes from the teacher's prompts (mA)")
    p.add_argument("--teacher", required=True, help="open_clip model name or teacher folder")
    p.add_argument("--pretrained", default=None, help="pretrained tag or weights file")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--format", required=True, choices=sorted(ZEROSHOT_SPLITS))
    p.add_argument("--split", default=None, help="split to score (default: the held-out one)")
    p.add_argument("--prompts", default=None, help="prompts YAML (default: the packaged one)")
    p.add_argument(
        "--focus", type=float, default=None,
        help="strength of the subject guidance: heatmap ** focus (default 1; 0 = plain)",
    )  # fmt: skip
    p.add_argument("--sigma", type=float, default=1.0, help="keypoint limb width in cells")
    p.add_argument("--dense", choices=("maskclip", "plain"), default="maskclip")
    p.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto")
    _shared(p)
    p = sub.add_parser("text-search", help="text-based person search (rank-1, mAP)")
    p.add_argument(
        "--checkpoint", required=True,
        help=f"exported .safetensors, training checkpoint, or {RANDOM_WEIGHTS}",
    )  # fmt: skip
    p.add_argument("--config", default=None, help=f"model/training YAML (for {RANDOM_WEIGHTS})")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--format", required=True, choices=("synth", "cuhk-pedes"))
    p.add_argument(
        "--teacher", default=None,
        help="text tower: open_clip model name or teacher folder (default: the one the "
        "backbone's image-text head was trained against)",
    )  # fmt: skip
    p.add_argument("--pretrained", default=None, help="pretrained tag or weights file")
    p.add_argument(
        "--projection", choices=("auto", "head", "probe"), default="auto",
        help="images into the text space: the image-text head (auto: when there is one) or "
        "a linear probe fitted on the train split",
    )  # fmt: skip
    p.add_argument("--task", default=None, help="prompt: a task name or a mix like reid=0.5")
    p.add_argument("--weights", choices=("student", "teacher"), default="student")
    p.add_argument("--l2", type=float, default=1e-3, help="L2 strength of the probe")
    p.add_argument("--seed", type=int, default=0, help=f"initialisation seed for {RANDOM_WEIGHTS}")
    _shared(p)


def _shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-images", type=int, default=None, help="evenly spaced subset of splits")
    p.add_argument("--workers", type=int, default=0, help="image decoding processes")
    p.add_argument("--device", default=_device())


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    from clasp.teacher.loading import TeacherLoadError

    name = f"clasp eval {args.protocol}"
    try:
        result = zeroshot(args) if args.protocol == "zeroshot" else text_search(args)
    except TeacherLoadError as error:
        print(f"{name}: cannot load the teacher: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError) as error:
        reason = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"{name}: {reason}", file=sys.stderr)
        return 2
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(json_ready(result)))
    return 0


def zeroshot(args: argparse.Namespace) -> dict:
    from clasp.teacher.loading import load_teacher
    from clasp.vocabulary import load_prompts

    from .protocols import SetLoader
    from .zeroshot import DEFAULT_FOCUS, evaluate_zero_shot

    prompts = load_prompts(args.prompts)
    teacher = load_teacher(args.teacher, args.pretrained, device=args.device, dense=args.dense)
    split = args.split or ZEROSHOT_SPLITS[args.format]
    loader = SetLoader(teacher.image_size, max_images=args.max_images, workers=args.workers)
    prepared = loader.prepared(args.format, args.data, split)
    focus = DEFAULT_FOCUS if args.focus is None else args.focus
    result = evaluate_zero_shot(
        teacher, prepared, args.format, prompts, focus=focus, sigma=args.sigma,
        batch_size=args.batch_size, backend=args.backend,
    )  # fmt: skip
    for variant, scores in result["variants"].items():
        metrics = scores["metrics"]
        print(
            f"zeroshot [{variant}] on {args.format}:{split} ({len(prepared)} images): "
            f"mA={100 * metrics['mA']:.2f} instance_f1={100 * metrics['instance_f1']:.2f}"
        )
    return {
        "protocol": "zeroshot", "format": args.format, "data": args.data, "split": split,
        "teacher": teacher.description, **result,
    }  # fmt: skip


def text_search(args: argparse.Namespace) -> dict:
    from clasp.model import ImageTextHead
    from clasp.model.io import read_head, read_metadata
    from clasp.teacher.loading import load_teacher
    from clasp.train.captions import text_teacher_source

    from .features import FeatureBank, load_encoder, parse_task
    from .protocols import SetLoader
    from .text_search import evaluate_text_search

    encoder = load_encoder(
        args.checkpoint, args.config, seed=args.seed, weights=args.weights, device=args.device
    )
    head, recorded = None, (None, None)
    state = None
    if args.checkpoint != RANDOM_WEIGHTS:
        state = read_head(args.checkpoint, "image_text", weights=args.weights)
    if state is not None:  # the text tower it was trained against is the default
        meta = read_metadata(args.checkpoint)
        if "training_config" in meta:
            recorded = text_teacher_source(meta["training_config"])
        else:
            source = meta.get("text_teacher") or {}
            recorded = source.get("teacher"), source.get("pretrained")
        if args.projection != "probe":
            head = ImageTextHead.from_state_dict(state).to(args.device)
    if args.projection == "head" and head is None:
        raise ValueError(
            f"{args.checkpoint} has no image-text head (pre-train with loss.image_text, or use "
            "--projection probe)"
        )
    teacher_name, pretrained = (args.teacher, args.pretrained) if args.teacher else recorded
    if not teacher_name:
        raise ValueError(
            "text search needs a text tower: pass --teacher NAME|DIR (and --pretrained for a "
            "model name)"
        )
    teacher = load_teacher(teacher_name, pretrained, device=args.device)
    if head is not None and head.text_dim != teacher.model.text_projection.shape[-1]:
        raise ValueError(
            f"the image-text head projects to {head.text_dim}-d, the teacher {teacher_name} "
            "embeds text in another width; pass the teacher it was trained against"
        )
    bank = FeatureBank(encoder, batch_size=args.batch_size, device=args.device)
    loader = SetLoader(bank.size, max_images=args.max_images, workers=args.workers)
    result = evaluate_text_search(
        bank, loader, args.format, args.data, teacher.encode_text, head=head,
        task=parse_task(args.task), l2=args.l2,
    )  # fmt: skip
    metrics = result["metrics"]
    print(
        f"text-search [{result['task']}, {result['projection']}] on {args.format} "
        f"({result['sets']['queries']} captions, {result['sets']['gallery']} images): "
        + " ".join(f"{k}={100 * metrics[k]:.2f}" for k in ("rank1", "rank5", "rank10", "mAP"))
    )
    return {"checkpoint": args.checkpoint, "teacher": teacher.description, **result}
