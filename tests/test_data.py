"""Datasets and partitions, on the real Fashion-MNIST files."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from image_trees import DEMO_CLASSES, write_tree

from fl_app.cache import CACHE_ENV
from fl_app.config import RunConfig, defaults
from fl_app.data import (
    load_data_dir,
    load_node_data,
    load_test_set,
    prepare_node_dirs,
    run_classes,
    split_node_data,
)
from fl_app.data.builtin import CLASS_NAMES, DEBIAN_FASHION_MNIST, IDX_FILES, load_builtin, read_idx
from fl_app.data.partition import split_indices

FASHION = CLASS_NAMES["fashion_mnist"]


def run_config(**values) -> RunConfig:
    """The default run config with some keys (Flower names, ``_`` for ``-``) changed."""
    return RunConfig.parse({**defaults(), **{k.replace("_", "-"): v for k, v in values.items()}})


needs_fmnist = pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / IDX_FILES["x_train"]).is_file(),
    reason="apt-get install dataset-fashion-mnist (.ci/run does)",
)


@needs_fmnist
def test_idx_loader_reads_the_real_fashion_mnist_files():
    images = read_idx(DEBIAN_FASHION_MNIST / IDX_FILES["x_train"])
    labels = read_idx(DEBIAN_FASHION_MNIST / IDX_FILES["y_train"])
    test_images = read_idx(DEBIAN_FASHION_MNIST / IDX_FILES["x_test"])
    assert images.shape == (60_000, 28, 28) and images.dtype == np.uint8
    assert test_images.shape == (10_000, 28, 28)
    # Fashion-MNIST is balanced: 6,000 training images per class.
    assert np.bincount(labels).tolist() == [6_000] * 10
    assert 0 < images.mean() < 255


@needs_fmnist
def test_fashion_mnist_loads_offline_with_a_channel_axis():
    data = load_builtin("fashion_mnist")
    assert data.train.x.shape == (60_000, 28, 28, 1)
    assert data.test.y.dtype == np.int64 and data.test.y.max() == 9
    config = run_config(max_test_examples=300)
    assert run_classes(config) == FASHION
    test, what = load_test_set(config, FASHION)
    assert test.x.shape == (300, 28, 28, 1) and "fashion_mnist" in what
    assert load_test_set(run_config(test_data="none"), FASHION)[0] is None


def test_idx_loader_refuses_broken_files(tmp_path):
    good = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + np.array([2, 3, 4], ">u4").tobytes()
    path = tmp_path / "ok-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + good.tobytes()))
    np.testing.assert_array_equal(read_idx(path), good)

    truncated = tmp_path / "short-idx3-ubyte"
    truncated.write_bytes(header + good.tobytes()[:-1])
    with pytest.raises(ValueError, match="is truncated"):
        read_idx(truncated)
    not_idx = tmp_path / "notes.txt"
    not_idx.write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(not_idx)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
@pytest.mark.parametrize("num_partitions", [1, 3, 10])
def test_partitions_are_disjoint_and_complete(partitioner, num_partitions):
    labels = np.random.default_rng(0).integers(0, 10, 2_000)
    parts = split_indices(labels, partitioner, num_partitions, alpha=0.3, seed=1)
    assert len(parts) == num_partitions
    everything = np.concatenate(parts)
    assert len(everything) == len(labels)
    assert np.array_equal(np.sort(everything), np.arange(len(labels)))


def test_iid_is_the_stride_split():
    labels = np.zeros(11, np.int64)
    parts = split_indices(labels, "iid", 3)
    assert [p.tolist() for p in parts] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]


def test_dirichlet_is_skewed_and_reproducible():
    labels = np.repeat(np.arange(10), 300)
    parts = split_indices(labels, "dirichlet", 5, alpha=0.1, seed=7)
    again = split_indices(labels, "dirichlet", 5, alpha=0.1, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    # With alpha=0.1 most partitions are dominated by a few classes.
    shares = [np.bincount(labels[p], minlength=10).max() / max(len(p), 1) for p in parts]
    assert np.median(shares) > 0.3
    iid_shares = [
        np.bincount(labels[p], minlength=10).max() / len(p) for p in split_indices(labels, "iid", 5)
    ]
    assert max(iid_shares) < 0.11


@needs_fmnist
def test_node_data_is_capped_and_split_into_disjoint_train_and_validation():
    config = run_config(seed=3, max_examples_per_node=200, val_fraction=0.25)
    a = load_node_data(config, FASHION, 0, 4)
    b = load_node_data(config, FASHION, 1, 4)
    assert len(a.train.y) == 150 and len(a.val.y) == 50
    assert a.train.x.shape[1:] == (28, 28, 1)
    # No image is shared between train and validation or between nodes.
    seen = [x.tobytes() for x in (*a.train.x, *a.val.x, *b.train.x, *b.val.x)]
    assert len(set(seen)) >= len(seen) - 2  # Fashion-MNIST has a few duplicate images


def test_bad_names_and_values_are_refused_with_the_allowed_ones():
    with pytest.raises(
        ValueError, match="dataset='imagenet' is not one of: fashion_mnist, mnist, cifar10"
    ):
        load_builtin("imagenet")
    with pytest.raises(ValueError, match="partitioner='shards' is not one of: iid, dirichlet"):
        split_indices(np.zeros(10), "shards", 2)
    with pytest.raises(ValueError, match="dirichlet-alpha=0 must be > 0"):
        split_indices(np.zeros(10), "dirichlet", 2, alpha=0)
    with pytest.raises(ValueError, match=r"partition-id=4 is out of range 0\.\.3"):
        load_node_data(run_config(), FASHION, 4, 4)


@needs_fmnist
def test_prepared_node_dirs_load_back_as_disjoint_partitions(tmp_path):
    folders = prepare_node_dirs(tmp_path, 3, max_examples=50, seed=4)
    assert [f.name for f in folders] == ["node-0", "node-1", "node-2"]
    parts = [load_data_dir(f, FASHION, 32) for f in folders]
    assert all(p.x.shape == (50, 28, 28, 1) and p.x.dtype == np.uint8 for p in parts)
    seen = {x.tobytes() for p in parts for x in p.x}
    assert len(seen) >= 148  # disjoint rows (Fashion-MNIST repeats a few images)
    node = split_node_data(parts[0], seed=1, stream=0, max_examples=40, val_fraction=0.25)
    assert len(node.train.y) == 30 and len(node.val.y) == 10


def test_image_folders_are_labelled_by_their_name_in_the_run_classes(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(5)
    for name in ("Trouser", "Bag"):
        (tmp_path / name).mkdir()
        for i in range(2):
            pixels = rng.integers(0, 256, (20, 24), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    (tmp_path / "Bag" / "notes.txt").write_text("not an image")
    data = load_data_dir(tmp_path, FASHION, 32)
    assert data.x.shape == (4, 32, 32, 3)
    assert data.y.tolist() == [8, 8, 1, 1]  # Bag, Trouser: indices in the run's classes
    first = Image.open(tmp_path / "Bag" / "0.png").convert("RGB")
    first = first.resize((32, 32), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(data.x[0], np.asarray(first))


def _garbage_file(d):
    (d / "partition.npz").write_bytes(b"garbage")


def _float_images(d):
    np.savez(d / "partition.npz", x=np.zeros((2, 4, 4), np.float32), y=[0, 1])


def _bad_labels(d):
    np.savez(d / "partition.npz", x=np.zeros((2, 4, 4), np.uint8), y=[0, 12])


@pytest.mark.parametrize(
    "make,message",
    [
        (None, "is not a folder"),
        (lambda d: None, "holds no examples"),
        (_garbage_file, "cannot be read"),
        (_float_images, "expected uint8"),
        (_bad_labels, "labels 0..12 outside 0..9"),
    ],
)
def test_bad_data_dirs_are_refused_with_one_clear_line(tmp_path, make, message):
    folder = tmp_path / "missing" if make is None else tmp_path
    if make is not None:
        make(folder)
    with pytest.raises((FileNotFoundError, ValueError), match=message) as err:
        load_data_dir(folder, FASHION, 32)
    assert "\n" not in str(err.value) and "data-dir=" in str(err.value)


def test_a_test_data_folder_is_the_server_test_set_spread_over_its_classes(tmp_path):
    write_tree(tmp_path / "train", 4)
    write_tree(tmp_path / "held", 10, split="test")
    config = run_config(
        dataset=str(tmp_path / "train"), test_data=str(tmp_path / "held"), max_test_examples=6
    )
    classes = run_classes(config)
    test, what = load_test_set(config, classes)
    assert what.startswith("test-data=") and len(test) == 6
    # Folders list images class by class: the cap keeps every class, not the first one.
    assert sorted(set(test.y.tolist())) == [0, 1, 2] and len(classes) == len(DEMO_CLASSES)
    assert test.x.shape == (6, 32, 32, 3)
    # A tree without test/ gives the server no test set, and says so.
    none, why = load_test_set(run_config(dataset=str(tmp_path / "train")), classes)
    assert none is None and "has no test split" in why


# One ClientApp actor of a simulation: its node's rows, and where its images live.
ACTOR = """
import json, sys
from fl_app.config import RunConfig, defaults
from fl_app.data import _partitions, load_node_data, run_classes
from fl_app.data.builtin import load_builtin
config = RunConfig.parse({**defaults(), "partitioner": "dirichlet", "dirichlet-alpha": 0.3})
classes = run_classes(config)
load_node_data(config, classes, 7, 1000)
images = load_builtin("fashion_mnist").train.x
print(json.dumps({
    "rows": _partitions(config, classes, 1000)[7].tolist(),
    "images": str(images.filename), "writeable": images.flags.writeable,
    "partitioned here": "datasets" in sys.modules,
}))
"""


@pytest.mark.e2e
@needs_fmnist
def test_a_machine_decodes_and_partitions_once_and_its_processes_share_the_files(tmp_path):
    env = {**os.environ, CACHE_ENV: str(tmp_path)}
    first, second = (
        json.loads(
            subprocess.run(
                [sys.executable, "-c", ACTOR], env=env, capture_output=True, text=True, check=True
            ).stdout.splitlines()[-1]
        )
        for _ in range(2)
    )
    # Only the first process ran the Dirichlet split (it imports Hugging Face datasets).
    assert first["partitioned here"] and not second["partitioned here"]
    labels = load_builtin("fashion_mnist").train.y
    expected = split_indices(labels, "dirichlet", 1000, alpha=0.3, seed=defaults()["seed"])[7]
    assert first["rows"] == second["rows"] == expected.tolist()
    # Both map the one decoded file, read-only, instead of holding a copy each.
    assert first["images"] == second["images"]
    assert first["images"].startswith(str(tmp_path / "datasets"))
    assert not first["writeable"] and not second["writeable"]
