"""ClientApp train and evaluate, called directly with real Messages, Contexts and a tiny ResNet50.

No Flower processes: these are the unit tier of what `flwr run` checks end to end.
The model is built once per module and the first fit traces for seconds, so the
tests share a few train replies (module fixtures) and check several things on each.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import keras
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from helpers import REPO, message_metadata

from fl_app import client_task
from fl_app.cache import CACHE_ENV
from fl_app.config import RunConfig
from fl_app.data import CLASSES_KEY, PARTITION_FILE, load_node_data
from fl_app.data.builtin import CLASS_NAMES
from fl_app.model import features, node_inputs
from fl_app.model.classifier import build_model, is_head_variable, to_arrayrecord
from fl_app.schedule import FINE_TUNE, HEAD
from fl_app.wire.exchange import BASE, BASE_HASH, base_hash

# `make test` runs these again with KERAS_BACKEND=jax.
pytestmark = pytest.mark.jax

with (REPO / "pyproject.toml").open("rb") as file:
    PYPROJECT_RUN_CONFIG = tomllib.load(file)["tool"]["flwr"]["app"]["config"]
RUN_CONFIG = {
    **PYPROJECT_RUN_CONFIG,
    "input-size": 32,
    "max-examples-per-node": 64,
    "batch-size": 32,
    "weights": "none",
    "fine-tune-layers": 32,  # ResNet50's conv5 block: fine-tuning trains on conv4's output
}
IMAGE_SHAPE = (28, 28, 1)
FASHION = list(CLASS_NAMES["fashion_mnist"])
NUM_CLASSES = len(FASHION)
# A deployed node's partition.npz: 80 images, capped to 64, so 58 train and 6 validate.
NODE_EXAMPLES, TRAIN_SIZE, VAL_SIZE = 80, 58, 6


def round_config(server_round: int = 1, phase: str = HEAD, learning_rate: float = 1e-3):
    """What the server decides per round: the train message's ConfigRecord.

    With the run's class list; nothing else travels: batch size, local epochs and
    fine-tune layers are the node's ``context.run_config``.
    """
    return ConfigRecord(
        {
            "server-round": server_round,
            "phase": phase,
            "learning-rate": learning_rate,
            CLASSES_KEY: FASHION,
        }
    )


def evaluate_config(server_round: int = 1) -> ConfigRecord:
    """The evaluate message's ConfigRecord: the round and the class list."""
    return ConfigRecord({"server-round": server_round, CLASSES_KEY: FASHION})


def message(
    arrays: ArrayRecord,
    config: ConfigRecord,
    base: ArrayRecord | None = None,
    base_name: str | None = None,
    message_type: str = MessageType.TRAIN,
) -> Message:
    """A message from the server to node 1, as the strategy addresses it.

    Trainable-only exchange: ``base`` travels the first time, named by its hash;
    later messages name the base (``base_name``) without it.
    """
    content = RecordDict({"arrays": arrays, "config": config})
    if base is not None:
        content[BASE] = base
        base_name = base_hash(base)
    if base_name is not None:
        config[BASE_HASH] = base_name
    return Message(content, metadata=message_metadata(0, 1, message_type))


def context(node_config: dict, **run_config) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config=node_config,
        state=RecordDict(),
        run_config={**RUN_CONFIG, **run_config},
    )


@pytest.fixture(scope="module")
def initial() -> ArrayRecord:
    """The global model a server would start from (random weights, seeded)."""
    keras.utils.set_random_seed(0)
    return to_arrayrecord(build_model(NUM_CLASSES, IMAGE_SHAPE, RUN_CONFIG["input-size"]))


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> dict[str, str]:
    """Node config of a deployed SuperNode: its own data-dir and cache-dir."""
    root = tmp_path_factory.mktemp("node")
    rng = np.random.default_rng(0)
    (root / "data").mkdir()
    np.savez(
        root / "data" / PARTITION_FILE,
        x=rng.integers(0, 256, (NODE_EXAMPLES, *IMAGE_SHAPE), dtype=np.uint8),
        y=rng.integers(0, NUM_CLASSES, NODE_EXAMPLES),
    )
    return {"data-dir": str(root / "data"), "cache-dir": str(root / "cache")}


