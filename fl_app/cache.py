"""Content-keyed stores: bounded, least-recently-used, in memory and optionally on disk.

Keys name their content (digests of everything a value depends on), so an
entry never goes stale: a changed input gives another key. On disk, entries
survive across processes, such as the fresh ClientApp process a deployed
SuperNode starts for every message.

Files on disk are checked whenever they are read: an entry file is the codec's
bytes followed by a trailer, `CHECKSUM_MAGIC` and a BLAKE2b digest of the key
and those bytes. One that is empty, cut short, altered, written under another
key's name or undecodable is deleted with one warning line and counted as a
miss, so the caller computes the value again, or asks for it again: a damaged
cache costs one recomputation, never a failure that repeats every round.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from logging import WARNING
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import psutil
from flwr.app import ArrayRecord
from flwr.common import log

# Where fl_app keeps what it computes once per machine (converted weights, activations,
# base models) unless a node's config names another folder.
CACHE_ENV = "FL_APP_CACHE_DIR"
DEFAULT_CACHE_ROOT = "~/.cache/fl_app"


def cache_root() -> Path:
    """``$FL_APP_CACHE_DIR`` if set, else ``~/.cache/fl_app``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT).expanduser()


def node_cache_dir(node_config: Mapping[str, Any]) -> Path:
    """Where a node keeps activations, base models and its warm worker's files.

    Node config ``cache-dir``, else the machine's (`cache_root`): every simulated
    node and Ray actor of a machine shares that one.
    """
    folder = node_config.get("cache-dir")
    return Path(str(folder)).expanduser() if folder else cache_root()


# Ends every entry file, followed by the digest: a file without it was cut short,
# or written by a version of fl_app that stored no checksum.
CHECKSUM_MAGIC = b"fl_app/blake2b\x00\x01"
DIGEST_BYTES = 32
TRAILER_BYTES = len(CHECKSUM_MAGIC) + DIGEST_BYTES
PARTIAL = ".partial"


class Codec(NamedTuple):
    """How a store writes one kind of value to a binary file, reads it back, and sizes it."""

    suffix: str
    read: Callable[[IO[bytes]], Any]
    write: Callable[[IO[bytes], Any], None]
    size: Callable[[Any], int]


def digest_arrays(digest: Any, arrays: ArrayRecord, keys: Iterable[str]) -> None:
    """Feed the named arrays, with their keys, into a ``hashlib`` digest."""
    for key in keys:
        # The serialised bytes carry dtype and shape too; no need to decode them.
        digest.update(key.encode())
        digest.update(arrays[key].data)


