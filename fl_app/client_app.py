"""ClientApp: fine-tune the global model on this node's data, or evaluate it.

The Keras models are built and compiled once per process and reused across
rounds and (in simulation) across the virtual nodes a process serves: a
rebuild would retrace the training step, ~21 s for a full ResNet50. Nodes
train only what lies after the frozen part of the model, on its cached output
(``fl_app.model.features``): the head on pooled features in the head phase, conv5
and the head on conv4's output when fine-tuning the conv5 block. Both are exact.
"""

from __future__ import annotations

import functools
import time
from logging import INFO
from pathlib import Path

import keras
import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from fl_app.wire.compression import compression_mod
from fl_app.data import NUM_CLASSES, NodeData, Split, load_data_dir, load_node_data, split_node_data
from fl_app.wire.exchange import (
    BASE,
    BASE_DISK_BYTES,
    BASE_HASH,
    BASE_MEMORY_BYTES,
    BaseStore,
    assemble,
    base_hash,
)
from fl_app.model.features import FeatureCache, feature_key, frozen_digest
from fl_app.model.classifier import (
    BACKBONE_FEATURES,
    CONV5_LAYERS,
    HEAD,
    RESNET50,
    build_head,
    build_model,
    compile_model,
    feature_extractor,
    is_conv5_variable,
    is_head_variable,
    load_arrayrecord,
    reset_optimizer,
    set_phase,
    split_at_conv4,
    with_augmentation,
)

app = ClientApp(mods=[compression_mod])
# Where the frozen part of the model ends: the cache's two boundaries.
POOLED, CONV4 = "pooled", "conv4"
# Where a node keeps features and its base model across its ClientApp processes.
DEFAULT_CACHE_DIR = Path("~/.cache/fl_app")


@functools.cache
def _model(image_shape: tuple[int, ...], input_size: int, backbone: str) -> keras.Model:
    # Architecture only: the server sends the weights, so nodes never download any.
    return build_model(NUM_CLASSES, image_shape, input_size, None, backbone)


@functools.cache
def _split(image_shape: tuple[int, ...], input_size: int) -> tuple[keras.Model, keras.Model]:
    return split_at_conv4(_model(image_shape, input_size, RESNET50))


def _front(
    boundary: str, image_shape: tuple[int, ...], input_size: int, backbone: str
) -> keras.Model:
    """The frozen part up to ``boundary``: images in, activations out."""
    if boundary == CONV4:
        return _split(image_shape, input_size)[0]
    return _extractor(image_shape, input_size, backbone)


def _back(
    boundary: str, image_shape: tuple[int, ...], input_size: int, backbone: str
) -> keras.Model:
    """What trains after ``boundary``; the head alone needs no backbone built."""
    if boundary == CONV4:
        return _split(image_shape, input_size)[1]
    return _head(backbone)


@functools.cache
def _augmented(
    image_shape: tuple[int, ...], input_size: int, backbone: str, augmentation: str
) -> keras.Model:
    return with_augmentation(_model(image_shape, input_size, backbone), augmentation)


@functools.cache
def _extractor(image_shape: tuple[int, ...], input_size: int, backbone: str) -> keras.Model:
    return feature_extractor(_model(image_shape, input_size, backbone))


@functools.cache
def _head(backbone: str) -> keras.Model:
    head = build_head(NUM_CLASSES, BACKBONE_FEATURES[backbone])
    compile_model(head, 1e-3)  # always fully trainable: compiled once
    return head


def _boundaries(backbone: str) -> tuple[str, ...]:
    """Where the frozen part may end: conv4's output is a ResNet50 boundary only."""
    return (POOLED, CONV4) if backbone == RESNET50 else (POOLED,)


def _frozen_keys(arrays: ArrayRecord, boundary: str) -> list[str]:
    """The arrays of the layers before ``boundary``: what its activations depend on."""
    return [
        key
        for key in arrays
        if not is_head_variable(key) and (boundary == POOLED or not is_conv5_variable(key))
    ]


@functools.cache
def _cache_store(max_bytes: int, folder: str | None) -> FeatureCache:
    return FeatureCache(max_bytes, Path(folder) if folder else None)


