"""The label cache: teacher pseudo-labels stored in shards, keyed by image content hash.

Layout of a cache folder:
    meta.json         what produced the labels: teacher (its description and a sha256 of its
                      weights), prompts, grid, dense mode, temperature, threshold. A run with
                      other settings, or another teacher's weights, is refused.
    lock              held (flock) by the one writer at a time; holds its pid.
    manifest.json     the finished shards, in order. Rewritten (atomically) after each shard.
    shards/shard-NNNNNN.safetensors
                      parts (n, gh, gw) int8, part_confidence (n, gh, gw) fp16,
                      attributes (n, A) fp32; its metadata holds the n sha256 keys and the
                      unreadable files met in that shard.

Every file is written through `clasp.atomic` (a temporary beside it, fsynced and renamed
into place), and a shard counts only once the manifest names it: a run killed at any point
leaves a readable cache, and the next run removes the temporaries and continues with the
first unfinished shard. One labeler writes to a cache at a time: a second one waits for the
lock, then reads the manifest the first left and adds what is still missing. Any number of
readers may use the cache meanwhile.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections import OrderedDict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clasp.atomic import TMP_MARK, atomic_open, atomic_path

log = logging.getLogger("clasp.teacher")

FORMAT_VERSION = 1
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
SHARD_DIR = "shards"
LOCK_FILE = "lock"
# Settings that change the labels: a cache built with different values is refused. The
# teacher is identified by its weights ("teacher" is only their description, which names
# a folder or file that may hold other weights by now).
SIGNATURE_KEYS = (
    "format",
    "teacher_weights",
    "dense",
    "prompts",
    "image_size",
    "grid_size",
    "temperature",
    "threshold",
)


class CacheMismatchError(ValueError):
    """The cache folder holds labels made with other settings than this run's."""


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes: the key of its labels in the cache."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: str, obj) -> None:
    # durable: a shard is only found through the manifest, which must survive a power cut
    with atomic_open(path, "w", durable=True) as f:
        json.dump(obj, f, indent=1)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


