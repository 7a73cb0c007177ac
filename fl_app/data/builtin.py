"""The built-in datasets, offline first: Fashion-MNIST, MNIST, CIFAR-10.

Images stay ``uint8`` with a channel axis, ``(n, height, width, channels)``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fl_app.cache import MappedArrays, cache_root
from fl_app.values import DATASETS

# Class names by label index, as each dataset's documentation gives them.
CLASS_NAMES = {
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "mnist": tuple(str(digit) for digit in range(10)),
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
}
# Debian's dataset-fashion-mnist package installs the original IDX files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
# Decoded datasets, one file per array, mapped by every process of the machine.
DECODED_MAX_BYTES = 2 << 30
# IDX type codes (http://yann.lecun.com/exdb/mnist/) mapped to big-endian dtypes.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class Arrays(NamedTuple):
    """Images and integer labels of one split."""

    x: np.ndarray
    y: np.ndarray


class Builtin(NamedTuple):
    """A built-in dataset's train and test split."""

    train: Arrays
    test: Arrays


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


def _arrays(x: np.ndarray, y: np.ndarray) -> Arrays:
    return Arrays(x[..., None] if x.ndim == 3 else x, np.asarray(y).reshape(-1).astype(np.int64))


def _from_keras(name: str) -> Builtin:
    import keras  # deferred: only needed when the files are not on disk

    try:
        (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, name).load_data()
    except Exception as err:  # keras raises bare Exception on URL failures
        raise RuntimeError(
            f"dataset={name!r} is not in Keras' cache ({keras_cache_dir()}) and could "
            f"not be downloaded ({err}); offline, use dataset=fashion_mnist with "
            "`apt-get install dataset-fashion-mnist`"
        ) from err
    return Builtin(_arrays(x_train, y_train), _arrays(x_test, y_test))


def _mapped_idx(name: str, folder: Path) -> dict[str, np.ndarray]:
    """A folder's IDX files, decoded once per machine and memory-mapped.

    Entries are keyed by a digest of the compressed files: other files, another key.
    """
    digest = hashlib.blake2b(digest_size=16)
    for file in IDX_FILES.values():
        digest.update((folder / file).read_bytes())
    store = MappedArrays(DECODED_MAX_BYTES, cache_root() / "datasets")
    return {
        key: store.mapped(f"{name}-{key}-{digest.hexdigest()}", lambda f=file: read_idx(folder / f))
        for key, file in IDX_FILES.items()
    }


@functools.cache
def load_builtin(name: str) -> Builtin:
    """Load a built-in dataset by name: ``fashion_mnist``, ``mnist`` or ``cifar10``.

    Fashion-MNIST is read from IDX files in Keras' cache or the Debian
    ``dataset-fashion-mnist`` folder; anything else goes through
    ``keras.datasets`` (its cache, else a download).
    """
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not one of: {', '.join(DATASETS)}")
    if name == "fashion_mnist":
        for folder in fashion_mnist_dirs():
            if all((folder / f).is_file() for f in IDX_FILES.values()):
                arrays = _mapped_idx(name, folder)
                return Builtin(
                    _arrays(arrays["x_train"], arrays["y_train"]),
                    _arrays(arrays["x_test"], arrays["y_test"]),
                )
    return _from_keras(name)
