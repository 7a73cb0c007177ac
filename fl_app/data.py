"""Image datasets, offline first, and their split across federated nodes.

Images stay ``uint8`` with a channel axis, ``(n, height, width, channels)``;
the model does all preprocessing.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

NUM_CLASSES = 10
DATASETS = ("fashion_mnist", "mnist", "cifar10")
PARTITIONERS = ("iid", "dirichlet")
# Debian's dataset-fashion-mnist package installs the original IDX files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
# IDX type codes (http://yann.lecun.com/exdb/mnist/) mapped to big-endian dtypes.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class Split(NamedTuple):
    """Images and integer labels of one split."""

    x: np.ndarray
    y: np.ndarray


class Dataset(NamedTuple):
    """A train and a test split."""

    train: Split
    test: Split


class NodeData(NamedTuple):
    """What one node trains and validates on."""

    train: Split
    val: Split


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", count=ndim, offset=4).astype(int)
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, expected {expected}")
    array = np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def keras_cache_dir() -> Path:
    """Where ``keras.datasets`` caches downloads (``$KERAS_HOME/datasets``)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets"


def fashion_mnist_dirs() -> list[Path]:
    """Folders searched, in order, for the Fashion-MNIST IDX files."""
    return [keras_cache_dir() / "fashion-mnist", DEBIAN_FASHION_MNIST]


def _with_channels(x: np.ndarray) -> np.ndarray:
    return x[..., None] if x.ndim == 3 else x


def _from_keras(name: str) -> Dataset:
    import keras  # deferred: only needed when the files are not on disk

    try:
        (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, name).load_data()
    except Exception as err:  # keras raises bare Exception on URL failures
        raise RuntimeError(
            f"dataset={name!r} is not in Keras' cache ({keras_cache_dir()}) and could "
            f"not be downloaded ({err}); offline, use dataset=fashion_mnist with "
            "`apt-get install dataset-fashion-mnist`"
        ) from err
    return Dataset(
        Split(_with_channels(x_train), y_train.reshape(-1).astype(np.int64)),
        Split(_with_channels(x_test), y_test.reshape(-1).astype(np.int64)),
    )


@functools.cache
def load_dataset(name: str) -> Dataset:
    """Load a dataset by name: ``fashion_mnist``, ``mnist`` or ``cifar10``.

    Fashion-MNIST is read from IDX files in Keras' cache or the Debian
    ``dataset-fashion-mnist`` folder; anything else goes through
    ``keras.datasets`` (its cache, else a download).
    """
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not one of: {', '.join(DATASETS)}")
    if name == "fashion_mnist":
        for folder in fashion_mnist_dirs():
            if all((folder / f).is_file() for f in IDX_FILES.values()):
                arrays = {k: read_idx(folder / f) for k, f in IDX_FILES.items()}
                return Dataset(
                    Split(_with_channels(arrays["x_train"]), arrays["y_train"].astype(np.int64)),
                    Split(_with_channels(arrays["x_test"]), arrays["y_test"].astype(np.int64)),
                )
    return _from_keras(name)


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


@functools.cache
def _train_partitions(
    dataset: str, partitioner: str, num_partitions: int, alpha: float, seed: int
) -> list[np.ndarray]:
    # Every node of a simulation shares a process with others: split once.
    return split_indices(load_dataset(dataset).train.y, partitioner, num_partitions, alpha, seed)


def load_node_data(
    dataset: str,
    partition_id: int,
    num_partitions: int,
    partitioner: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    max_examples: int = 0,
    val_fraction: float = 0.1,
) -> NodeData:
    """Load one node's partition of the training set and split off validation.

    ``max_examples`` > 0 caps the partition (a seeded random subset) before the
    split, for quick runs.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id={partition_id} is out of range 0..{num_partitions - 1}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val-fraction={val_fraction} must be in [0, 1)")
    train = load_dataset(dataset).train
    rows = _train_partitions(dataset, partitioner, num_partitions, alpha, seed)[partition_id]
    rng = np.random.default_rng([seed, partition_id])
    rows = rng.permutation(rows)
    if max_examples > 0:
        rows = rows[:max_examples]
    n_val = round(len(rows) * val_fraction)
    val_rows, train_rows = rows[:n_val], rows[n_val:]
    return NodeData(
        Split(train.x[train_rows], train.y[train_rows]),
        Split(train.x[val_rows], train.y[val_rows]),
    )


def load_test_set(dataset: str, max_examples: int = 0) -> Split:
    """The server's held-out test set, optionally capped to its first rows."""
    test = load_dataset(dataset).test
    if max_examples > 0:
        return Split(test.x[:max_examples], test.y[:max_examples])
    return test