def entry_checksum(key: str) -> Any:
    """A new BLAKE2b digest for the file of entry ``key``, to be fed the codec's bytes.

    The key goes in first, so that a file copied or renamed to another key's name
    fails the check: its content would be right, but for another key.
    """
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    digest.update(key.encode() + b"\0")
    return digest


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

    Notes
    -----
    Memory entries are trusted: they never left this process. Every file is
    verified against the checksum at its end before it is decoded (about 1 GB/s,
    a tenth of a second for a 95 MB base); a bad file is deleted and is a miss.
    The checksum is a trailer, not a second file or part of the name, so an entry
    is one file that appears whole in one rename, its name is its key, and
    eviction counts and deletes one file. Files written before checksums existed
    have no trailer: each is a miss once, and is rewritten by the next ``put``.

    A write goes to ``.<key>.<pid>.partial<suffix>`` first, then is renamed into
    place. A partial file whose process has ended (killed mid-write) is deleted
    with a warning when its key misses, or after the next ``put``.

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

    def path(self, key: str) -> Path:
        """The file of entry ``key`` (the store must have a folder)."""
        assert self.folder is not None
        return self.folder / f"{key}{self.codec.suffix}"

    def get(self, key: str) -> Any | None:
        """The entry stored under ``key``, or ``None``: absent, or on disk but bad."""
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        if self.folder is None:
            return None
        path = self.path(key)
        body = self._verified(key, path)
        if body is None:
            self._drop_stale_partials(key)
            return None
        try:
            value = self.codec.read(io.BytesIO(body))
        except Exception as error:
            # The bytes are the ones written, yet do not decode (a numpy that reads the
            # format differently, say): whatever the error, recomputing is right.
            self._discard(path, f"cannot be decoded ({type(error).__name__}: {error})")
            return None
        _touch(path)  # mark as recently used for eviction
        self._remember(key, value)
        return value

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` (skipped when larger than the whole budget).

        A file that cannot be written (a full disk, say) is a warning, not an error:
        the value stays in memory and the next process computes it again.
        """
        if self.codec.size(value) > max(self.max_bytes, self.memory_bytes):
            return
        self._remember(key, value)
        if self.folder is None:
            return
        path = self.path(key)
        # Keys name their content: an intact entry already on disk is this value (every
        # virtual node of a simulation stores the same 95 MB base, for one). A bad one
        # is deleted here and written afresh.
        if self._verified(key, path) is not None:
            _touch(path)
            return
        # Write then rename: a process killed mid-write leaves no half entry behind.
        partial = self.folder / f".{key}.{os.getpid()}{PARTIAL}{self.codec.suffix}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with partial.open("w+b") as file:
                self.codec.write(file, value)
                # Checksum what the file holds, read back, rather than what was meant.
                file.flush()
                file.seek(0)
                digest = hashlib.file_digest(file, lambda: entry_checksum(key))
                file.write(CHECKSUM_MAGIC + digest.digest())
            os.replace(partial, path)
        except OSError as error:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            log(WARNING, "Cache entry %s could not be written (%s): not stored", path, error)
            return
        self._evict()

    def _verified(self, key: str, path: Path) -> bytes | None:
        """The codec's bytes in ``path`` when its checksum holds; else ``None``.

        A missing file is a plain miss; a bad one is deleted, with a warning.
        """
        try:
            with path.open("rb") as file:
                size = os.fstat(file.fileno()).st_size
                body = file.read(max(size - TRAILER_BYTES, 0))
                trailer = file.read()
        except (FileNotFoundError, NotADirectoryError):
            return None  # absent: a plain miss
        except OSError as error:
            self._discard(path, f"cannot be read ({error})")
            return None
        if not size:
            reason = "is empty"
        elif len(trailer) != TRAILER_BYTES or not trailer.startswith(CHECKSUM_MAGIC):
            reason = "has no checksum at its end (cut short, or written by an older fl_app)"
        else:
            checksum = entry_checksum(key)
            checksum.update(body)
            if checksum.digest() == trailer[len(CHECKSUM_MAGIC) :]:
                return body
            reason = "does not match its checksum"
        self._discard(path, reason)
        return None

    def _discard(self, path: Path, reason: str) -> None:
        """Delete a bad file, in one warning line that names it and says why."""
        try:
            path.unlink(missing_ok=True)
            outcome = "deleted"
        except OSError as error:
            outcome = f"not deleted ({error})"
        log(WARNING, "Cache entry %s %s: %s, and counted as a miss", path, reason, outcome)

    def _drop_stale_partials(self, key: str = "*") -> None:
        """Delete partial writes of ``key`` (default: any) whose process has ended."""
        assert self.folder is not None
        ending = f"{PARTIAL}{self.codec.suffix}"
        for partial in self.folder.glob(f".{key}.*{ending}"):
            pid = partial.name.removesuffix(ending).rsplit(".", 1)[-1]
            # A live writer's file is left alone: it is renamed into place shortly.
            if pid.isdigit() and int(pid) != os.getpid() and not psutil.pid_exists(int(pid)):
                self._discard(partial, f"is a partial write of process {pid}, which has ended")

    def _evict(self) -> None:
        """Delete the least recently used entry files until the folder is within bounds."""
        assert self.folder is not None
        entries = []
        for path in self.folder.glob(f"*{self.codec.suffix}"):
            if path.name.startswith("."):
                continue  # a partial write: another process is still writing it
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # evicted meanwhile by another process
            entries.append((stat.st_mtime, stat.st_size, path))
        entries.sort()
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            total -= size
            path.unlink(missing_ok=True)
        self._drop_stale_partials()

    def _remember(self, key: str, value: Any) -> None:
        self._memory[key] = value
        self._memory.move_to_end(key)
        while sum(self.codec.size(v) for v in self._memory.values()) > self.memory_bytes:
            self._memory.popitem(last=False)


def _read_npy(file: IO[bytes]) -> np.ndarray:
    return np.load(file, allow_pickle=False)


def _write_npy(file: IO[bytes], array: np.ndarray) -> None:
    np.save(file, array, allow_pickle=False)


class MappedArrays(Store):
    """Arrays that every process of a machine maps from one ``.npy`` file.

    A simulation runs many ClientApp actors on a machine, each of which would
    otherwise decode and hold its own copy of a dataset: mapped read-only, the
    pages are the page cache's, held once however many processes read them.
    A file is verified against its checksum once per process before it is
    mapped (its trailer follows the array, where ``np.load`` does not look).
    """

    codec = Codec(".npy", _read_npy, _write_npy, lambda array: array.nbytes)

    def __init__(self, max_bytes: int, folder: Path) -> None:
        super().__init__(max_bytes, folder, memory_bytes=0)

    def mapped(self, key: str, build: Callable[[], np.ndarray]) -> np.ndarray:
        """The array of ``key``, memory-mapped; ``build()`` makes and stores it on a miss.

        When the file cannot be written or mapped (a read-only or full disk, an
        eviction meanwhile), this process keeps its own built array instead.
        """
        path = self.path(key)
        built = None
        if self._verified(key, path) is None:
            self._drop_stale_partials(key)
            built = build()
            self.put(key, built)
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            return build() if built is None else built
        _touch(path)
        return array


def _touch(path: Path) -> None:
    """Mark a file as recently used, unless another process evicted it meanwhile."""
    with contextlib.suppress(OSError):
        os.utime(path)
