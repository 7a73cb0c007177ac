"""Cache of a node's activations at the boundary of the frozen part of the model.

In the head phase only the two Dense layers train, on pooled features the
frozen backbone computes identically every round; in the fine-tune phase (conv5
unfrozen) everything before conv5 is frozen, so its output is fixed too. A node
computes those activations once, keyed by everything that determines them (the
frozen layers' weights, the images, the input size, the boundary, this code's
version), and later rounds train only what lies after the boundary: far less
compute, and in a deployment's fresh ClientApp process a far smaller model to
trace. A changed frozen part or data gives another key, so a stale entry is
never used.

Entries live in memory (simulation: the Ray actor process serves every round)
and, given a folder, on disk as well (deployment: each message starts a new
ClientApp process). Both are bounded; the least recently used entries go first.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import keras
import numpy as np
from flwr.app import ArrayRecord

# Part of every key: bump when preprocessing or the backbone's code changes meaning.
FEATURE_VERSION = f"1/keras-{keras.__version__}"


def feature_key(frozen: str, images: np.ndarray, input_size: int, boundary: str = "pooled") -> str:
    """A digest of everything the activations of ``images`` at ``boundary`` depend on.

    ``frozen`` names the weights of the layers before the boundary (``frozen_digest``).
    """
    digest = hashlib.blake2b(digest_size=20)
    header = f"{FEATURE_VERSION}|{frozen}|{boundary}|{input_size}|{images.dtype}|{images.shape}"
    digest.update(header.encode())
    digest.update(np.ascontiguousarray(images).data)
    return digest.hexdigest()


def frozen_digest(arrays: ArrayRecord, frozen_keys: Iterable[str]) -> str:
    """A digest of the named arrays (the frozen layers' weights), in key order."""
    digest = hashlib.blake2b(digest_size=20)
    digest_arrays(digest, arrays, sorted(frozen_keys))
    return digest.hexdigest()


def digest_arrays(digest: Any, arrays: ArrayRecord, keys: Iterable[str]) -> None:
    """Feed the named arrays, with their keys, into a ``hashlib`` digest."""
    for key in keys:
        # The serialised bytes carry dtype and shape too; no need to decode them.
        digest.update(key.encode())
        digest.update(arrays[key].data)


class FeatureCache:
    """Features by key, in memory and optionally in a folder, each within ``max_bytes``.

    Parameters
    ----------
    max_bytes : int
        Bound on the folder's entry files and, unless ``memory_bytes`` is given,
        separately on the memory entries.
    folder : Path or None
        Where entries persist across processes; ``None`` keeps them in memory only.
    memory_bytes : int, optional
        Bound on the memory entries.

    Subclasses store other values by overriding ``SUFFIX``, ``_read``,
    ``_write`` and ``_size``.
    """

    SUFFIX = ".npy"

    def __init__(
        self, max_bytes: int, folder: Path | None = None, memory_bytes: int | None = None
    ) -> None:
        self.max_bytes = max_bytes
        self.memory_bytes = max_bytes if memory_bytes is None else memory_bytes
        self.folder = Path(folder).expanduser() if folder is not None else None
        self._memory: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str) -> Any | None:
        """The entry stored under ``key``, or ``None``."""
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        if self.folder is None:
            return None
        path = self.folder / f"{key}{self.SUFFIX}"
        try:
            value = self._read(path)
        except (OSError, ValueError, zipfile.BadZipFile):  # absent, or unreadable
            # An unreadable entry goes, so that the next put writes it afresh.
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # mark as recently used for eviction
        self._remember(key, value)
        return value

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` (skipped when larger than the whole budget)."""
        if self._size(value) > max(self.max_bytes, self.memory_bytes):
            return
        self._remember(key, value)
        if self.folder is None:
            return
        path = self.folder / f"{key}{self.SUFFIX}"
        try:
            # Keys name their content: an entry already on disk is this value. (Every
            # virtual node of a simulation stores the same 95 MB base, for one.)
            os.utime(path)
            return
        except FileNotFoundError:
            pass
        self.folder.mkdir(parents=True, exist_ok=True)
        # Write then rename: a process killed mid-write leaves no half entry behind.
        partial = self.folder / f".{key}.{os.getpid()}.partial{self.SUFFIX}"
        self._write(partial, value)
        os.replace(partial, path)
        files = sorted(self.folder.glob(f"*{self.SUFFIX}"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for old in files:
            if total <= self.max_bytes:
                break
            total -= old.stat().st_size
            old.unlink(missing_ok=True)

    def _read(self, path: Path) -> np.ndarray:
        return np.load(path)

    def _write(self, path: Path, value: np.ndarray) -> None:
        np.save(path, value)

    def _size(self, value: np.ndarray) -> int:
        return value.nbytes

    def _remember(self, key: str, value: Any) -> None:
        self._memory[key] = value
        self._memory.move_to_end(key)
        while sum(self._size(v) for v in self._memory.values()) > self.memory_bytes:
            self._memory.popitem(last=False)
