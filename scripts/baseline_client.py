"""A quickstart-style ClientApp: the baseline that ``bench_client.py`` measures ours against.

It does what Flower's ``examples/quickstart-tensorflow`` ClientApp does: every
message builds a fresh Keras model, loads every received weight, trains or
evaluates, and replies with every weight. Nothing is reused across rounds and
no activations are cached. Data, model, transfer schedule, seeds and fit
settings are those of ``fl_app.client_task``, so a benchmark sees only the cost
of those choices. Not meant for real runs.
"""

from __future__ import annotations

import time

import keras
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

# The same node data and per-round seeds as our client.
from fl_app.client_task import (
    classes,
    evaluate_reply,
    node_data,
    round_seed,
    run_config,
    train_reply,
)
from fl_app.config import RunConfig
from fl_app.model.classifier import (
    build_model,
    compile_model,
    load_arrayrecord,
    set_phase,
    to_arrayrecord,
)
from fl_app.schedule import HEAD

app = ClientApp()


def _fresh_model(
    arrays: ArrayRecord, msg: Message, image_shape: tuple[int, ...], config: RunConfig, phase: str
) -> keras.Model:
    """A newly built model holding the received weights, frozen for ``phase``."""
    num_classes = len(classes(msg))
    model = build_model(num_classes, image_shape, config.input_size, None, config.backbone)
    set_phase(model, phase, config.fine_tune_layers)
    load_arrayrecord(model, arrays)
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Build a model, load all weights, fit, reply with all weights."""
    received = time.perf_counter()
    config = run_config(context)
    data = node_data(context, config, classes(msg)).train
    round_config = msg.content["config"]
    model = _fresh_model(
        msg.content["arrays"], msg, data.image_shape, config, str(round_config["phase"])
    )
    compile_model(model, float(round_config["learning-rate"]))
    keras.utils.set_random_seed(round_seed(config, context, int(round_config["server-round"])))
    start = time.perf_counter()
    # Every image in memory at once, as the quickstart does.
    history = model.fit(
        data.x, data.y, epochs=config.local_epochs, batch_size=config.batch_size, verbose=0
    )
    train_time = time.perf_counter() - start
    return train_reply(msg, to_arrayrecord(model), len(data.y), history, train_time, received)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Build a model, load all weights, evaluate on the local validation split."""
    config = run_config(context)
    data = node_data(context, config, classes(msg)).val
    model = _fresh_model(msg.content["arrays"], msg, data.image_shape, config, HEAD)
    compile_model(model, 0.0)
    loss, accuracy = model.evaluate(data.x, data.y, batch_size=config.batch_size, verbose=0)
    return evaluate_reply(msg, len(data.y), loss, accuracy)
