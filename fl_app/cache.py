"""Content-keyed stores: bounded, least-recently-used, in memory and optionally on disk.

Keys name their content (digests of everything a value depends on), so an
entry never goes stale: a changed input gives another key. On disk, entries
survive across processes, such as the fresh ClientApp process a deployed
SuperNode starts for every message.
"""

from __future__ import annotations

import os
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

from flwr.app import ArrayRecord


class Codec(NamedTuple):
    """How a store keeps one kind of value in a file, and how big a value is."""

    suffix: str
    read: Callable[[Path], Any]
    write: Callable[[Path, Any], None]
    size: Callable[[Any], int]


def digest_arrays(digest: Any, arrays: ArrayRecord, keys: Iterable[str]) -> None:
    """Feed the named arrays, with their keys, into a ``hashlib`` digest."""
    for key in keys:
        # The serialised bytes carry dtype and shape too; no need to decode them.
        digest.update(key.encode())
        digest.update(arrays[key].data)


class Store:
    """Values by key, in memory and optionally in a folder, each within ``max_bytes``.

    Parameters
    ----------
    max_bytes : int
        Bound on the folder's entry files and, unless ``memory_bytes`` is given,
        separately on the memory entries.
    folder : Path or None
        Where entries persist across processes; ``None`` keeps them in memory only.
    memory_bytes : int, optional
        Bound on the memory entries.

    Subclasses say how their values are stored by setting ``codec``.
    """

    codec: Codec

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
        path = self.folder / f"{key}{self.codec.suffix}"
        try:
            value = self.codec.read(path)
        except (OSError, ValueError, zipfile.BadZipFile):  # absent, or unreadable
            # An unreadable entry goes, so that the next put writes it afresh.
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # mark as recently used for eviction
        self._remember(key, value)
        return value

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` (skipped when larger than the whole budget)."""
        if self.codec.size(value) > max(self.max_bytes, self.memory_bytes):
            return
        self._remember(key, value)
        if self.folder is None:
            return
        path = self.folder / f"{key}{self.codec.suffix}"
        try:
            # Keys name their content: an entry already on disk is this value. (Every
            # virtual node of a simulation stores the same 95 MB base, for one.)
            os.utime(path)
            return
        except FileNotFoundError:
            pass
        self.folder.mkdir(parents=True, exist_ok=True)
        # Write then rename: a process killed mid-write leaves no half entry behind.
        partial = self.folder / f".{key}.{os.getpid()}.partial{self.codec.suffix}"
        self.codec.write(partial, value)
        os.replace(partial, path)
        files = sorted(self.folder.glob(f"*{self.codec.suffix}"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for old in files:
            if total <= self.max_bytes:
                break
            total -= old.stat().st_size
            old.unlink(missing_ok=True)

    def _remember(self, key: str, value: Any) -> None:
        self._memory[key] = value
        self._memory.move_to_end(key)
        while sum(self.codec.size(v) for v in self._memory.values()) > self.memory_bytes:
            self._memory.popitem(last=False)
