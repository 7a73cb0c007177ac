"""What a node does with one message: fine-tune the global model on its data, or evaluate it.

Each message: parse it, load the node's data, take the received model, pick what
the models take (`fl_app.model.node_inputs`: cached activations after the frozen
part, or images), train or evaluate the models this process holds
(`fl_app.model.node_models`), reply. Under ``strategy=fedprox`` training adds the
proximal term (`fl_app.model.proximal`); with ``personalize-epochs`` evaluation also
scores a copy of the head fine-tuned on the node's own training split
(`fl_app.model.personalize`).
"""

from __future__ import annotations

import functools
import time
from logging import INFO
from pathlib import Path

import keras
import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import log

from fl_app.cache import node_cache_dir
from fl_app.config import RunConfig
from fl_app.data import CLASSES_KEY, NodeData, load_data_dir, load_node_data, split_node_data
from fl_app.data.batches import Batches, fit_seeded
from fl_app.data.split import Split
from fl_app.model import node_models
from fl_app.model.classifier import compile_model
from fl_app.model.features import FeatureCache, boundaries, cached_split
from fl_app.model.node_inputs import NodeInputs, Received, training_boundary
from fl_app.model.node_models import Shape
from fl_app.model.personalize import personalize
from fl_app.wire.exchange import (
    BASE,
    BASE_DISK_BYTES,
    BASE_HASH,
    BASE_MEMORY_BYTES,
    BaseStore,
    assemble,
    base_hash,
)


def run_config(context: Context) -> RunConfig:
    """The run config, typed (the weights file is the server's, not checked here)."""
    return RunConfig.parse(context.run_config, check_files=False)


def proximal_mu(config: RunConfig) -> float:
    """FedProx's μ for this run: ``proximal-mu`` under ``strategy=fedprox``, else 0 (off)."""
    return config.proximal_mu if config.strategy == "fedprox" else 0.0


@functools.cache
def _cache_store(max_bytes: int, folder: str) -> FeatureCache:
    return FeatureCache(max_bytes, Path(folder))


def _feature_cache(config: RunConfig, context: Context) -> FeatureCache | None:
    if not config.feature_cache:
        return None
    # On disk in simulation too: a simulated node is served by whichever Ray actor is
    # free, and only the disk is shared by the actors of a machine.
    return _cache_store(
        config.feature_cache_mb * 2**20, str(node_cache_dir(context.node_config) / "features")
    )


@functools.cache
def _base_store(folder: str) -> BaseStore:
    return BaseStore(BASE_DISK_BYTES, Path(folder), BASE_MEMORY_BYTES)


def _received_model(msg: Message, context: Context) -> Received:
    """The global model: the arrays that came, over the base this node stores."""
    arrays, config = msg.content["arrays"], msg.content["config"]
    if BASE_HASH not in config:  # full exchange: everything came
        return Received(arrays, arrays, None)
    # On disk in simulation too: a virtual node's next round may run in another actor.
    name, store = (
        str(config[BASE_HASH]),
        _base_store(str(node_cache_dir(context.node_config) / "bases")),
    )
    if BASE in msg.content.array_records:
        base = msg.content[BASE]
        if base_hash(base) != name:
            raise ValueError(f"the base model received does not match its hash {name[:12]}")
        store.put(name, base)
    else:
        base = store.get(name)
        if base is None:
            raise LookupError(
                f"this node does not hold base model {name[:12]}; the server resends it"
            )
    return Received(assemble(base, arrays), arrays, name)


def classes(msg: Message) -> tuple[str, ...]:
    """The run's class list, as the server sends it with every message."""
    config = msg.content["config"]
    if CLASSES_KEY not in config:
        raise ValueError(f"the message carries no class list ('{CLASSES_KEY}' in its config)")
    return tuple(str(name) for name in config[CLASSES_KEY])


def node_data(context: Context, config: RunConfig, names: tuple[str, ...]) -> NodeData:
    """The training and validation data of this node (simulation partition or ``data-dir``).

    Labels are indices into ``names``, the run's class list.
    """
    node = context.node_config
    if "data-dir" in node:
        # A deployed SuperNode's own data, named in its --node-config.
        return split_node_data(
            load_data_dir(str(node["data-dir"]), names, config.input_size),
            seed=config.seed,
            stream=0,
            max_examples=config.max_examples_per_node,
            val_fraction=config.val_fraction,
        )
    return load_node_data(config, names, int(node["partition-id"]), int(node["num-partitions"]))


def _shape(split: Split, config: RunConfig, num_classes: int) -> Shape:
    return Shape(split.image_shape, config.input_size, config.backbone, num_classes)


def _skipped(data: Split, inputs: Split) -> int:
    """Unreadable images of ``data``: those its cached activations lack, or met while reading."""
    return len(data) - len(inputs) if inputs is not data else data.skipped


def round_seed(config: RunConfig, context: Context, server_round: int) -> int:
    """The seed of one node's round: its shuffles and Keras' random draws repeat."""
    return (
        config.seed * 100_003
        + server_round * 1_009
        + int(context.node_config.get("partition-id", 0))
    )


