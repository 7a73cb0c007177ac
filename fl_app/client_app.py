"""ClientApp: fine-tune the global model on this node's data, or evaluate it.

The Keras model is built and compiled once per process and reused across
rounds and (in simulation) across the virtual nodes a process serves: a
rebuild would retrace the training step, ~21 s for a full ResNet50.
"""

from __future__ import annotations

import functools
import time

import keras
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_app.data import NUM_CLASSES, NodeData, load_node_data
from fl_app.model import (
    build_model,
    compile_model,
    load_arrayrecord,
    reset_optimizer,
    set_phase,
    to_arrayrecord,
)

app = ClientApp()


@functools.cache
def _model(image_shape: tuple[int, ...], input_size: int) -> keras.Model:
    # Architecture only: the server sends the weights, so nodes never download any.
    return build_model(NUM_CLASSES, image_shape, input_size, backbone_weights=None)


def _node_data(context: Context) -> NodeData:
    cfg, node = context.run_config, context.node_config
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


def _global_model(msg: Message, context: Context, image_shape: tuple[int, ...]) -> keras.Model:
    model = _model(image_shape, int(context.run_config["input-size"]))
    load_arrayrecord(model, msg.content["arrays"])
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on the local training split."""
    data = _node_data(context).train
    model = _global_model(msg, context, data.x.shape[1:])
    config = msg.content["config"]
    learning_rate = float(config["learning-rate"])
    if set_phase(model, str(config["phase"]), int(config["fine-tune-layers"])) or not (
        model.compiled
    ):
        compile_model(model, learning_rate)
    reset_optimizer(model, learning_rate)
    keras.utils.set_random_seed(
        int(context.run_config["seed"]) * 100_003
        + int(config["server-round"]) * 1_009
        + int(context.node_config["partition-id"])
    )
    start = time.perf_counter()
    history = model.fit(
        data.x,
        data.y,
        epochs=int(config["local-epochs"]),
        batch_size=int(config["batch-size"]),
        verbose=0,
    )
    train_time = time.perf_counter() - start
    metrics = MetricRecord(
        {
            "num-examples": len(data.y),
            "train_loss": float(history.history["loss"][-1]),
            "train_accuracy": float(history.history["accuracy"][-1]),
            "train_time": train_time,
        }
    )
    return Message(RecordDict({"arrays": to_arrayrecord(model), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the local validation split."""
    data = _node_data(context).val
    model = _global_model(msg, context, data.x.shape[1:])
    if not model.compiled:
        compile_model(model, 0.0)
    loss, accuracy = model.evaluate(
        data.x, data.y, batch_size=int(context.run_config["batch-size"]), verbose=0
    )
    metrics = MetricRecord(
        {"num-examples": len(data.y), "eval_loss": float(loss), "eval_accuracy": float(accuracy)}
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
