"""The node's side of SecAgg+: its own checks, its weight, and the mod that masks its reply.

`secagg_mod` turns fl_app's train reply into the clipped update in the legacy
``FitRes`` layout that Flower's ``secaggplus_mod`` masks, and refuses a stage
message of another round than the node's.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from fl_app.config import RunConfig
from fl_app.privacy import clip
from fl_app.secagg import CLIPPED, ROUND_RECORD, update_bound

# Reply key of the examples count in fl_app's train MetricRecord.
NUM_EXAMPLES = "num-examples"


def checked_update(received: ArrayRecord, returned: ArrayRecord) -> list[np.ndarray]:
    """``returned - received`` in float64, key by key; ``ValueError`` when malformed.

    The node checks its own update because the server cannot: after masking, a NaN
    or a wrong shape would reach the sum unseen.
    """
    if list(returned.keys()) != list(received.keys()):
        raise ValueError("the trained arrays' keys differ from the received ones: not sent")
    update = []
    for key, before in received.items():
        old, new = before.numpy(), returned[key].numpy()
        if new.shape != old.shape:
            raise ValueError(f"array '{key}' is {list(new.shape)}, not {list(old.shape)}: not sent")
        delta = new.astype(np.float64) - old
        if not np.isfinite(delta).all():
            raise ValueError(f"array '{key}' contains NaN or Inf: not sent")
        update.append(delta)
    return update


def secure_weight(config: RunConfig, examples: int) -> int:
    """What a node's update weighs in the secure mean; ``ValueError`` above the max weight.

    Under client-level DP every node weighs the same: the noise is calibrated to one
    node's clipped update, which a weight would scale.
    """
    if config.dp == "client":
        return 1
    if examples > config.secagg_max_weight:
        raise ValueError(
            f"num-examples {examples} > secagg-max-weight={config.secagg_max_weight:g}: not sent "
            "(raise secagg-max-weight to at least the largest node's examples)"
        )
    return examples


def _fitres_reply(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Train, then reply with the clipped update in the legacy layout Flower's mod masks."""
    config = RunConfig.parse(context.run_config, check_files=False)
    reply = call_next(msg, context)
    if reply.has_error():
        raise RuntimeError(f"training failed: {reply.error.reason}")
    update = checked_update(msg.content["arrays"], reply.content["arrays"])
    bound = update_bound(config)
    norm = clip(update, bound)
    (metrics,) = reply.content.metric_records.values()
    weight = secure_weight(config, int(metrics[NUM_EXAMPLES]))
    fitres = FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters([delta.astype(np.float32) for delta in update]),
        weight,
        {**metrics, CLIPPED: int(norm > bound)},
    )
    return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _enter_round(msg: Message, context: Context) -> None:
    """Refuse a stage message of another round than the node's; ``ValueError`` in one line.

    A setup message starts a round, one of an earlier round excepted; every other
    stage must belong to the round the node is in. The refusal leaves the node's
    protocol state as it was, ready for the stage its round expects.
    """
    stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
    tagged = msg.content.config_records.get(ROUND_RECORD)
    if tagged is None:
        raise ValueError(f"SecAgg+ '{stage}' message without fl_app's round record: ignored")
    message_round = int(tagged["round"])  # type: ignore[arg-type]
    held = context.state.config_records.get(ROUND_RECORD)
    node_round = int(held["round"]) if held is not None else 0  # type: ignore[arg-type]
    if stage == Stage.SETUP and message_round >= node_round:
        context.state.config_records[ROUND_RECORD] = ConfigRecord({"round": message_round})
    elif message_round != node_round:
        raise ValueError(
            f"SecAgg+ '{stage}' message of round {message_round} arrived while this node is in "
            f"round {node_round} (it came after its timeout): ignored"
        )


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Take part in SecAgg+ for the train messages that carry its stages.

    It must come first in the ClientApp's mods: the stage messages carry no
    model, and the masked reply is no longer fl_app's reply layout. Other
    messages pass through untouched.
    """
    if (
        msg.metadata.message_type != MessageType.TRAIN
        or RECORD_KEY_CONFIGS not in msg.content.config_records
    ):
        return call_next(msg, context)
    _enter_round(msg, context)
    return secaggplus_mod(msg, context, lambda inner, ctx: _fitres_reply(inner, ctx, call_next))
