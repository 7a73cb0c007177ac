"""A quickstart-style ClientApp: the baseline that ``scripts/bench.py`` measures ours against.

It does what Flower's ``examples/quickstart-tensorflow`` ClientApp does: every
message builds a fresh Keras model, loads every received weight, trains or
evaluates, and replies with every weight. Nothing is reused across rounds and
no activations are cached. Data, model, transfer schedule, seeds and fit
settings are those of ``fl_app.client_app``, so a benchmark sees only the cost
of those choices. Not meant for real runs.
"""

from __future__ import annotations

import time

import keras
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

# The same node data and per-round seeds as our client.
from fl_app.client_app import node_data, seed_round
from fl_app.data import NUM_CLASSES
from fl_app.model.classifier import (
    HEAD,
    build_model,
    compile_model,
    load_arrayrecord,
    set_phase,
    to_arrayrecord,
)

app = ClientApp()


def _fresh_model(
    arrays: ArrayRecord, image_shape: tuple[int, ...], context: Context, phase: str, layers: int
) -> keras.Model:
    """A newly built model holding the received weights, frozen for ``phase``."""
    cfg = context.run_config
    model = build_model(
        NUM_CLASSES, image_shape, int(cfg["input-size"]), None, str(cfg["backbone"])
    )
    set_phase(model, phase, layers)
    load_arrayrecord(model, arrays)
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Build a model, load all weights, fit, reply with all weights."""
    received = time.perf_counter()
    data = node_data(context).train
    config = msg.content["config"]
    model = _fresh_model(
        msg.content["arrays"],
        data.x.shape[1:],
        context,
        str(config["phase"]),
        int(config["fine-tune-layers"]),
    )
    compile_model(model, float(config["learning-rate"]))
    seed_round(context, int(config["server-round"]))
    start = time.perf_counter()
    history = model.fit(
        data.x,
        data.y,
        epochs=int(config["local-epochs"]),
        batch_size=int(config["batch-size"]),
        verbose=0,
    )
    train_time = time.perf_counter() - start
    reply = to_arrayrecord(model)
    metrics = MetricRecord(
        {
            "num-examples": len(data.y),
            "train_loss": float(history.history["loss"][-1]),
            "train_accuracy": float(history.history["accuracy"][-1]),
            "train_time": train_time,
            "client_time": time.perf_counter() - received,
        }
    )
    return Message(RecordDict({"arrays": reply, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Build a model, load all weights, evaluate on the local validation split."""
    data = node_data(context).val
    model = _fresh_model(msg.content["arrays"], data.x.shape[1:], context, HEAD, 0)
    compile_model(model, 0.0)
    loss, accuracy = model.evaluate(
        data.x, data.y, batch_size=int(context.run_config["batch-size"]), verbose=0
    )
    metrics = MetricRecord(
        {"num-examples": len(data.y), "eval_loss": float(loss), "eval_accuracy": float(accuracy)}
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
