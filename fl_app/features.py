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
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import keras
import numpy as np
from flwr.app import ArrayRecord

# Part of every key: bump when preprocessing or the backbone's code changes meaning.
FEATURE_VERSION = f"1/keras-{keras.__version__}"


def feature_key(
    arrays: ArrayRecord,
    frozen_keys: Iterable[str],
    images: np.ndarray,
    input_size: int,
    boundary: str = "pooled",
) -> str:
    """A digest of everything the activations of ``images`` at ``boundary`` depend on.

    ``frozen_keys`` name the arrays of the layers before the boundary.
    """
    digest = hashlib.blake2b(digest_size=20)
    header = f"{FEATURE_VERSION}|{boundary}|{input_size}|{images.dtype}|{images.shape}"
    digest.update(header.encode())
    digest.update(np.ascontiguousarray(images).data)
    for key in sorted(frozen_keys):
        # The serialised bytes carry dtype and shape too; no need to decode them.
        digest.update(key.encode())
        digest.update(arrays[key].data)
    return digest.hexdigest()


class FeatureCache:
    """Features by key, in memory and optionally in a folder, each within ``max_bytes``.

    Parameters
    ----------
    max_bytes : int
        Bound on the memory entries and, separately, on the folder's ``.npy`` files.
    folder : Path or None
        Where entries persist across processes; ``None`` keeps them in memory only.
    """

    def __init__(self, max_bytes: int, folder: Path | None = None) -> None:
        self.max_bytes = max_bytes
        self.folder = Path(folder).expanduser() if folder is not None else None
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, key: str) -> np.ndarray | None:
        """The features stored under ``key``, or ``None``."""
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        if self.folder is None:
            return None
        path = self.folder / f"{key}.npy"
        try:
            features = np.load(path)
        except (OSError, ValueError):  # absent, or half-written by a killed process
            return None
        os.utime(path)  # mark as recently used for eviction
        self._remember(key, features)
        return features

    def put(self, key: str, features: np.ndarray) -> None:
        """Store features under ``key`` (skipped when larger than the whole budget)."""
        if features.nbytes > self.max_bytes:
            return
        self._remember(key, features)
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f".{key}.{os.getpid()}.partial.npy"
        np.save(partial, features)
        os.replace(partial, self.folder / f"{key}.npy")
        files = sorted(self.folder.glob("*.npy"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for old in files:
            if total <= self.max_bytes:
                break
            total -= old.stat().st_size
            old.unlink(missing_ok=True)

    def _remember(self, key: str, features: np.ndarray) -> None:
        self._memory[key] = features
        self._memory.move_to_end(key)
        while sum(f.nbytes for f in self._memory.values()) > self.max_bytes:
            self._memory.popitem(last=False)
