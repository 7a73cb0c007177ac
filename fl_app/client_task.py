"""What a node does with one message: fine-tune the global model on its data, or evaluate it.

The Keras models are built and compiled once per process and reused across
rounds and (in simulation) across the virtual nodes a process serves: a
rebuild would retrace the training step, ~21 s for a full ResNet50. Nodes
train only what lies after the frozen part of the model, on its cached output
(``fl_app.model.features``): the head on pooled features in the head phase, conv5
and the head on conv4's output when fine-tuning the conv5 block. Both are exact.
Under ``strategy=fedprox`` training adds the proximal term (`fl_app.model.proximal`);
with ``personalize-epochs`` evaluation also scores a copy of the head fine-tuned on
the node's own training split.
"""

from __future__ import annotations

import functools
import time
import weakref
from logging import INFO
from pathlib import Path

import keras
import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import log

from fl_app.cache import node_cache_dir
from fl_app.config import RunConfig
from fl_app.data import CLASSES_KEY, NodeData, load_data_dir, load_node_data, split_node_data
from fl_app.data.batches import Batches, fit_seeded, predict_rows, readable
from fl_app.data.split import Split
from fl_app.model.backbones import BACKBONES
from fl_app.model.classifier import (
    build_head,
    build_model,
    compile_model,
    feature_extractor,
    load_arrayrecord,
    load_part,
    pooling_part,
    reset_optimizer,
    set_phase,
    split_at,
    with_augmentation,
)
from fl_app.model.features import (
    POOLED,
    FeatureCache,
    boundaries,
    cached_split,
    feature_key,
    frozen_digest,
    frozen_keys,
    predict_within,
)
from fl_app.model.proximal import Proximal
from fl_app.schedule import HEAD
from fl_app.wire.exchange import (
    BASE,
    BASE_DISK_BYTES,
    BASE_HASH,
    BASE_MEMORY_BYTES,
    BaseStore,
    assemble,
    base_hash,
)

# What the models depend on: raw image shape, input size, backbone, number of classes.
Shape = tuple[tuple[int, ...], int, str, int]


def run_config(context: Context) -> RunConfig:
    """The run config, typed (the weights file is the server's, not checked here)."""
    return RunConfig.parse(context.run_config, check_files=False)


@functools.cache
def _model(shape: Shape) -> keras.Model:
    # Architecture only: the server sends the weights, so nodes never download any.
    image_shape, input_size, backbone, num_classes = shape
    return build_model(num_classes, image_shape, input_size, None, backbone)


@functools.cache
def _split(shape: Shape) -> tuple[keras.Model, keras.Model]:
    cut = BACKBONES[shape[2]].cut
    assert cut is not None  # only backbones with a cut offer its boundary
    return split_at(_model(shape), cut)


def _front(boundary: str, shape: Shape) -> keras.Model:
    """The frozen part up to ``boundary``: images in, activations out."""
    return _extractor(shape) if boundary == POOLED else _split(shape)[0]


def _back(boundary: str, shape: Shape) -> keras.Model:
    """What trains after ``boundary``; the head alone needs no backbone built."""
    return _head(shape[2], shape[3]) if boundary == POOLED else _split(shape)[1]


@functools.cache
def _augmented(shape: Shape, augmentation: str) -> keras.Model:
    return with_augmentation(_model(shape), augmentation)


@functools.cache
def _extractor(shape: Shape) -> keras.Model:
    return feature_extractor(_model(shape))


@functools.cache
def _head(backbone: str, num_classes: int) -> keras.Model:
    head = build_head(num_classes, BACKBONES[backbone].features)
    compile_model(head, 1e-3)  # always fully trainable: compiled once
    return head


@functools.cache
def _personal_head(backbone: str, num_classes: int) -> keras.Model:
    # Its own variables: personalising must leave the global head, which evaluation
    # and the next round's training reuse, as it came.
    head = build_head(num_classes, BACKBONES[backbone].features)
    compile_model(head, 1e-3)
    return head


@functools.cache
def _pooling(shape: Shape) -> keras.Model:
    """Cut activations to pooled features: conv5 and pooling under the loaded weights."""
    return pooling_part(_split(shape)[1])


@functools.cache
def _proximal(model: keras.Model, trainable: tuple[str, ...]) -> Proximal:
    # Keyed by what trains too: the term covers the variables trainable at wrapping.
    del trainable
    return Proximal(model)