def train(arrays, node_config, base=None, base_name=None, **run_config) -> Message:
    msg = message(arrays, round_config(), base, base_name)
    reply = client_task.train(msg, context(node_config, **run_config))
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    return reply


@pytest.fixture(scope="module")
def cached(initial, node) -> Message:
    """A head-phase train reply to the full model, on cached pooled features."""
    return train(initial, node, **{"feature-cache": True})


def arrays_of(reply: Message) -> dict[str, np.ndarray]:
    assert list(reply.content.array_records) == ["arrays"]
    return {key: array.numpy() for key, array in reply.content["arrays"].items()}


def test_head_phase_changes_the_head_arrays_only(initial, cached):
    trained = arrays_of(cached)
    assert list(trained) == list(initial.keys())
    changed = [k for k, a in trained.items() if not np.array_equal(a, initial[k].numpy())]
    assert changed and all(is_head_variable(k) for k in changed)
    # Every head kernel and bias trained; the frozen backbone came back bit for bit.
    assert sorted(changed) == sorted(k for k in initial.keys() if is_head_variable(k))
    for key, array in trained.items():
        assert array.dtype == initial[key].numpy().dtype and array.shape == initial[key].shape


def test_train_metrics_are_finite_and_count_the_train_split(cached):
    metrics = cached.content["metrics"]
    assert set(metrics) == {
        "num-examples",
        "train_loss",
        "train_accuracy",
        "train_time",
        "client_time",
        "skipped_images",
    }
    assert metrics["skipped_images"] == 0
    assert metrics["num-examples"] == TRAIN_SIZE
    assert all(math.isfinite(value) for value in metrics.values())
    assert 0 < metrics["train_loss"] and 0 <= metrics["train_accuracy"] <= 1
    assert 0 < metrics["train_time"] <= metrics["client_time"]


def test_the_feature_cache_changes_no_reply_array(initial, node, cached):
    full_model = train(initial, node, **{"feature-cache": False})
    on, off = arrays_of(cached), arrays_of(full_model)
    for key in on:
        np.testing.assert_allclose(on[key], off[key], rtol=1e-5, atol=1e-5, err_msg=key)
    assert full_model.content["metrics"]["num-examples"] == TRAIN_SIZE


def test_evaluate_reports_loss_and_accuracy_on_the_validation_split(initial, node, cached):
    msg = message(initial, evaluate_config(), message_type=MessageType.EVALUATE)
    # Training cached the validation features: evaluation runs the head on them.
    reply = client_task.evaluate(msg, context(node))
    metrics = reply.content["metrics"]
    assert set(metrics) == {"num-examples", "eval_loss", "eval_accuracy", "skipped_images"}
    assert metrics["num-examples"] == VAL_SIZE
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0
    assert 0 <= metrics["eval_accuracy"] <= 1
    assert not reply.content.array_records

    full_model = client_task.evaluate(msg, context(node, **{"feature-cache": False}))
    for key in ("eval_loss", "eval_accuracy"):
        assert full_model.content["metrics"][key] == pytest.approx(metrics[key], rel=1e-5)


def test_fine_tune_phase_trains_conv5_and_the_head_but_not_batchnorm(initial, node):
    msg = message(initial, round_config(server_round=2, phase=FINE_TUNE, learning_rate=1e-4))
    reply = client_task.train(msg, context(node))
    trained = arrays_of(reply)
    changed = {k for k, a in trained.items() if not np.array_equal(a, initial[k].numpy())}
    # ResNet50's conv5 block is its last 32 layers: its convolutions train, its
    # BatchNorm (weights and statistics) stays frozen; and the head trains.
    conv5 = {k for k in initial.keys() if k.startswith("conv5_") and "_bn/" not in k}
    expected = conv5 | {k for k in initial.keys() if is_head_variable(k)}
    assert changed == expected and len(expected) == 2 * 10 + 4
    assert reply.content["metrics"]["num-examples"] == TRAIN_SIZE
    assert math.isfinite(reply.content["metrics"]["train_loss"])


