"""A run's data: its global class list, each node's split, the server's test set.

Every dataset is a `Split` of a source read a batch at a time (`fl_app.data.split`):
built-in arrays (`fl_app.data.builtin`), image files (`fl_app.data.images`) or a
Hugging Face table (`fl_app.data.hub`). Labels are always indices into the run's
class list, which the server decides (`run_classes`) and sends to every node, so
the same class has the same output on every node, whichever classes it holds.
"""

from __future__ import annotations

import functools
import os
import zipfile
from collections.abc import Sequence
from logging import INFO
from pathlib import Path
from typing import NamedTuple

import numpy as np
from flwr.common import log

from fl_app.config import RunConfig
from fl_app.data import hub
from fl_app.data.builtin import CLASS_NAMES, load_builtin
from fl_app.data.images import FileSource, folder_classes, scan_class_folders, split_folders
from fl_app.data.partition import shared_partitions, split_indices
from fl_app.data.split import ArraySource, Source, Split
from fl_app.values import (
    DATASET_ALLOWED,
    DATASETS,
    HUB_ID,
    NO_TEST_DATA,
    OWN_TEST_SPLIT,
    is_path,
    parse_classes,
)

# The message ConfigRecord key of the run's class list (the server sends it every round).
CLASSES_KEY = "classes"
# A node's prepared data in its data-dir (see load_data_dir).
PARTITION_FILE = "partition.npz"
# Hugging Face's save_to_disk marks its folders with these files.
SAVE_TO_DISK_FILES = ("dataset_dict.json", "state.json")


class NodeData(NamedTuple):
    """What one node trains and validates on."""

    train: Split
    val: Split


class DatasetRef(NamedTuple):
    """Where a dataset value points: ``kind`` is builtin, folder, parquet, disk or hub."""

    kind: str
    value: str


def dataset_ref(value: str, key: str = "dataset") -> DatasetRef:
    """Resolve a ``dataset``/``test-data`` value; an existing folder wins over a hub id."""
    if value in DATASETS:
        return DatasetRef("builtin", value)
    path = Path(value).expanduser()
    if path.is_dir():
        if any((path / name).is_file() for name in SAVE_TO_DISK_FILES):
            return DatasetRef("disk", str(path.resolve()))
        if next(path.rglob("*.parquet"), None) is not None:
            return DatasetRef("parquet", str(path.resolve()))
        return DatasetRef("folder", str(path.resolve()))
    if is_path(value):
        raise ValueError(f"{key}={value!r} is not allowed: {path} is not a folder")
    if HUB_ID.fullmatch(value) is None:
        raise ValueError(f"{key}={value!r} is not allowed: expected {DATASET_ALLOWED}")
    return DatasetRef("hub", value)


@functools.cache
def _tables(ref: DatasetRef, key: str):
    return hub.load_table(ref.kind, ref.value, key)


def _table(ref: DatasetRef, split: str, key: str, config: RunConfig):
    """A split of a Hugging Face dataset, with its image and label column names; or None."""
    tables = _tables(ref, key)
    if split not in tables:
        return None
    table = tables[split]
    image, label = hub.columns(table, config.image_column, config.label_column, key)
    return table, image, label


def dataset_classes(value: str, config: RunConfig, key: str = "dataset") -> list[str]:
    """The class names a dataset itself carries: built-in names, folder names, ClassLabel names."""
    ref = dataset_ref(value, key)
    if ref.kind == "builtin":
        return list(CLASS_NAMES[ref.value])
    if ref.kind == "folder":
        names = folder_classes(Path(ref.value))
        if not names:
            raise ValueError(f"{key}={value!r} holds no class subfolders of images")
        return names
    found = _table(ref, "train", key, config) or _table(ref, "test", key, config)
    if found is None:
        raise ValueError(f"{key}={value!r} has neither a train nor a test split")
    table, _, label = found
    return hub.table_classes(table, label)