# The trainable variables each model was last compiled for. The models share the
# backbone's layers, so a phase change that one of them saw (set_phase) leaves the
# others' compiled train step updating the old set.
_compiled_for: weakref.WeakKeyDictionary[keras.Model, tuple[str, ...]] = weakref.WeakKeyDictionary()


def _trainable_paths(model: keras.Model) -> tuple[str, ...]:
    return tuple(variable.path for variable in model.trainable_variables)


def _compiled(model: keras.Model, learning_rate: float) -> keras.Model:
    """``model``, compiled for the variables that train now (compiling retraces: only then)."""
    trainable = _trainable_paths(model)
    if not model.compiled or _compiled_for.get(model) != trainable:
        compile_model(model, learning_rate)
        _compiled_for[model] = trainable
    return model


def proximal_mu(config: RunConfig) -> float:
    """FedProx's μ for this run: ``proximal-mu`` under ``strategy=fedprox``, else 0 (off)."""
    return config.proximal_mu if config.strategy == "fedprox" else 0.0


def _boundary(config: RunConfig, phase: str) -> str | None:
    """Where the frozen part ends this round, if training can start from its output.

    The head phase trains on pooled features; the fine-tune phase only when exactly
    the layers after the backbone's cut train (other cuts leave residual branches
    across the boundary).
    """
    if phase == HEAD:
        return POOLED
    cut = BACKBONES[config.backbone].cut
    if cut is not None and config.fine_tune_layers == cut.fine_tune_layers:
        return cut.layer
    return None


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


def _received_model(msg: Message, context: Context) -> ArrayRecord:
    """The global model: the arrays that came, over the base this node stores."""
    arrays, config = msg.content["arrays"], msg.content["config"]
    if BASE_HASH not in config:  # full exchange: everything came
        return arrays
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
    return assemble(base, arrays)


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
    return (split.image_shape, config.input_size, config.backbone, num_classes)


def _global_model(arrays: ArrayRecord, shape: Shape) -> keras.Model:
    model = _model(shape)
    load_arrayrecord(model, arrays)
    return model


def _frozen_id(msg: Message, arrays: ArrayRecord, boundary: str, backbone: str) -> str:
    """A digest of the weights before ``boundary``: what the activations depend on.

    Of those weights alone, not of the base they came in (which holds the head too), so
    runs whose heads start differently (a head from another file, say, or a full exchange
    against a trainable-only one) share a machine's activations.
    When they all came from the base, the digest is computed once per base and process.
    """
    keys = frozen_keys(arrays, boundary, backbone)
    config = msg.content["config"]
    if BASE_HASH in config and not any(key in msg.content["arrays"] for key in keys):
        return _base_frozen_digest(str(config[BASE_HASH]), boundary, arrays, tuple(keys))
    return frozen_digest(arrays, keys)


_base_digests: dict[tuple[str, str], str] = {}


def _base_frozen_digest(
    base: str, boundary: str, arrays: ArrayRecord, keys: tuple[str, ...]
) -> str:
    if (base, boundary) not in _base_digests:
        _base_digests[base, boundary] = frozen_digest(arrays, keys)
    return _base_digests[base, boundary]


def _activations(
    msg: Message,
    arrays: ArrayRecord,
    split: Split,
    shape: Shape,
    config: RunConfig,
    cache: FeatureCache,
    boundary: str,
    compute: bool,
) -> np.ndarray | None:
    """Activations of ``split`` at ``boundary`` under the received weights, from the cache.

    On a miss they are computed (when ``compute``) a batch at a time and stored,
    unless they would not fit the cache: then ``None``, and training streams
    images through the whole model. Rows of unreadable images are NaN.
    """
    frozen = _frozen_id(msg, arrays, boundary, config.backbone)
    key = feature_key(frozen, split.digest(), config.input_size, boundary)
    activations = cache.get(key)
    if activations is None and compute and len(split):
        _global_model(arrays, shape)
        front = _front(boundary, shape)
        activations = predict_within(front, split, config.batch_size, cache.max_bytes, boundary)
        if activations is None:
            return None
        cache.put(key, activations)
    return activations


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


