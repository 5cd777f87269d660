"""Atomic file writes: the one way this package writes a file that a kill must not tear.

Every writer goes to `<path>.tmp-<pid>` beside the target and renames it over the target
when done, so a kill at any moment leaves the old file or the new one, never a torn one.
The final file gets the permissions a plain `open(path, "w")` would give under the current
umask, whatever the writing library chose for its temporary file.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Iterator
from typing import Any

TMP_MARK = ".tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str, *, durable: bool = False, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path to write; on a clean exit it is renamed over `path`.

    durable: fsync the file and its directory, so the new file survives a power cut too.
    suffix: appended to the temporary name, for writers that pick a format by extension.
    On an error the temporary file is removed and `path` is left as it was.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}{TMP_MARK}{os.getpid()}{suffix}"
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_directory(directory)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", *, durable: bool = False, **kwargs) -> Iterator:
    """`open(path, mode)` whose content replaces `path` only when the block succeeds."""
    with atomic_path(path, durable=durable) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_json(path: str, value: Any, *, indent: int | None = 1) -> None:
    with atomic_open(path, "w") as f:
        json.dump(value, f, indent=indent)
        f.write("\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(path: str) -> list[str]:
    """Delete `<path>.tmp-<pid>*` files left by writers that were killed (their process is
    gone); returns what was removed. A live writer's temporary is left alone."""
    removed = []
    for tmp in glob.glob(glob.escape(path) + TMP_MARK + "*"):
        digits = tmp[len(path) + len(TMP_MARK) :].split(".", 1)[0]
        if digits.isdigit() and (int(digits) == os.getpid() or not _alive(int(digits))):
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            removed.append(tmp)
    return removed