def _cache_dir(context: Context) -> Path:
    return Path(str(context.node_config.get("cache-dir", DEFAULT_CACHE_DIR))).expanduser()


def _feature_cache(context: Context) -> FeatureCache | None:
    cfg = context.run_config
    if not cfg["feature-cache"]:
        return None
    # In simulation the Ray actor serves every round: memory is enough.
    folder = _cache_dir(context) / "features" if "data-dir" in context.node_config else None
    return _cache_store(int(cfg["feature-cache-mb"]) * 2**20, str(folder) if folder else None)


@functools.cache
def _base_store(folder: str) -> BaseStore:
    return BaseStore(BASE_DISK_BYTES, Path(folder), BASE_MEMORY_BYTES)


def _received_model(msg: Message, context: Context) -> ArrayRecord:
    """The global model: the arrays that came, over the base this node stores."""
    arrays, config = msg.content["arrays"], msg.content["config"]
    if BASE_HASH not in config:  # full exchange: everything came
        return arrays
    # On disk in simulation too: a virtual node's next round may run in another actor.
    name, store = str(config[BASE_HASH]), _base_store(str(_cache_dir(context) / "bases"))
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
    return assemble(base, arrays)


def node_data(context: Context) -> NodeData:
    """The training and validation data of this node (simulation partition or ``data-dir``)."""
    cfg, node = context.run_config, context.node_config
    if "data-dir" in node:
        # A deployed SuperNode's own data, named in its --node-config.
        return split_node_data(
            load_data_dir(str(node["data-dir"])),
            seed=int(cfg["seed"]),
            stream=0,
            max_examples=int(cfg["max-examples-per-node"]),
            val_fraction=float(cfg["val-fraction"]),
        )
    return load_node_data(
        dataset=str(cfg["dataset"]),
        partition_id=int(node["partition-id"]),
        num_partitions=int(node["num-partitions"]),
        partitioner=str(cfg["partitioner"]),
        alpha=float(cfg["dirichlet-alpha"]),
        seed=int(cfg["seed"]),
        max_examples=int(cfg["max-examples-per-node"]),
        val_fraction=float(cfg["val-fraction"]),
    )


def _global_model(arrays: ArrayRecord, context: Context, image_shape: tuple[int, ...]):
    cfg = context.run_config
    model = _model(image_shape, int(cfg["input-size"]), str(cfg["backbone"]))
    load_arrayrecord(model, arrays)
    return model


def _frozen_id(msg: Message, arrays: ArrayRecord, boundary: str) -> str:
    """Names the weights before ``boundary``: by the base's hash when all came from it."""
    keys = _frozen_keys(arrays, boundary)
    config = msg.content["config"]
    if BASE_HASH in config and not any(key in msg.content["arrays"] for key in keys):
        return f"base {config[BASE_HASH]}"  # no need to hash 90 MB again
    return frozen_digest(arrays, keys)


def _activations(
    msg: Message,
    arrays: ArrayRecord,
    split: Split,
    context: Context,
    cache: FeatureCache,
    boundary: str,
    compute: bool,
) -> np.ndarray | None:
    """Activations of ``split`` at ``boundary`` under the received weights, from the cache.

    On a miss they are computed (when ``compute``) with the full model and stored.
    """
    input_size = int(context.run_config["input-size"])
    key = feature_key(_frozen_id(msg, arrays, boundary), split.x, input_size, boundary)
    activations = cache.get(key)
    if activations is None and compute:
        image_shape = split.x.shape[1:]
        _global_model(arrays, context, image_shape)
        backbone = str(context.run_config["backbone"])
        activations = _front(boundary, image_shape, input_size, backbone).predict(
            split.x, batch_size=int(context.run_config["batch-size"]), verbose=0
        )
        cache.put(key, activations)
    return activations


def _load(model: keras.Model, arrays: ArrayRecord) -> keras.Model:
    """Set a part of the model from the full model's arrays (same variable paths)."""
    model.set_weights([arrays[v.path].numpy() for v in model.weights])
    return model


