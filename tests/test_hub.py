"""Hugging Face datasets as a run's data: save_to_disk and parquet folders, offline hub ids."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from fl_app.config import RunConfig, defaults
from fl_app.data import dataset_ref, load_node_data, load_test_set, run_classes
from fl_app.data.hub import (
    TableSource,
    columns,
    global_labels,
    hub_reachable,
    load_table,
    table_classes,
)
from fl_app.data.images import read_image, scan_class_folders
from tests.image_trees import DEMO_CLASSES, write_tree

datasets = pytest.importorskip("datasets")

NAMES = sorted(DEMO_CLASSES)  # the ClassLabel names, as imagefolder would sort them
# The run's classes in another order than the dataset's: labels must follow the names.
REORDERED = ("trouser", "ankle boot", "sac à main")


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """Hugging Face offline, with its cache in a temporary folder, restored afterwards.

    ``load_table`` sets ``datasets.config.HF_HUB_OFFLINE`` when the hub is unreachable;
    the monkeypatch puts it back for the tests that follow.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_cache"))
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        yield
        if bars:
            datasets.enable_progress_bars()


def _table(tree: Path, label_feature) -> datasets.Dataset:
    """A tree's images as a table: image bytes as stored (PNG or JPEG), label, folder, file."""
    paths, labels = scan_class_folders(tree, NAMES)
    folders = [Path(p).parent.name for p in paths]
    values = folders if getattr(label_feature, "dtype", "") == "string" else labels.tolist()
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": label_feature,
            "folder": datasets.Value("string"),
            "file": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": Path(p).read_bytes(), "path": Path(p).name} for p in paths],
            "label": values,
            "folder": folders,
            "file": paths,
        },
        features=features,
    )


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """A train and a test tree from Fashion-MNIST's train and test splits."""
    root = tmp_path_factory.mktemp("trees")
    return {
        "train": write_tree(root / "train", 6),
        "test": write_tree(root / "test", 3, split="test"),
    }


@pytest.fixture(scope="module")
def disk(tmp_path_factory, trees) -> Path:
    """A save_to_disk DatasetDict: train and test, an Image and a ClassLabel column."""
    label = datasets.ClassLabel(names=NAMES)
    folder = tmp_path_factory.mktemp("disk") / "fashion"
    splits = {split: _table(tree, label) for split, tree in trees.items()}
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def parquet_ints(tmp_path_factory, trees) -> Path:
    """A folder of parquet files, train and test, with int labels (no ClassLabel)."""
    folder = tmp_path_factory.mktemp("parquet_ints")
    for split, tree in trees.items():
        _table(tree, datasets.Value("int64")).to_parquet(str(folder / f"{split}-00000.parquet"))
    return folder


@pytest.fixture(scope="module")
def parquet_names(tmp_path_factory, trees) -> Path:
    """A folder with one parquet file, no test split, whose labels are class names."""
    folder = tmp_path_factory.mktemp("parquet_names")
    _table(trees["train"], datasets.Value("string")).to_parquet(str(folder / "data.parquet"))
    return folder


def _config(dataset: Path | str, **values) -> RunConfig:
    flower = {key.replace("_", "-"): value for key, value in values.items()}
    return RunConfig.parse({**defaults(), "dataset": str(dataset), "input-size": 32, **flower})


def _check_rows(split, classes: tuple[str, ...]) -> None:
    """Every row's label is its folder's index in ``classes``; its image the file's, decoded."""
    source = split.source
    assert isinstance(source, TableSource)
    table = source.table
    images, ok = split.read(np.arange(len(split)))
    assert ok.all() and images.shape == (len(split), 32, 32, 3) and images.dtype == np.uint8
    for position, row in enumerate(split.rows.tolist()):
        assert split.y[position] == classes.index(table[row]["folder"])
        np.testing.assert_array_equal(images[position], read_image(table[row]["file"], 32, 3))


# --- where a dataset value points ----------------------------------------------------------


def test_dataset_values_resolve_to_their_kind(tmp_path, trees, disk, parquet_ints):
    assert dataset_ref("fashion_mnist") == ("builtin", "fashion_mnist")
    assert dataset_ref(str(trees["train"])) == ("folder", str(trees["train"]))
    assert dataset_ref(str(disk)) == ("disk", str(disk))
    assert dataset_ref(str(parquet_ints)) == ("parquet", str(parquet_ints))
    assert dataset_ref("uoft-cs/cifar10") == ("hub", "uoft-cs/cifar10")

    single = tmp_path / "single"
    datasets.Dataset.from_dict({"label": [0, 1]}).save_to_disk(str(single))
    assert dataset_ref(str(single)).kind == "disk"
    assert "train" in load_table("disk", str(single), "dataset")

    with pytest.raises(ValueError, match="is not a folder"):
        dataset_ref(str(tmp_path / "missing"), "test-data")
    with pytest.raises(ValueError, match="is not allowed: expected"):
        dataset_ref("not a hub id")


