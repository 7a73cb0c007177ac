"""A ClientApp with three faulty virtual nodes, for end-to-end tests of SecAgg+ rounds.

It is fl_app's ClientApp (its mods included, SecAgg+ among them) behind one more mod:
partition ``FAILING_PARTITION`` raises when its SecAgg+ stage trains, as a node that
crashes mid-round; partition ``RESHAPED_PARTITION`` trains and masks honestly, then
cuts its masked vector's last array short, as a broken or hostile node whose upload
the server cannot read; partition ``NAN_PARTITION`` gets NaN in place of the model it
was sent, so its training ends in NaN, which its own check must refuse to send.
Written into an app folder by `adversary.write_app`, beside `adversary`, whose
`behind` it uses.
"""

from __future__ import annotations

from logging import WARNING

import numpy as np
from adversary import behind
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import bytes_to_ndarray, log, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

FAILING_PARTITION = 0
RESHAPED_PARTITION = 1
NAN_PARTITION = 2
FAULTY = (FAILING_PARTITION, RESHAPED_PARTITION, NAN_PARTITION)


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Fail or corrupt this node's SecAgg+ training stage if its partition is a faulty one."""
    partition = int(context.node_config.get("partition-id", -1))
    trains = "arrays" in msg.content.array_records  # the stage that carries the model
    if not trains or partition not in FAULTY:
        return call_next(msg, context)
    # Node ids are drawn at random: the log says which one the server should drop.
    log(WARNING, "Faulty partition %d is node %d", partition, context.node_id)
    if partition == FAILING_PARTITION:
        raise RuntimeError("injected failure during training")
    if partition == NAN_PARTITION:
        arrays = msg.content["arrays"]
        msg.content["arrays"] = ArrayRecord(
            {key: Array(np.full_like(array.numpy(), np.nan)) for key, array in arrays.items()}
        )
        return call_next(msg, context)
    reply = call_next(msg, context)
    masked = reply.content.config_records[RECORD_KEY_CONFIGS]
    vectors = list(masked[Key.MASKED_PARAMETERS])
    last = bytes_to_ndarray(vectors[-1])
    vectors[-1] = ndarray_to_bytes(np.ascontiguousarray(last.reshape(-1)[:-1]))
    masked[Key.MASKED_PARAMETERS] = vectors
    return reply


app = behind(fault_mod)