class LabelCacheWriter:
    """Appends shards to a cache folder, creating it or checking that it matches `meta`.

    Holds the cache's lock from construction to `close()` (or the end of a `with` block):
    a second writer waits for it. overwrite: start the cache over, removing its labels
    (meta.json, manifest.json and shards/; nothing else in the folder) instead of refusing
    one made with other settings."""

    def __init__(self, root: str, meta: dict, *, overwrite: bool = False):
        self.root = root
        meta = {"format": FORMAT_VERSION, **meta}
        os.makedirs(os.path.join(root, SHARD_DIR), exist_ok=True)
        self._lock = _acquire(os.path.join(root, LOCK_FILE))
        try:
            self._open(meta, overwrite)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the lock; the writer writes nothing more."""
        if self._lock is not None:
            self._lock.close()  # closing the file releases its flock
            self._lock = None

    def __enter__(self) -> LabelCacheWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self, meta: dict, overwrite: bool) -> None:
        root = self.root
        meta_path = os.path.join(root, META_FILE)
        if overwrite:
            self._remove_labels()
        if os.path.exists(meta_path):
            check_compatible(_read_json(meta_path), meta, root)
        else:
            _write_json(meta_path, meta)
        self._remove_temporaries()
        manifest_path = os.path.join(root, MANIFEST_FILE)
        self.manifest = (
            _read_json(manifest_path) if os.path.exists(manifest_path) else {"shards": []}
        )
        self.done: set[str] = set()
        self.failed: dict[str, list[str]] = {}
        for entry in self.manifest["shards"]:
            keys, failed = _shard_keys(os.path.join(root, SHARD_DIR, entry["file"]))
            self.done.update(keys)
            self.failed.update(failed)

    def _remove_labels(self) -> None:
        """Empty the cache: the manifest first, so a kill midway leaves an empty cache."""
        for name in (MANIFEST_FILE, META_FILE):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.root, name))
        shards = os.path.join(self.root, SHARD_DIR)
        for name in os.listdir(shards):
            if name.startswith("shard-") and name.endswith(".safetensors"):
                os.remove(os.path.join(shards, name))

    def _remove_temporaries(self) -> None:
        """Drop the half-written files of a killed run (this writer holds the lock)."""
        for folder in (self.root, os.path.join(self.root, SHARD_DIR)):
            for name in os.listdir(folder):
                if TMP_MARK in name:
                    os.remove(os.path.join(folder, name))

    def write_shard(
        self,
        keys: list[str],
        parts: torch.Tensor,
        part_confidence: torch.Tensor,
        attributes: torch.Tensor,
        failed: dict[str, list[str]],
    ) -> str:
        """Store one shard: n labelled images (keys in row order) and the unreadable files
        met among them ({sha256: [path, reason]}), then record it in the manifest."""
        if not (len(keys) == len(parts) == len(part_confidence) == len(attributes)):
            raise ValueError("keys, parts, part_confidence and attributes differ in length")
        name = f"shard-{len(self.manifest['shards']):06d}.safetensors"
        tensors = {
            "parts": parts.to(torch.int8).contiguous(),
            "part_confidence": part_confidence.to(torch.float16).contiguous(),
            "attributes": attributes.to(torch.float32).contiguous(),
        }
        metadata = {"keys": json.dumps(keys), "failed": json.dumps(failed)}
        path = os.path.join(self.root, SHARD_DIR, name)
        with atomic_path(path, durable=True) as tmp:
            save_file(tensors, tmp, metadata=metadata)
        entry = {"file": name, "images": len(keys), "unreadable": len(failed)}
        manifest = {"shards": [*self.manifest["shards"], entry]}
        _write_json(os.path.join(self.root, MANIFEST_FILE), manifest)
        self.manifest = manifest
        self.done.update(keys)
        self.failed.update(failed)
        return path


def _acquire(path: str):
    """The lock file at path, opened and locked (flock) for this writer, with our pid in it.
    Waits, saying so, while another process holds it. The kernel releases the lock when the
    file closes or the process dies, so a killed writer never leaves a stale lock."""
    lock = open(path, "a+")  # held until the writer closes
    try:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            if holder == str(os.getpid()):
                raise RuntimeError(
                    f"this process already writes the label cache {os.path.dirname(path)}; "
                    "close that LabelCacheWriter first"
                ) from None
            log.warning(
                "the label cache %s is being written by another labeler (pid %s): waiting "
                "for it to finish, then adding what it left unlabelled",
                os.path.dirname(path), holder,
            )  # fmt: skip
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
    except BaseException:
        lock.close()
        raise
    return lock


def _shard_keys(path: str) -> tuple[list[str], dict[str, list[str]]]:
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    return json.loads(metadata["keys"]), json.loads(metadata["failed"])


def check_compatible(stored: dict, wanted: dict, root: str) -> None:
    """Raise CacheMismatchError naming what differs when `stored` (the cache's meta) and
    `wanted` (this run's) would give other labels: another teacher, or other settings."""
    way_out = (
        "Write to a new --out folder, or pass --overwrite to start this cache over "
        "(its labels are removed)."
    )
    if stored.get("teacher_weights") != wanted.get("teacher_weights"):
        raise CacheMismatchError(
            f"the label cache at {root} was made with another teacher: the cache's is "
            f"{_teacher(stored)}, this run's is {_teacher(wanted)}. {way_out}"
        )
    differences = [
        f"{key}: cache has {_short(stored.get(key))}, this run has {_short(wanted.get(key))}"
        for key in SIGNATURE_KEYS
        if stored.get(key) != wanted.get(key)
    ]
    if differences:
        raise CacheMismatchError(
            f"the label cache at {root} was built with other settings ("
            + "; ".join(differences)
            + f"). {way_out}"
        )


def _teacher(meta: dict) -> str:
    weights = meta.get("teacher_weights")
    digest = f"weights {weights[:19]}..." if weights else "weights not recorded"
    return f"{meta.get('teacher', 'unknown')} ({digest})"


def _short(value, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "..."


class LabelCache:
    """Read access to a label cache, for training loaders.

    `get(sha256_hex)` returns None or a dict with
        parts: (gh, gw) int64 part index per patch-grid cell over the whole image, -1 where
               the teacher's confidence was under the threshold;
        part_confidence: (gh, gw) fp32 teacher probability of that part;
        attributes: (A,) fp32 soft probabilities, a distribution per attribute group, in
               `attribute_names` order.
    Grid cell (i, j) covers image rows [i*H/gh, (i+1)*H/gh) and columns [j*W/gw, (j+1)*W/gw).
    """

    def __init__(self, path: str, max_open_shards: int = 16):
        self.path = path
        meta_path, manifest_path = (os.path.join(path, f) for f in (META_FILE, MANIFEST_FILE))
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"no label cache at {path} (missing {META_FILE})")
        self.meta = _read_json(meta_path)
        if self.meta.get("format") != FORMAT_VERSION:
            raise CacheMismatchError(
                f"label cache {path} has format {self.meta.get('format')}, this version reads "
                f"{FORMAT_VERSION}; relabel with `clasp label`"
            )
        manifest = _read_json(manifest_path) if os.path.exists(manifest_path) else {"shards": []}
        self._files = [os.path.join(path, SHARD_DIR, e["file"]) for e in manifest["shards"]]
        self._where: dict[str, tuple[int, int]] = {}
        self.unreadable: dict[str, list[str]] = {}
        for shard, file in enumerate(self._files):
            keys, failed = _shard_keys(file)
            self._where.update({key: (shard, row) for row, key in enumerate(keys)})
            self.unreadable.update(failed)
        self._open: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._max_open = max_open_shards

    @property
    def part_names(self) -> list[str]:
        return list(self.meta["part_names"])

    @property
    def attribute_names(self) -> list[str]:
        return list(self.meta["attribute_names"])

    @property
    def group_sizes(self) -> list[int]:
        return list(self.meta["group_sizes"])

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.meta["grid_size"])

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, sha256_hex: str) -> bool:
        return sha256_hex in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def _shard(self, index: int) -> dict[str, torch.Tensor]:
        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        with safe_open(self._files[index], framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        self._open[index] = tensors
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return tensors

    def get(self, sha256_hex: str) -> dict[str, torch.Tensor] | None:
        where = self._where.get(sha256_hex)
        if where is None:
            return None
        shard = self._shard(where[0])
        row = where[1]
        return {
            "parts": shard["parts"][row].long(),
            "part_confidence": shard["part_confidence"][row].float(),
            "attributes": shard["attributes"][row].clone(),
        }
