"""ClientApp: fine-tune the global model on this node's data, or evaluate it.

The Keras models are built and compiled once per process and reused across
rounds and (in simulation) across the virtual nodes a process serves: a
rebuild would retrace the training step, ~21 s for a full ResNet50. Nodes
train only what lies after the frozen part of the model, on its cached output
(``fl_app.features``): the head on pooled features in the head phase, conv5
and the head on conv4's output when fine-tuning the conv5 block. Both are exact.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import keras
import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_app.data import NUM_CLASSES, NodeData, Split, load_data_dir, load_node_data, split_node_data
from fl_app.features import FeatureCache, feature_key
from fl_app.model import (
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
    to_arrayrecord,
)

app = ClientApp()
# Where the frozen part of the model ends: the cache's two boundaries.
POOLED, CONV4 = "pooled", "conv4"
# Where a deployed node keeps features across its per-message ClientApp processes.
DEFAULT_CACHE_DIR = Path("~/.cache/fl_app/features")


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


def _feature_cache(context: Context) -> FeatureCache | None:
    cfg, node = context.run_config, context.node_config
    if not cfg["feature-cache"]:
        return None
    folder = node.get("cache-dir") or (DEFAULT_CACHE_DIR if "data-dir" in node else None)
    return _cache_store(int(cfg["feature-cache-mb"]) * 2**20, str(folder) if folder else None)


def _node_data(context: Context) -> NodeData:
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


def _activations(
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
    key = feature_key(arrays, _frozen_keys(arrays, boundary), split.x, input_size, boundary)
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


def _seed(context: Context, server_round: int) -> None:
    keras.utils.set_random_seed(
        int(context.run_config["seed"]) * 100_003
        + server_round * 1_009
        + int(context.node_config.get("partition-id", 0))
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on the local training split."""
    data = _node_data(context)
    arrays = msg.content["arrays"]
    config = msg.content["config"]
    learning_rate = float(config["learning-rate"])
    phase, fine_tune_layers = str(config["phase"]), int(config["fine-tune-layers"])
    image_shape, input_size = data.train.x.shape[1:], int(context.run_config["input-size"])
    backbone = str(context.run_config["backbone"])
    cache = _feature_cache(context)
    # The frozen part ends at the pooled features (head phase) or, when exactly ResNet50's
    # conv5 block trains, at conv4's output; other cuts leave residual branches across them.
    boundary = POOLED if phase == HEAD else CONV4 if fine_tune_layers == CONV5_LAYERS else None
    if boundary not in _boundaries(backbone):
        boundary = None
    on_activations = cache is not None and boundary is not None
    if on_activations:
        inputs = _activations(arrays, data.train, context, cache, boundary, compute=True)
        # Validation activations too, so this round's evaluation finds them.
        _activations(arrays, data.val, context, cache, boundary, compute=len(data.val.y) > 0)
        model = _load(_back(boundary, image_shape, input_size, backbone), arrays)
    else:
        inputs, model = data.train.x, _global_model(arrays, context, image_shape)
    # conv5 + head and the full model share ResNet50's layers; the lone head does not.
    shares_backbone = not (on_activations and boundary == POOLED)
    changed = shares_backbone and set_phase(
        _model(image_shape, input_size, backbone), phase, fine_tune_layers
    )
    # set_phase changed which layers train: the model that trains needs compiling.
    if changed or not model.compiled:
        compile_model(model, learning_rate)
    reset_optimizer(model, learning_rate)
    _seed(context, int(config["server-round"]))
    start = time.perf_counter()
    history = model.fit(
        inputs,
        data.train.y,
        epochs=int(config["local-epochs"]),
        batch_size=int(config["batch-size"]),
        verbose=0,
    )
    train_time = time.perf_counter() - start
    if on_activations:
        # The frozen part did not change: send back what came, with the trained part.
        reply = ArrayRecord(dict(arrays.items()))
        for variable in model.weights:
            reply[variable.path] = Array(np.asarray(variable.numpy()))
    else:
        reply = to_arrayrecord(model)
    metrics = MetricRecord(
        {
            "num-examples": len(data.train.y),
            "train_loss": float(history.history["loss"][-1]),
            "train_accuracy": float(history.history["accuracy"][-1]),
            "train_time": train_time,
        }
    )
    return Message(RecordDict({"arrays": reply, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the local validation split."""
    data = _node_data(context).val
    arrays = msg.content["arrays"]
    cache = _feature_cache(context)
    image_shape, input_size = data.x.shape[1:], int(context.run_config["input-size"])
    backbone = str(context.run_config["backbone"])
    model, inputs = None, data.x
    # Training put this round's validation activations in the cache, if it could.
    for boundary in _boundaries(backbone) if cache is not None else ():
        activations = _activations(arrays, data, context, cache, boundary, compute=False)
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