def train_reply(
    msg: Message,
    arrays: ArrayRecord,
    num_examples: int,
    history: keras.callbacks.History,
    train_time: float,
    received: float,
    skipped: int = 0,
) -> Message:
    """The reply to a train message: the arrays and the metrics the strategy checks.

    ``received`` is the `time.perf_counter` at which the message arrived, so
    ``client_time`` is everything this node spent on it; ``skipped`` counts the
    images that could not be read.
    """
    metrics = MetricRecord(
        {
            "num-examples": num_examples,
            "train_loss": float(history.history["loss"][-1]),
            "train_accuracy": float(history.history["accuracy"][-1]),
            "train_time": train_time,
            "client_time": time.perf_counter() - received,
            "skipped_images": skipped,
        }
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def evaluate_reply(
    msg: Message,
    num_examples: int,
    loss: float,
    accuracy: float,
    skipped: int = 0,
    personalized: tuple[float, float] | None = None,
) -> Message:
    """The reply to an evaluate message: the metrics the strategy checks.

    ``personalized`` is the ``(loss, accuracy)`` of the node's personalised head on
    the same examples, when it made one (``personalize-epochs``).
    """
    metrics = MetricRecord(
        {
            "num-examples": num_examples,
            "eval_loss": float(loss),
            "eval_accuracy": float(accuracy),
            "skipped_images": skipped,
        }
    )
    if personalized is not None:
        metrics["personalized_loss"] = float(personalized[0])
        metrics["personalized_accuracy"] = float(personalized[1])
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _training_inputs(
    inputs: NodeInputs, data: NodeData, phase: str
) -> tuple[keras.Model, Split, str | None]:
    """What trains this round, on what, and the boundary where that input starts.

    What follows the frozen part, on its cached activations, when they are cached or
    fit the cache; else the whole classifier (behind any augmentation), on images.
    """
    boundary = training_boundary(inputs.config, phase)
    found = inputs.find(data.train, (boundary,) if boundary is not None else (), compute=True)
    if found is not None:
        boundary, activations = found
        train_inputs = cached_split(activations, data.train)
        # Validation activations too, so this round's evaluation finds them.
        inputs.find(data.val, (boundary,), compute=True)
        return inputs.back(boundary), train_inputs, boundary
    model = inputs.global_model()
    if inputs.config.augmentation != "none":
        model = node_models.augmented(inputs.shape, inputs.config.augmentation)
    return model, data.train, None


def train(msg: Message, context: Context) -> Message:
    """Train the received global model on the local training split."""
    received = time.perf_counter()
    config = run_config(context)
    names = classes(msg)
    data = node_data(context, config, names)
    if not len(data.train):
        raise ValueError("this node has no training examples")
    arrays = _received_model(msg, context)
    # The server decides the phase and learning rate per round; the rest is run config.
    phase = str(msg.content["config"]["phase"])
    learning_rate = float(msg.content["config"]["learning-rate"])
    seed = round_seed(config, context, int(msg.content["config"]["server-round"]))
    shape = _shape(data.train, config, len(names))
    cache = _feature_cache(config, context)
    if cache is not None and config.augmentation != "none":
        # Augmented images give new activations every epoch: nothing to reuse.
        log(INFO, "augmentation=%s: the activation cache is bypassed", config.augmentation)
        cache = None
    model, inputs, boundary = _training_inputs(
        NodeInputs(arrays, shape, config, cache), data, phase
    )
    trainer = node_models.trainer(
        model, shape, boundary, phase, config.fine_tune_layers, learning_rate, proximal_mu(config)
    )
    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    history = fit_seeded(trainer, inputs, config.batch_size, seed, config.local_epochs)
    train_time = time.perf_counter() - start
    # Reply with the keys that came; only those the model trained can have changed.
    trained = {variable.path: variable for variable in model.weights}
    reply = ArrayRecord(
        {
            key: Array(np.asarray(trained[key].numpy())) if key in trained else array
            for key, array in msg.content["arrays"].items()
        }
    )
    skipped = _skipped(data.train, inputs)
    return train_reply(
        msg, reply, len(data.train) - skipped, history, train_time, received, skipped
    )


def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the local validation split.

    With ``personalize-epochs`` > 0 the reply also has ``personalized_loss`` and
    ``personalized_accuracy``: those of a copy of the head fine-tuned on the local
    training split (`fl_app.model.personalize`).
    """
    config = run_config(context)
    names = classes(msg)
    node = node_data(context, config, names)
    data = node.val
    if not len(data):
        raise ValueError("this node has no validation examples")
    arrays = _received_model(msg, context)
    cache = _feature_cache(config, context)
    inputs = NodeInputs(arrays, _shape(data, config, len(names)), config, cache)
    # Training put this round's validation activations in the cache, if it could.
    found = inputs.find(data, boundaries(config.backbone))
    if found is not None:
        evaluated, model = cached_split(found[1], data), inputs.back(found[0])
    else:
        evaluated, model = data, inputs.global_model()
    if not model.compiled:
        compile_model(model, 0.0)
    loss, accuracy = model.evaluate(Batches(evaluated, config.batch_size), verbose=0)
    skipped = _skipped(data, evaluated)
    personalized = None
    if config.personalize_epochs > 0:
        seed = round_seed(config, context, int(msg.content["config"]["server-round"]))
        personalized = personalize(inputs, node, seed)
    return evaluate_reply(msg, len(data) - skipped, loss, accuracy, skipped, personalized)