def _pooled_features(
    msg: Message,
    arrays: ArrayRecord,
    split: Split,
    shape: Shape,
    config: RunConfig,
    cache: FeatureCache | None,
) -> np.ndarray:
    """The head's inputs for ``split`` under the received weights (NaN rows: unreadable).

    From the cache when training left them there (pooled features in the head phase,
    conv4's output while fine-tuning conv5), else from the images. Nothing is stored:
    in head rounds training stored them already, and in fine-tune rounds they depend
    on conv5, which the next round changes, so storing would only evict useful entries.
    """
    for boundary in boundaries(config.backbone) if cache is not None else ():
        activations = _activations(
            msg, arrays, split, shape, config, cache, boundary, compute=False
        )
        if activations is None:
            continue
        if boundary == POOLED:
            return activations
        _global_model(arrays, shape)
        ok = readable(activations)
        pooled = np.full((len(split), BACKBONES[config.backbone].features), np.nan, np.float32)
        if ok.any():
            pooled[ok] = _pooling(shape).predict(
                activations[ok], batch_size=config.batch_size, verbose=0
            )
        return pooled
    _global_model(arrays, shape)
    return predict_rows(_extractor(shape), split, config.batch_size)


def personalize(
    msg: Message,
    arrays: ArrayRecord,
    data: NodeData,
    shape: Shape,
    config: RunConfig,
    cache: FeatureCache | None,
    seed: int,
) -> tuple[float, float] | None:
    """Fine-tune a copy of the global head on the train split; score it on the val split.

    Trains for ``personalize-epochs`` at the run's head ``learning-rate`` on pooled
    features, and leaves the global model and the cache as they were.

    Returns
    -------
    tuple of float or None
        ``(loss, accuracy)`` on the readable validation examples; ``None`` when the
        node has no readable training example.
    """
    train = cached_split(
        _pooled_features(msg, arrays, data.train, shape, config, cache), data.train
    )
    val = cached_split(_pooled_features(msg, arrays, data.val, shape, config, cache), data.val)
    if not len(train) or not len(val):
        log(INFO, "personalize-epochs: no readable training example, nothing to personalise")
        return None
    head = load_part(_personal_head(config.backbone, shape[3]), arrays)
    reset_optimizer(head, config.learning_rate)
    keras.utils.set_random_seed(seed)
    fit_seeded(head, train, config.batch_size, seed, config.personalize_epochs)
    loss, accuracy = head.evaluate(Batches(val, config.batch_size), verbose=0)
    return float(loss), float(accuracy)


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
    boundary = _boundary(config, phase) if cache is not None else None
    activations = None
    if boundary is not None:
        args = (msg, arrays, data.train, shape, config, cache, boundary)
        activations = _activations(*args, compute=True)
    if activations is not None:
        inputs = cached_split(activations, data.train)
        # Validation activations too, so this round's evaluation finds them.
        _activations(msg, arrays, data.val, shape, config, cache, boundary, compute=True)
        model = load_part(_back(boundary, shape), arrays)
    else:
        boundary, inputs = None, data.train
        model = _global_model(arrays, shape)
        if config.augmentation != "none":
            model = _augmented(shape, config.augmentation)
    # The backbone's layers are shared by every model but the lone head.
    if boundary != POOLED:
        set_phase(_model(shape), phase, config.fine_tune_layers)
    trainer = model
    mu = proximal_mu(config)
    if mu > 0:
        # Off at μ = 0: training is then exactly FedAvg's, with no extra model to trace.
        trainer = _proximal(model, _trainable_paths(model))
    _compiled(trainer, learning_rate)
    reset_optimizer(trainer, learning_rate)
    if isinstance(trainer, Proximal):
        trainer.anchor(mu)  # w_global: the weights as received this round
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
    training split (`personalize`).
    """
    config = run_config(context)
    names = classes(msg)
    node = node_data(context, config, names)
    data = node.val
    if not len(data):
        raise ValueError("this node has no validation examples")
    arrays = _received_model(msg, context)
    cache = _feature_cache(config, context)
    shape = _shape(data, config, len(names))
    model, inputs = None, data
    # Training put this round's validation activations in the cache, if it could.
    for boundary in boundaries(config.backbone) if cache is not None else ():
        args = (msg, arrays, data, shape, config, cache, boundary)
        activations = _activations(*args, compute=False)
        if activations is not None:
            inputs = cached_split(activations, data)
            model = load_part(_back(boundary, shape), arrays)
            break
    if model is None:
        model = _global_model(arrays, shape)
    if not model.compiled:
        compile_model(model, 0.0)
    loss, accuracy = model.evaluate(Batches(inputs, config.batch_size), verbose=0)
    skipped = _skipped(data, inputs)
    personalized = None
    if config.personalize_epochs > 0:
        seed = round_seed(config, context, int(msg.content["config"]["server-round"]))
        personalized = personalize(msg, arrays, node, shape, config, cache, seed)
    return evaluate_reply(msg, len(data) - skipped, loss, accuracy, skipped, personalized)
