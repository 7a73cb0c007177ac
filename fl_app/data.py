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

from fl_app.config import DATASETS, PARTITIONERS

NUM_CLASSES = 10
# A node's prepared data in its data-dir (see load_data_dir), and image folders' files.
PARTITION_FILE = "partition.npz"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
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


def split_node_data(
    data: Split, seed: int, stream: int, max_examples: int = 0, val_fraction: float = 0.1
) -> NodeData:
    """Shuffle a node's examples, cap them, and split off validation.

    ``max_examples`` > 0 keeps a seeded random subset of that size, for quick
    runs; ``stream`` keeps nodes' shuffles independent under one ``seed``.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val-fraction={val_fraction} must be in [0, 1)")
    rows = np.random.default_rng([seed, stream]).permutation(len(data.y))
    if max_examples > 0:
        rows = rows[:max_examples]
    n_val = round(len(rows) * val_fraction)
    val_rows, train_rows = rows[:n_val], rows[n_val:]
    return NodeData(
        Split(data.x[train_rows], data.y[train_rows]), Split(data.x[val_rows], data.y[val_rows])
    )


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
    """Load one node's partition of a dataset's training set, capped and split."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id={partition_id} is out of range 0..{num_partitions - 1}")
    train = load_dataset(dataset).train
    rows = _train_partitions(dataset, partitioner, num_partitions, alpha, seed)[partition_id]
    return split_node_data(
        Split(train.x[rows], train.y[rows]), seed, partition_id, max_examples, val_fraction
    )


def _check_images(x: np.ndarray, y: np.ndarray, source: Path) -> Split:
    x = _with_channels(x)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(
            f"{source}: images are {x.dtype}{list(x.shape)}, expected uint8 "
            "(n, height, width, 1 or 3)"
        )
    y = np.asarray(y).reshape(-1)
    if len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{source}: {len(x)} images but {len(y)} labels of {y.dtype}")
    if len(y) and not 0 <= y.min() <= y.max() < NUM_CLASSES:
        raise ValueError(f"{source}: labels {y.min()}..{y.max()} outside 0..{NUM_CLASSES - 1}")
    return Split(x, y.astype(np.int64))


def _read_image_folders(root: Path, class_dirs: list[Path]) -> Split:
    from PIL import Image  # deferred: only image folders need it

    # Folders named 0, 1, ... are label indices; otherwise sorted names are, as in Keras'
    # image_dataset_from_directory.
    numeric = all(d.name.isdigit() for d in class_dirs)
    images: list[np.ndarray] = []
    labels: list[int] = []
    size: tuple[int, int] | None = None
    mode = "L"
    for index, folder in enumerate(class_dirs):
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            with Image.open(file) as image:
                if size is None:
                    # The node's first image sets size and colour for its whole set.
                    size, mode = image.size, "L" if image.mode in ("L", "1", "I;16") else "RGB"
                images.append(np.asarray(image.convert(mode).resize(size)))
            labels.append(int(folder.name) if numeric else index)
    if not images:
        return Split(np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64))
    return _check_images(np.stack(images), np.asarray(labels), root)


def load_data_dir(data_dir: str | os.PathLike) -> Split:
    """Load a node's own data: ``partition.npz`` or one image subfolder per class.

    ``partition.npz`` holds ``x`` (uint8 images) and ``y`` (labels), as
    ``prepare_node_dirs`` writes it. Otherwise every subfolder is a class: named
    by its label (``0/``, ``1/``, ...) or, like Keras' image folders, labelled by
    its rank among the sorted names; PNG/JPEG images in it are that class.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data-dir={str(root)!r} is not a folder")
    partition = root / PARTITION_FILE
    try:
        if partition.is_file():
            with np.load(partition) as arrays:
                data = _check_images(arrays["x"], arrays["y"], partition)
        else:
            class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
            data = _read_image_folders(root, class_dirs)
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"data-dir={str(root)!r} cannot be read: {err}") from err
    if len(data.y) == 0:
        raise ValueError(
            f"data-dir={str(root)!r} holds no examples: expected {PARTITION_FILE} or one "
            "subfolder of PNG/JPEG images per class"
        )
    return data


def prepare_node_dirs(
    out_dir: str | os.PathLike,
    num_nodes: int,
    dataset: str = "fashion_mnist",
    partitioner: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    max_examples: int = 0,
) -> list[Path]:
    """Write ``out_dir/node-<i>/partition.npz``, one partition of a dataset per node.

    For demos and tests of deployments, where each SuperNode reads its own
    folder (``--node-config 'data-dir="..."'``). ``max_examples`` > 0 caps each.
    """
    train = load_dataset(dataset).train
    partitions = split_indices(train.y, partitioner, num_nodes, alpha, seed)
    folders = []
    for i, rows in enumerate(partitions):
        if max_examples > 0:
            rows = np.random.default_rng([seed, i]).permutation(rows)[:max_examples]
        folder = Path(out_dir) / f"node-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / PARTITION_FILE, x=train.x[rows], y=train.y[rows])
        folders.append(folder)
    return folders


def load_test_set(dataset: str, max_examples: int = 0) -> Split:
    """The server's held-out test set, optionally capped to its first rows."""
    test = load_dataset(dataset).test
    if max_examples > 0:
        return Split(test.x[:max_examples], test.y[:max_examples])
    return test