def seed_round(context: Context, server_round: int) -> None:
    """Seed Keras for one node's round, so that local training repeats."""
    keras.utils.set_random_seed(
        int(context.run_config["seed"]) * 100_003
        + server_round * 1_009
        + int(context.node_config.get("partition-id", 0))
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on the local training split."""
    received = time.perf_counter()
    data = node_data(context)
    arrays = _received_model(msg, context)
    config = msg.content["config"]
    learning_rate = float(config["learning-rate"])
    phase, fine_tune_layers = str(config["phase"]), int(config["fine-tune-layers"])
    image_shape, input_size = data.train.x.shape[1:], int(context.run_config["input-size"])
    backbone = str(context.run_config["backbone"])
    cache = _feature_cache(context)
    augmentation = str(context.run_config["augmentation"])
    if cache is not None and augmentation != "none":
        # Augmented images give new activations every epoch: nothing to reuse.
        log(INFO, "augmentation=%s: the activation cache is bypassed", augmentation)
        cache = None
    # The frozen part ends at the pooled features (head phase) or, when exactly ResNet50's
    # conv5 block trains, at conv4's output; other cuts leave residual branches across them.
    boundary = POOLED if phase == HEAD else CONV4 if fine_tune_layers == CONV5_LAYERS else None
    if boundary not in _boundaries(backbone):
        boundary = None
    on_activations = cache is not None and boundary is not None
    if on_activations:
        inputs = _activations(msg, arrays, data.train, context, cache, boundary, compute=True)
        # Validation activations too, so this round's evaluation finds them.
        has_val = len(data.val.y) > 0
        _activations(msg, arrays, data.val, context, cache, boundary, compute=has_val)
        model = _load(_back(boundary, image_shape, input_size, backbone), arrays)
    else:
        inputs, model = data.train.x, _global_model(arrays, context, image_shape)
        if augmentation != "none":
            model = _augmented(image_shape, input_size, backbone, augmentation)
    # conv5 + head and the full model share ResNet50's layers; the lone head does not.
    shares_backbone = not (on_activations and boundary == POOLED)
    changed = shares_backbone and set_phase(
        _model(image_shape, input_size, backbone), phase, fine_tune_layers
    )
    # set_phase changed which layers train: the model that trains needs compiling.
    if changed or not model.compiled:
        compile_model(model, learning_rate)
    reset_optimizer(model, learning_rate)
    seed_round(context, int(config["server-round"]))
    start = time.perf_counter()
    history = model.fit(
        inputs,
        data.train.y,
        epochs=int(config["local-epochs"]),
        batch_size=int(config["batch-size"]),
        verbose=0,
    )
    train_time = time.perf_counter() - start
    # Reply with the keys that came; only those the model trained can have changed.
    trained = {variable.path: variable for variable in model.weights}
    reply = ArrayRecord(
        {
            key: Array(np.asarray(trained[key].numpy())) if key in trained else array
            for key, array in msg.content["arrays"].items()
        }
    )
    metrics = MetricRecord(
        {
            "num-examples": len(data.train.y),
            "train_loss": float(history.history["loss"][-1]),
            "train_accuracy": float(history.history["accuracy"][-1]),
            "train_time": train_time,
            # Everything this node spent on the round's training message.
            "client_time": time.perf_counter() - received,
        }
    )
    return Message(RecordDict({"arrays": reply, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the local validation split."""
    data = node_data(context).val
    arrays = _received_model(msg, context)
    cache = _feature_cache(context)
    image_shape, input_size = data.x.shape[1:], int(context.run_config["input-size"])
    backbone = str(context.run_config["backbone"])
    model, inputs = None, data.x
    # Training put this round's validation activations in the cache, if it could.
    for boundary in _boundaries(backbone) if cache is not None else ():
        activations = _activations(msg, arrays, data, context, cache, boundary, compute=False)
        if activations is not None:
            back = _back(boundary, image_shape, input_size, backbone)
            model, inputs = _load(back, arrays), activations
            break
    if model is None:
        model = _global_model(arrays, context, image_shape)
    if not model.compiled:
        compile_model(model, 0.0)
    loss, accuracy = model.evaluate(
        inputs, data.y, batch_size=int(context.run_config["batch-size"]), verbose=0
    )
    metrics = MetricRecord(
        {"num-examples": len(data.y), "eval_loss": float(loss), "eval_accuracy": float(accuracy)}
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