# --- save_to_disk: ClassLabel names mapped to the run's classes ---------------------------


def test_a_save_to_disk_dataset_gives_nodes_and_a_test_set(disk):
    config = _config(disk)
    classes = run_classes(config)
    assert classes == tuple(NAMES)

    nodes = [load_node_data(config, classes, i, 2) for i in range(2)]
    rows = np.concatenate([part.rows for node in nodes for part in node])
    assert sorted(rows.tolist()) == list(range(18))  # disjoint, complete partitions
    for node in nodes:
        _check_rows(node.train, classes)

    test, description = load_test_set(config, classes)
    assert test is not None and len(test) == 9 and "9 images" in description
    _check_rows(test, classes)
    assert test.image_shape == (32, 32, 3)


def test_class_label_names_map_to_the_run_classes_by_name(disk):
    config = _config(disk, classes=",".join(REORDERED))
    classes = run_classes(config)
    assert classes == REORDERED
    node = load_node_data(config, classes, 0, 1)
    _check_rows(node.train, classes)
    test, _ = load_test_set(config, classes)
    _check_rows(test, classes)
    assert sorted(set(test.y.tolist())) == [0, 1, 2]

    with pytest.raises(ValueError) as err:
        load_test_set(_config(disk, classes="trouser,ankle boot,shirt"), ("trouser", "shirt"))
    message = str(err.value)
    assert "\n" not in message and "'ankle boot' is not a known class" in message


def test_naming_a_missing_column_is_one_line_listing_the_columns(disk):
    for key in ("image-column", "label-column"):
        config = _config(disk, **{key.replace("-", "_"): "photo"})
        with pytest.raises(ValueError) as err:
            load_test_set(config, NAMES)
        message = str(err.value)
        assert "\n" not in message
        assert f"{key}='photo' is not a column" in message
        assert message.endswith("image, label, folder, file")


def test_columns_are_found_by_feature_type_or_named():
    table = datasets.Dataset.from_dict(
        {"pic": [b""], "y": [0], "other": ["x"]},
        features=datasets.Features(
            {
                "pic": datasets.Image(),
                "y": datasets.ClassLabel(names=["a", "b"]),
                "other": datasets.Value("string"),
            }
        ),
    )
    assert columns(table, "", "", "dataset") == ("pic", "y")
    assert columns(table, "pic", "other", "dataset") == ("pic", "other")
    untyped = datasets.Dataset.from_dict({"a": [1], "b": [2]})
    with pytest.raises(ValueError) as err:
        columns(untyped, "", "", "dataset")
    assert "\n" not in str(err.value) and "set image-column to one of a, b" in str(err.value)


# --- parquet: int labels are indices, string labels are names ------------------------------


def test_a_parquet_folder_with_int_labels(parquet_ints):
    config = _config(parquet_ints)
    classes = run_classes(config)
    assert classes == ("0", "1", "2")
    _check_rows(load_node_data(config, classes, 1, 2).train, classes=tuple(NAMES))
    test, _ = load_test_set(config, classes)
    _check_rows(test, tuple(NAMES))  # int label i is the run's class i, whatever its name

    named = _config(parquet_ints, classes=",".join(REORDERED))
    test, _ = load_test_set(named, REORDERED)
    assert test.y.tolist() == list(test.source.table["label"])


def test_an_int_label_beyond_the_run_classes_is_one_line(parquet_ints):
    config = _config(parquet_ints, classes="a,b")
    with pytest.raises(ValueError) as err:
        load_test_set(config, run_classes(config))
    message = str(err.value)
    assert "\n" not in message
    assert "holds label 2, outside 0..1" in message and message.startswith("dataset:")


def test_a_parquet_folder_with_name_labels_and_no_test_split(tmp_path, parquet_names):
    config = _config(parquet_names, classes=",".join(REORDERED))
    assert run_classes(_config(parquet_names)) == tuple(NAMES)  # sorted label values
    node = load_node_data(config, REORDERED, 0, 1)
    _check_rows(node.train, REORDERED)
    none = (None, f"dataset={str(parquet_names)!r} has no test split")
    assert load_test_set(config, REORDERED) == none

    # As test-data, a table without a test split is the test set itself.
    as_test = _config(tmp_path, classes=",".join(REORDERED), test_data=str(parquet_names))
    test, description = load_test_set(as_test, REORDERED)
    assert len(test) == 18 and description.startswith("test-data=")
    _check_rows(test, REORDERED)

    with pytest.raises(ValueError) as err:
        load_node_data(_config(parquet_names, classes="trouser,shirt"), ("trouser", "shirt"), 0, 1)
    message = str(err.value)
    assert "\n" not in message and "is not a known class" in message and "trouser, shirt" in message


