"""The `clasp` command line. Each subcommand lives in its own module, which provides
`add_arguments(parser)` and `main(args) -> int | None`; modules import lazily so
`clasp --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("clasp.data.synthetic", "generate a synthetic pedestrian set with full ground truth"),
    "label": ("clasp.teacher.labeling", "label an image folder with the CLIP teacher into a cache"),
    "pretrain": ("clasp.train.pretrain", "pre-train a PC-MoE ViT backbone (DDP under torchrun)"),
    "export": ("clasp.train.export", "export a checkpoint's backbone to a safetensors file"),
    "eval": ("clasp.eval.cli", "evaluate frozen features: re-ID, attributes, parsing, pose"),
    "finetune": ("clasp.finetune.cli", "fine-tune a backbone: re-ID, attributes, parsing, pose"),
    "teacher": ("clasp.teacher.fit", "fit a small open_clip teacher offline (clasp teacher fit)"),
    "demo": ("clasp.demo", "the whole method end to end on a synthetic set, with a results table"),
}


def main_version(args: argparse.Namespace) -> int:
    import torch

    from clasp import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"clasp-triton {__version__}\ntorch {torch.__version__}\ntriton {triton_version}\n{cuda}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clasp",
        description="CLASP pre-training of human-centric vision backbones with Triton kernels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("version", help="print the versions of clasp, torch and triton").set_defaults(
        handler=main_version
    )
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(command)
        command.set_defaults(handler=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args) or 0


if __name__ == "__main__":
    sys.exit(main())
