"""Trainable-only exchange: nodes keep the frozen model, rounds carry what trains.

The first message a node gets carries the whole global model as its *base*
(exact float32, under the RecordDict key ``base``) and the base's hash; the
node stores it (memory, and disk, so the per-message ClientApp processes of a
deployed SuperNode share it). Every message also carries the arrays that may
have changed since the base (the round's trainable ones, under ``arrays``);
the node lays them over its stored base to get the global model, and replies
with the same keys only. The server sends a node its base again when the node
lost it (an error reply), or when an array outside the trainable set differs
from the node's base, so the node's model is always the server's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from fl_app.model.features import FeatureCache, digest_arrays

# RecordDict key of the full model a node stores, and the config key naming it.
BASE = "base"
BASE_HASH = "base-hash"
EXCHANGES = ("trainable", "full")
# Bases a node keeps on disk and in memory; a ResNet50 is 95 MB. Disk holds several,
# so runs side by side on one machine do not evict each other's.
BASE_DISK_BYTES = 2**30
BASE_MEMORY_BYTES = 128 * 2**20


def base_hash(arrays: ArrayRecord) -> str:
    """A digest of every array, in order: the name of a base."""
    digest = hashlib.blake2b(digest_size=20)
    digest_arrays(digest, arrays, arrays.keys())
    return digest.hexdigest()


def differing_keys(current: ArrayRecord, base: ArrayRecord) -> list[str]:
    """Keys whose arrays differ between two records with the same keys."""
    # Unchanged arrays are usually the very same objects: compare bytes only otherwise.
    return [
        key
        for key, array in current.items()
        if array is not base[key] and array.data != base[key].data
    ]


def assemble(base: ArrayRecord, arrays: ArrayRecord) -> ArrayRecord:
    """The base with ``arrays`` laid over it, in the base's order."""
    unknown = [key for key in arrays if key not in base]
    if unknown:
        raise ValueError(f"arrays {unknown[:3]} are not in the stored base model")
    return ArrayRecord({key: arrays.get(key, array) for key, array in base.items()})


class BaseStore(FeatureCache):
    """Base models by hash, in memory and optionally in a folder (``.npz`` files)."""

    SUFFIX = ".npz"

    def _read(self, path: Path) -> ArrayRecord:
        with np.load(path) as stored:
            return ArrayRecord({key: Array(stored[key]) for key in stored.files})

    def _write(self, path: Path, value: ArrayRecord) -> None:
        with path.open("wb") as file:
            np.savez(file, **{key: array.numpy() for key, array in value.items()})

    def _size(self, value: ArrayRecord) -> int:
        return value.count_bytes()