# --- label columns ------------------------------------------------------------------------


def test_int_label_classes_are_in_numeric_order():
    table = datasets.Dataset.from_dict({"label": [11, 2, 10, 0, 1]})
    classes = table_classes(table, "label")
    assert classes == [str(i) for i in range(12)]
    labels = global_labels(table, "label", classes, "dataset")
    assert [classes[i] for i in labels] == ["11", "2", "10", "0", "1"]


def test_a_class_label_of_minus_one_is_one_line_not_the_last_class():
    # Hugging Face marks unlabelled rows (many hub test splits) with -1.
    table = datasets.Dataset.from_dict(
        {"label": [0, -1, 1]},
        features=datasets.Features({"label": datasets.ClassLabel(names=["a", "b"])}),
    )
    with pytest.raises(ValueError) as err:
        global_labels(table, "label", ("a", "b"), "test-data")
    message = str(err.value)
    assert "\n" not in message and "-1" in message and message.startswith("test-data:")
    assert global_labels(table.select([0, 2]), "label", ("b", "a"), "test-data").tolist() == [1, 0]
    empty = global_labels(table.select([]), "label", ("a", "b"), "test-data")
    assert empty.dtype == np.int64 and empty.size == 0


# --- images in tables ---------------------------------------------------------------------


def test_corrupt_and_null_images_in_a_table_are_skipped_with_one_line_each(trees, flwr_warnings):
    paths, _ = scan_class_folders(trees["test"], NAMES)
    cells = [{"bytes": b"not an image", "path": None}, Path(paths[0]).read_bytes(), None]
    table = datasets.Dataset.from_dict(
        {"image": cells}, features=datasets.Features({"image": datasets.Image()})
    )
    source = TableSource(table, "image", np.array([0, 1, 2]), 16)
    for _ in range(2):
        images, ok = source.read(np.array([0, 1, 2]))
        assert ok.tolist() == [False, True, False] and images.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(images[0], read_image(paths[0], 16, 3))
    assert source.failed == {0, 2}
    assert [r.getMessage() for r in flwr_warnings] == [
        "Skipped unreadable image row 0 (bytes) (cannot identify image file)",
        "Skipped unreadable image row 2 (null) (no image)",
    ]
    assert source.read(np.array([], np.int64))[0].shape == (0, 16, 16, 3)


def test_table_digests_follow_the_rows_and_the_size(disk):
    table = load_table("disk", str(disk), "dataset")["test"]
    labels = np.zeros(len(table), np.int64)
    source = TableSource(table, "image", labels, 32)
    again = TableSource(load_table("disk", str(disk), "dataset")["test"], "image", labels, 32)
    rows = np.array([0, 2])
    assert source.digest(rows) == again.digest(rows)
    assert source.digest(rows) != source.digest(rows[::-1])
    assert source.digest(rows) != TableSource(table, "image", source.labels, 40).digest(rows)


# --- the hub, offline ---------------------------------------------------------------------


def test_a_hub_id_offline_is_one_line():
    config = _config("someone/no-such-dataset", classes="a,b")
    with pytest.raises(ValueError) as err:
        load_test_set(config, ("a", "b"))
    message = str(err.value)
    assert "\n" not in message
    assert "cannot be reached" in message and "not in the local Hugging Face cache" in message
    assert message.startswith("dataset='someone/no-such-dataset'")

    with pytest.raises(ValueError, match="cannot be reached"):
        run_classes(_config("someone/no-such-dataset"))


@pytest.fixture
def local_hub(monkeypatch):
    """The hub client's endpoint on a loopback port nothing listens on (as HF_ENDPOINT sets)."""
    from huggingface_hub import constants

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    return port


def test_an_unreachable_hub_is_found_out_before_the_client_tries(monkeypatch, local_hub):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    assert not hub_reachable()
    with pytest.raises(ValueError) as err:
        load_table("hub", "someone/no-such-dataset", "dataset")
    assert "hub (127.0.0.1) cannot be reached" in str(err.value)
    assert datasets.config.HF_HUB_OFFLINE is True  # so that the client does not retry


def test_the_hub_endpoint_and_a_proxy_decide_whether_it_is_reachable(monkeypatch, local_hub):
    with socket.create_server(("127.0.0.1", local_hub)):
        assert hub_reachable()
    assert not hub_reachable()
    # Behind a proxy only the client's own request can tell; a bypassed host is probed.
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    assert hub_reachable()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert not hub_reachable()
