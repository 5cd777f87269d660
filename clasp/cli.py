"""The `clasp` command line. Each subcommand lives in its own module, which provides
`add_arguments(parser)` and `main(args) -> int | None`; modules import lazily so
`clasp --help` stays fast.

Errors: every command runs inside one wrapper (`run_command`) that turns a user's error into
one line on stderr and exit status 2: the errors clasp raises on purpose (its own error
types, and ValueError / KeyError / TypeError / OSError / RuntimeError that a `raise` in
clasp's own code raised) and the operating system's answers about the user's files (no
space left, permission denied, read-only file system, no such file). Anything else is a bug
and keeps its traceback; `CLASP_DEBUG=1` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import linecache
import os
import re
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("clasp.data.synthetic", "generate a synthetic pedestrian set with full ground truth"),
    "label": ("clasp.teacher.labeling", "label an image folder with the CLIP teacher into a cache"),
    "pretrain": ("clasp.train.pretrain", "pre-train a PC-MoE ViT backbone (DDP under torchrun)"),
    "export": ("clasp.train.export", "export a checkpoint's backbone to a safetensors file"),
    "eval": ("clasp.eval.cli", "evaluate frozen features: re-ID, attributes, parsing, pose"),
    "finetune": ("clasp.finetune.cli", "fine-tune a backbone: re-ID, attributes, parsing, pose"),
    "teacher": ("clasp.teacher.cli", "fit a small open_clip teacher offline (clasp teacher fit)"),
    "demo": (
        "clasp.demo.cli",
        "the whole method end to end on a synthetic set, with a results table",
    ),
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


DEBUG_ENV = "CLASP_DEBUG"
# errno -> what it means for the user and what to do
OS_ADVICE = {
    errno.ENOSPC: "no space left on the device: free some space or write somewhere else",
    errno.EDQUOT: "disk quota exceeded: free some space or write somewhere else",
    errno.EROFS: "the file system is read-only: choose a folder on a writable one",
    errno.EACCES: "permission denied: choose a folder you may write, or change its permissions",
    errno.EPERM: "operation not permitted: choose another folder, or change its permissions",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "it is a folder, not a file: pass a file",
    errno.EEXIST: "it exists already: remove it or choose another name",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
}
RAISED_ON_PURPOSE = (ValueError, KeyError, TypeError, OSError, RuntimeError)


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def _raised_by_clasp(error: BaseException) -> bool:
    """Whether a `raise` statement of clasp's own code raised the error (the innermost frame
    of its traceback), rather than a failing call such as `int(text)` or a torch op."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    if str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0] != "clasp":
        return False
    line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno)
    return line.lstrip().startswith("raise")


def _os_error_number(error: BaseException) -> int | None:
    """The errno of an OSError, or of a library error that quotes one ("(os error 28)")."""
    if isinstance(error, OSError):
        return error.errno
    found = re.search(r"\(os error (\d+)\)", str(error))
    return int(found.group(1)) if found else None


def user_error_message(error: BaseException) -> str | None:
    """The one line for an error a user can fix, or None for a bug (see the module doc)."""
    from clasp.atomic import TMP_MARK

    number = _os_error_number(error)
    if number in OS_ADVICE:
        name = getattr(error, "filename", None)
        if name is not None:
            name = os.fspath(name)
            if TMP_MARK in os.path.basename(name):  # an atomic write's temporary
                name = name[: name.rindex(TMP_MARK)]
        return f"{name}: {OS_ADVICE[number]}" if name else OS_ADVICE[number]
    own_type = type(error).__module__.split(".")[0] == "clasp"
    if own_type or (isinstance(error, RAISED_ON_PURPOSE) and _raised_by_clasp(error)):
        if isinstance(error, KeyError) and error.args:  # str() of a KeyError quotes it
            return str(error.args[0])
        return str(error) or type(error).__name__
    return None


def run_command(name: str, handler, args: argparse.Namespace) -> int:
    """Run a command's main; a user's error becomes one line `clasp NAME: ...` and exit 2."""
    try:
        return handler(args) or 0
    except Exception as error:
        message = user_error_message(error)
        if message is None or debug():
            raise
        print(f"clasp {name}: {message}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return run_command(args.command, args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
