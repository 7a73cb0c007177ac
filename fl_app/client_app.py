"""ClientApp: Flower's entry on a node. The work itself is `fl_app.client_task`'s.

A simulated node runs it in its Ray actor, which stays up between messages and
keeps the models it built. A deployed SuperNode (Flower 1.42) starts a fresh
process for every message, so there each message goes to the node's warm worker
(`fl_app.node_worker`), which keeps TensorFlow, the models and the data loaded.
This module imports neither TensorFlow nor Keras: a deployed message's process
only hands its message over.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fl_app import node_worker
from fl_app.privacy import dp_clip_mod
from fl_app.secagg.node import secagg_mod
from fl_app.wire.compression import compression_mod

# The mods run in this process, around the hand-over: the worker sees decompressed
# messages and its replies are clipped and compressed here. SecAgg+ comes first: its
# stage messages carry no model, and it masks the reply the others made.
app = ClientApp(mods=[secagg_mod, compression_mod, dp_clip_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on the local training split."""
    return _run("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the local validation split."""
    return _run("evaluate", msg, context)


def _run(task: str, msg: Message, context: Context) -> Message:
    if node_worker.wanted(context.node_config):
        return node_worker.forward(task, msg, context)
    from fl_app import client_task  # deferred: TensorFlow

    return getattr(client_task, task)(msg, context)
