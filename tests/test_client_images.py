"""A deployed node on its own image folder: the run's class list, unreadable files, bad folders.

The ClientApp is called directly with real Messages; the images are real PNG/JPEG
files (tests/image_trees.py).
"""

from __future__ import annotations

import shutil

import keras
import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from helpers import message_metadata
from image_trees import write_tree
from test_client import RUN_CONFIG

from fl_app import client_task
from fl_app.data import CLASSES_KEY
from fl_app.model.classifier import build_model, to_arrayrecord
from fl_app.schedule import HEAD

# `make test` runs these again with KERAS_BACKEND=jax.
pytestmark = pytest.mark.jax

# The run's classes, in the order the server sent them: not the folders' sorted order.
CLASSES = ["trouser", "sac à main", "ankle boot"]


def message(arrays, message_type=MessageType.TRAIN, classes=CLASSES) -> Message:
    config = {"server-round": 1, "phase": HEAD, "learning-rate": 1e-3}
    if classes is not None:
        config[CLASSES_KEY] = classes
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
    return Message(content, metadata=message_metadata(0, 1, message_type))


def context(data_dir, cache_dir) -> Context:
    run_config = {**RUN_CONFIG, "max-examples-per-node": 0, "val-fraction": 0.25}
    node = {"data-dir": str(data_dir), "cache-dir": str(cache_dir)}
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=run_config)


@pytest.fixture(scope="module")
def initial():
    keras.utils.set_random_seed(0)
    return to_arrayrecord(build_model(len(CLASSES), (32, 32, 3), 32))


@pytest.fixture(scope="module")
def node_without_a_class(tmp_path_factory):
    """A node holding two of the three classes, and one file that is not an image."""
    root = tmp_path_factory.mktemp("node")
    return write_tree(root / "data", 12, ["ankle boot", "sac à main"], corrupt=True)


def test_a_node_lacking_a_class_trains_with_the_run_classes_and_skips_a_corrupt_file(
    initial, node_without_a_class, tmp_path
):
    reply = client_task.train(message(initial), context(node_without_a_class, tmp_path))
    metrics = reply.content["metrics"]
    # 24 readable images + 1 corrupt; a quarter validates; the corrupt one is counted.
    assert metrics["skipped_images"] + metrics["num-examples"] == 19
    assert metrics["num-examples"] in (18, 19)
    prediction_width = reply.content["arrays"]["predictions/bias"].numpy().shape
    assert prediction_width == (3,)  # the head has the run's 3 outputs

    evaluated = client_task.evaluate(
        message(initial, MessageType.EVALUATE), context(node_without_a_class, tmp_path)
    )
    total = evaluated.content["metrics"]
    assert total["num-examples"] + total["skipped_images"] == 6
    assert np.isfinite(total["eval_loss"])


def test_a_folder_that_is_no_run_class_fails_the_node_with_one_line(initial, tmp_path):
    data = write_tree(tmp_path / "data", 2, ["trouser"])
    shutil.copytree(data / "trouser", data / "fox")
    with pytest.raises(ValueError) as err:
        client_task.train(message(initial), context(data, tmp_path / "cache"))
    line = str(err.value)
    assert "\n" not in line and "fox" in line and "trouser, sac à main, ankle boot" in line


def test_an_empty_node_and_a_message_without_classes_fail_with_one_line(initial, tmp_path):
    empty = tmp_path / "empty"
    (empty / "trouser").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no examples") as err:
        client_task.train(message(initial), context(empty, tmp_path / "cache"))
    assert "\n" not in str(err.value)
    data = write_tree(tmp_path / "data", 2, ["trouser"])
    with pytest.raises(ValueError, match="carries no class list"):
        client_task.train(message(initial, classes=None), context(data, tmp_path / "cache"))