def test_a_simulated_node_evaluates_its_partition(initial, tmp_path):
    partition = {"partition-id": 0, "num-partitions": 2}
    msg = message(initial, evaluate_config(), message_type=MessageType.EVALUATE)
    reply = client_task.evaluate(msg, context({**partition, "cache-dir": str(tmp_path)}))
    expected = load_node_data(RunConfig.parse(RUN_CONFIG, check_files=False), FASHION, 0, 2)
    assert reply.content["metrics"]["num-examples"] == len(expected.val.y) > 0
    assert math.isfinite(reply.content["metrics"]["eval_loss"])


def test_simulated_nodes_share_the_machines_activation_cache_across_actors(
    initial, tmp_path, monkeypatch
):
    """A simulated node served by another Ray actor (a process with an empty memory tier)
    finds the activations the first one computed on the machine's disk."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    passes = []
    compute = features.predict_within
    monkeypatch.setattr(
        node_inputs, "predict_within", lambda *a, **k: passes.append(1) or compute(*a, **k)
    )
    simulated = {"partition-id": 1, "num-partitions": 2}  # no data-dir, no cache-dir

    first = train(initial, simulated)
    assert len(passes) == 2  # the train and the validation split's pooled features
    assert len(list((tmp_path / "features").glob("*.npy"))) == 2
    client_task._cache_store.cache_clear()  # the next actor: nothing in memory
    second = train(initial, simulated)

    assert len(passes) == 2  # from disk: no new pass through the backbone
    for key in first.content["arrays"]:
        np.testing.assert_array_equal(
            first.content["arrays"][key].numpy(), second.content["arrays"][key].numpy()
        )


def test_a_node_keeps_its_base_and_rebuilds_the_model_without_it(initial, node, cached):
    head = ArrayRecord({k: a for k, a in initial.items() if is_head_variable(k)})
    name = base_hash(initial)
    first = train(head, node, base=initial)
    # The base is on disk in the cache-dir, under its hash, for the node's next process.
    assert [p for p in Path(node["cache-dir"]).rglob(f"{name}*") if p.is_file()]
    later = train(head, node, base_name=name)  # the node lays the head over its base

    for reply in (first, later):
        trained = arrays_of(reply)
        assert list(trained) == list(head.keys())  # exactly the keys sent
        # The model rebuilt from base + head is the full model: the same training.
        full = arrays_of(cached)
        for key, array in trained.items():
            np.testing.assert_allclose(array, full[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_bases_that_differ_only_in_the_head_share_the_activations(
    initial, node, tmp_path, monkeypatch
):
    """Two runs whose heads start differently: same backbone, so the same cache entries."""
    passes = []
    compute = features.predict_within
    monkeypatch.setattr(
        node_inputs, "predict_within", lambda *a, **k: passes.append(1) or compute(*a, **k)
    )
    here = {**node, "cache-dir": str(tmp_path)}
    other = ArrayRecord(
        {k: Array(a.numpy() + 0.01) if is_head_variable(k) else a for k, a in initial.items()}
    )
    assert base_hash(other) != base_hash(initial)
    for base in (initial, other):
        head = ArrayRecord({k: a for k, a in base.items() if is_head_variable(k)})
        train(head, here, base=base)
        client_task._cache_store.cache_clear()  # the next run's process: nothing in memory

    assert len(passes) == 2  # the first run's train and validation splits only
    assert len(list((tmp_path / "features").glob("*.npy"))) == 2


def test_a_base_that_does_not_match_its_hash_is_refused(initial, node, tmp_path):
    head = ArrayRecord({k: a for k, a in initial.items() if is_head_variable(k)})
    msg = message(head, round_config(), base=initial)
    msg.content["config"][BASE_HASH] = "0" * 40  # e.g. corrupted on the way
    with pytest.raises(ValueError, match="does not match its hash 000000000000"):
        client_task.train(msg, context({**node, "cache-dir": str(tmp_path)}))
    assert not (tmp_path / "bases").exists() or not any((tmp_path / "bases").iterdir())


def test_a_node_without_the_base_named_asks_for_it(initial, node, tmp_path):
    head = ArrayRecord({k: a for k, a in initial.items() if is_head_variable(k)})
    msg = message(head, round_config(), base_name=base_hash(initial))
    with pytest.raises(LookupError, match="does not hold base model"):
        client_task.train(msg, context({**node, "cache-dir": str(tmp_path)}))
