"""Datasets and partitions, on the real Fashion-MNIST files."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from fl_app.data import (
    DEBIAN_FASHION_MNIST,
    IDX_FILES,
    load_dataset,
    load_node_data,
    load_test_set,
    read_idx,
    split_indices,
)

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
    data = load_dataset("fashion_mnist")
    assert data.train.x.shape == (60_000, 28, 28, 1)
    assert data.test.y.dtype == np.int64 and data.test.y.max() == 9
    assert load_test_set("fashion_mnist", 300).x.shape == (300, 28, 28, 1)


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
    a = load_node_data("fashion_mnist", 0, 4, "iid", seed=3, max_examples=200, val_fraction=0.25)
    b = load_node_data("fashion_mnist", 1, 4, "iid", seed=3, max_examples=200, val_fraction=0.25)
    assert len(a.train.y) == 150 and len(a.val.y) == 50
    assert a.train.x.shape[1:] == (28, 28, 1)
    # No image is shared between train and validation or between nodes.
    seen = [x.tobytes() for x in (*a.train.x, *a.val.x, *b.train.x, *b.val.x)]
    assert len(set(seen)) >= len(seen) - 2  # Fashion-MNIST has a few duplicate images


def test_bad_names_and_values_are_refused_with_the_allowed_ones():
    with pytest.raises(
        ValueError, match="dataset='imagenet' is not one of: fashion_mnist, mnist, cifar10"
    ):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="partitioner='shards' is not one of: iid, dirichlet"):
        split_indices(np.zeros(10), "shards", 2)
    with pytest.raises(ValueError, match="dirichlet-alpha=0 must be > 0"):
        split_indices(np.zeros(10), "dirichlet", 2, alpha=0)
    with pytest.raises(ValueError, match=r"partition-id=4 is out of range 0\.\.3"):
        load_node_data("fashion_mnist", 4, 4)