def run_classes(config: RunConfig) -> tuple[str, ...]:
    """The run's global class list: ``classes`` if set, else the dataset's own.

    A deployment over private images names its classes; the built-in default
    ``dataset`` is then not read (`load_test_set` refuses its test split when
    the class counts differ).
    """
    classes = parse_classes(config.classes) or tuple(dataset_classes(config.dataset, config))
    if len(classes) < 2:
        raise ValueError(
            f"dataset={config.dataset!r} has one class ({classes[0]!r}): a classifier needs at "
            "least two; add class folders, or name the run's classes with classes"
        )
    return classes


def _source(value: str, split: str, classes: Sequence[str], config: RunConfig, key: str):
    """One split of a dataset as a `Source`, or ``None`` when it has no such split."""
    ref = dataset_ref(value, key)
    if ref.kind == "builtin":
        arrays = getattr(load_builtin(ref.value), split)
        if len(classes) != len(CLASS_NAMES[ref.value]):
            raise ValueError(
                f"{key}={value} has {len(CLASS_NAMES[ref.value])} classes, but the run has "
                f"{len(classes)} ({', '.join(classes)}): name all of its classes, or (a "
                "deployment over your own images) set test-data to a folder of yours or none"
            )
        return ArraySource(arrays.x, arrays.y)
    if ref.kind == "folder":
        folder = split_folders(Path(ref.value)).get(split)
        if folder is None:
            return None
        paths, labels = scan_class_folders(folder, classes, key)
        return FileSource(paths, labels, config.input_size)
    found = _table(ref, split, key, config)
    if found is None:
        return None
    table, image, label = found
    labels = hub.global_labels(table, label, classes, key)
    return hub.TableSource(table, image, labels, config.input_size)


@functools.cache
def _train_source(config: RunConfig, classes: tuple[str, ...]) -> Source:
    # Every virtual node of a simulation shares a process with others: scan once.
    source = _source(config.dataset, "train", classes, config, "dataset")
    if source is None:
        raise ValueError(f"dataset={config.dataset!r} has no train split")
    return source


@functools.cache
def _partitions(
    config: RunConfig, classes: tuple[str, ...], num_partitions: int
) -> list[np.ndarray]:
    labels = _train_source(config, classes).labels
    return shared_partitions(
        labels, config.partitioner, num_partitions, config.dirichlet_alpha, config.seed
    )


def split_node_data(
    data: Split, seed: int, stream: int, max_examples: int = 0, val_fraction: float = 0.1
) -> NodeData:
    """Shuffle a node's examples, cap them, and split off validation.

    ``max_examples`` > 0 keeps a seeded random subset of that size, for quick
    runs; ``stream`` keeps nodes' shuffles independent under one ``seed``.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val-fraction={val_fraction} must be in [0, 1)")
    positions = np.random.default_rng([seed, stream]).permutation(len(data))
    if 0 < max_examples < len(positions):
        _say_capped(max_examples, len(positions))
        positions = positions[:max_examples]
    n_val = round(len(positions) * val_fraction)
    return NodeData(data.take(positions[n_val:]), data.take(positions[:n_val]))


@functools.cache
def _say_capped(max_examples: int, available: int) -> None:
    # Once per process: a simulation's actor serves every round of several nodes.
    log(
        INFO,
        "max-examples-per-node=%d: using %d of %d examples",
        max_examples,
        max_examples,
        available,
    )


def load_node_data(
    config: RunConfig, classes: Sequence[str], partition_id: int, num_partitions: int
) -> NodeData:
    """One simulated node's partition of the dataset's train split, capped and split."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id={partition_id} is out of range 0..{num_partitions - 1}")
    classes = tuple(classes)
    rows = _partitions(config, classes, num_partitions)[partition_id]
    return split_node_data(
        Split(_train_source(config, classes), rows),
        config.seed,
        partition_id,
        config.max_examples_per_node,
        config.val_fraction,
    )


