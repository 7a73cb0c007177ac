"""Which rows of a dataset each node gets, computed once per machine.

A simulation asks for the same partitioning from every ClientApp actor; a
Dirichlet split of 60,000 labels into 1,000 partitions takes seconds and
imports Hugging Face datasets, so the first process stores the row indices
in the machine's cache and the others read them back.
"""

from __future__ import annotations

import hashlib
from typing import IO

import numpy as np

from fl_app.cache import Codec, Store, cache_root
from fl_app.values import PARTITIONERS

# Row indices of partitionings (8 bytes a row): thousands of runs' worth.
PARTITIONS_MAX_BYTES = 256 << 20


def split_indices(
    labels: np.ndarray,
    partitioner: str,
    num_partitions: int,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split row indices ``0..len(labels)`` into disjoint, complete partitions.

    ``iid`` is the stride split ``i::n``; ``dirichlet`` draws each partition's
    label mix from Dir(alpha) with flwr-datasets' ``DirichletPartitioner``.
    """
    if partitioner not in PARTITIONERS:
        raise ValueError(f"partitioner={partitioner!r} is not one of: {', '.join(PARTITIONERS)}")
    if num_partitions < 1:
        raise ValueError(f"num-partitions={num_partitions} must be >= 1")
    if partitioner == "iid":
        return [np.arange(i, len(labels), num_partitions) for i in range(num_partitions)]
    if alpha <= 0:
        raise ValueError(f"dirichlet-alpha={alpha} must be > 0")
    # Deferred: flwr-datasets pulls in HF datasets, pandas and pyarrow.
    from datasets import Dataset as HFDataset
    from flwr_datasets.partitioner import DirichletPartitioner

    dirichlet = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=alpha,
        min_partition_size=0,
        seed=seed,
    )
    # Partition a label + row-index table only; images never go through Arrow.
    dirichlet.dataset = HFDataset.from_dict(
        {"label": np.asarray(labels, np.int64), "row": np.arange(len(labels))}
    )
    return [
        np.asarray(dirichlet.load_partition(i)["row"], dtype=np.int64)
        for i in range(num_partitions)
    ]


def _read_rows(file: IO[bytes]) -> list[np.ndarray]:
    with np.load(file, allow_pickle=False) as stored:
        return np.split(stored["rows"], stored["ends"][:-1])


def _write_rows(file: IO[bytes], parts: list[np.ndarray]) -> None:
    ends = np.cumsum([len(part) for part in parts])
    np.savez(file, rows=np.concatenate(parts).astype(np.int64), ends=ends)


class PartitionStore(Store):
    """Partitionings (lists of row-index arrays) by key, as ``.npz`` files."""

    codec = Codec(".npz", _read_rows, _write_rows, lambda parts: sum(p.nbytes for p in parts))


def shared_partitions(
    labels: np.ndarray,
    partitioner: str,
    num_partitions: int,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """`split_indices`, read from the machine's cache when another process computed it."""
    if partitioner == "iid":  # a stride: cheaper to compute than to read
        return split_indices(labels, partitioner, num_partitions, alpha, seed)
    digest = hashlib.blake2b(np.ascontiguousarray(labels, np.int64).data, digest_size=16)
    digest.update(f"{partitioner}|{num_partitions}|{alpha!r}|{seed}".encode())
    store = PartitionStore(PARTITIONS_MAX_BYTES, cache_root() / "partitions", memory_bytes=0)
    key = f"{partitioner}-{num_partitions}-{digest.hexdigest()}"
    parts = store.get(key)
    if parts is None:
        parts = split_indices(labels, partitioner, num_partitions, alpha, seed)
        store.put(key, parts)
    return parts