def load_data_dir(data_dir: str | os.PathLike, classes: Sequence[str], input_size: int) -> Split:
    """A deployed node's own data: ``partition.npz``, or one subfolder of images per class.

    ``partition.npz`` holds ``x`` (uint8 images) and ``y`` (label indices), as
    ``prepare_node_dirs`` writes it. Otherwise every subfolder is named after one
    of ``classes`` (under ``train/`` in a train/test layout) and holds its PNG/JPEG
    images, read at ``input_size`` when used.
    """
    root = Path(data_dir).expanduser()
    key = f"data-dir={str(root)!r}"
    if not root.is_dir():
        raise FileNotFoundError(f"{key} is not a folder")
    partition = root / PARTITION_FILE
    if partition.is_file():
        try:
            with np.load(partition) as arrays:
                source = ArraySource(arrays["x"], arrays["y"])
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{key}: {PARTITION_FILE} cannot be read: {err}") from err
        _check_arrays(source, len(classes), f"{key}: {PARTITION_FILE}")
    else:
        paths, labels = scan_class_folders(split_folders(root)["train"], classes, key)
        source = FileSource(paths, labels, input_size)
    if len(source.labels) == 0:
        raise ValueError(
            f"{key} holds no examples: expected {PARTITION_FILE} or one subfolder of PNG/JPEG "
            f"images per class, named after one of the run's classes ({', '.join(classes)})"
        )
    return Split(source)


def _check_arrays(source: ArraySource, num_classes: int, path: str) -> None:
    x, y = source.x, source.labels
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(
            f"{path}: images are {x.dtype}{list(x.shape)}, expected uint8 "
            "(n, height, width, 1 or 3)"
        )
    if len(y) != len(x):
        raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
    if len(y) and not 0 <= y.min() <= y.max() < num_classes:
        raise ValueError(f"{path}: labels {y.min()}..{y.max()} outside 0..{num_classes - 1}")


def model_image_shape(config: RunConfig, test: Split | None) -> tuple[int, int, int]:
    """The raw image shape of the server's model (and so of its saved files).

    The test set's when there is one; a built-in dataset's own (grey 28 px for
    Fashion-MNIST) when its classes are the run's; else RGB at ``input-size``, as
    image files and Hugging Face images are read.
    """
    if test is not None:
        return test.image_shape
    if config.dataset in DATASETS and not config.classes:
        return tuple(load_builtin(config.dataset).test.x.shape[1:])
    return (config.input_size, config.input_size, 3)


def load_test_set(config: RunConfig, classes: Sequence[str]) -> tuple[Split | None, str]:
    """The server's test set (capped by ``max-test-examples``) and what it is, or ``None``.

    ``test-data`` empty means the dataset's own test split, when it has one.
    """
    if config.test_data == NO_TEST_DATA:
        return None, "test-data=none"
    own = config.test_data == OWN_TEST_SPLIT
    value, key = (config.dataset, "dataset") if own else (config.test_data, "test-data")
    source = _source(value, "test", classes, config, key)
    if source is None and not own:
        # A test-data folder or table without a test split is the test set itself.
        source = _source(value, "train", classes, config, key)
    if source is None:
        return None, f"{key}={value!r} has no test split"
    test = Split(source)
    cap = config.max_test_examples
    if 0 < cap < len(test):
        if isinstance(source, ArraySource):
            test = test.take(np.arange(cap))  # built-in test sets are in random order
        else:
            # Folders list images class by class: a spread over the whole set keeps every class.
            test = test.take(np.unique(np.linspace(0, len(test) - 1, cap).round().astype(int)))
    return test, f"{key}={value!r}, {len(test)} images"


def prepare_node_dirs(
    out_dir: str | os.PathLike,
    num_nodes: int,
    dataset: str = "fashion_mnist",
    partitioner: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    max_examples: int = 0,
) -> list[Path]:
    """Write ``out_dir/node-<i>/partition.npz``, one partition of a built-in dataset per node.

    For demos and tests of deployments, where each SuperNode reads its own
    folder (``--node-config 'data-dir="..."'``). ``max_examples`` > 0 caps each.
    """
    train = load_builtin(dataset).train
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
