"""The checks of the nodes' replies, and which node each reply answers for.

A reply is rejected (or its metrics left out) for the first problem found,
said in one line that names the node: an error reply, other than one
MetricRecord, a missing or non-finite metric, a non-positive ``num-examples``,
arrays other than those sent (keys, shape, dtype, NaN or Inf). Only the
metrics the strategy aggregates are kept, so extra client metrics cannot break
the averaging.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import log

from fl_app.aggregation import Update
from fl_app.wire.exchange import ServerExchange

TRAIN_METRICS = ("train_loss", "train_accuracy", "train_time", "client_time")
EVAL_METRICS = ("eval_loss", "eval_accuracy")
# With personalize-epochs: the node's fine-tuned copy of the head, on the same split.
PERSONAL_METRICS = ("personalized_loss", "personalized_accuracy")


def metric_problem(metrics: MetricRecord, keys: Iterable[str], weight_key: str) -> str | None:
    """Why ``metrics`` lack a positive ``weight_key`` or a finite one of ``keys``; else ``None``."""
    weight = metrics.get(weight_key)
    if weight is None:
        return f"missing '{weight_key}'"
    if isinstance(weight, list) or not math.isfinite(weight) or weight <= 0:
        return f"'{weight_key}'={weight!r} is not a positive number"
    for key in keys:
        value = metrics.get(key)
        if value is None:
            return f"missing metric '{key}'"
        if isinstance(value, list) or not math.isfinite(value):
            return f"metric '{key}'={value!r} is not a finite number"
    return None


def only_metrics(msg: Message) -> MetricRecord | str:
    """The reply's single MetricRecord, or why there is not exactly one."""
    if msg.has_error():
        return f"client error {msg.error.code}: {msg.error.reason}"
    records = list(msg.content.metric_records.values())
    if len(records) != 1:
        return f"expected 1 MetricRecord, got {len(records)}"
    return records[0]


def trimmed(metrics: MetricRecord, keys: Iterable[str], weight_key: str) -> RecordDict:
    """Only the metrics we aggregate, as the record Flower's metric averaging takes."""
    return RecordDict({"metrics": MetricRecord({k: metrics[k] for k in (weight_key, *keys)})})


def decode_update(arrays: ArrayRecord, sent: ArrayRecord) -> list[np.ndarray] | str:
    """The reply's arrays in the order ``sent``, or why they are not what was sent."""
    if list(arrays.keys()) != list(sent.keys()):
        missing = [k for k in sent if k not in arrays]
        extra = [k for k in arrays if k not in sent]
        return (
            f"expected {len(sent)} arrays, got {len(arrays)} "
            f"(missing {missing[:2]}, unexpected {extra[:2]})"
        )
    decoded = []
    for key, expected in sent.items():
        shape, dtype = tuple(expected.shape), expected.dtype
        try:
            value = arrays[key].numpy()
        except Exception as err:  # corrupt bytes can fail in many ways
            return f"array '{key}' cannot be decoded ({err})"
        if value.shape != shape or str(value.dtype) != dtype:
            return (
                f"array '{key}' is {value.dtype}{list(value.shape)}, expected {dtype}{list(shape)}"
            )
        if not np.isfinite(value).all():
            return f"array '{key}' contains NaN or Inf"
        decoded.append(value)
    return decoded


def check_train_reply(
    msg: Message, wire: ServerExchange, weight_key: str, arrays_key: str
) -> tuple[MetricRecord, list[np.ndarray]] | str:
    """A train reply's metrics and decoded arrays, or why it is rejected.

    ``wire`` decompresses the arrays and holds those sent, which they must match.
    """
    metrics = only_metrics(msg)
    if isinstance(metrics, str):
        return metrics
    problem = metric_problem(metrics, TRAIN_METRICS, weight_key)
    if problem is not None:
        return problem
    array_records = msg.content.array_records
    if list(array_records) != [arrays_key]:
        return f"expected one ArrayRecord '{arrays_key}', got {list(array_records)}"
    arrays = wire.received(msg)
    if isinstance(arrays, str):
        return arrays
    update = decode_update(arrays, wire.sent)
    if isinstance(update, str):
        return update
    return metrics, update


def check_eval_reply(msg: Message, weight_key: str) -> MetricRecord | str:
    """An evaluation reply's metrics, or why they are ignored."""
    metrics = only_metrics(msg)
    if isinstance(metrics, str):
        return metrics
    return metric_problem(metrics, EVAL_METRICS, weight_key) or metrics


def eval_keys(checked: Sequence[MetricRecord]) -> tuple[str, ...]:
    """The evaluation metrics to average: the personalised ones only if every reply has them."""
    personal = all(
        isinstance(m.get(k), float | int) and math.isfinite(m[k])
        for m in checked
        for k in PERSONAL_METRICS
    )
    return EVAL_METRICS + PERSONAL_METRICS if personal else EVAL_METRICS


def replies_by_node(
    server_round: int, sent: Iterable[Message], replies: Iterable[Message]
) -> tuple[list[tuple[int, Message]], list[int]]:
    """Each reply with the node it answers for, and the nodes sent to that did not reply.

    An error reply the SuperLink makes for a node (unavailable, crashed) comes
    from the SuperLink's own id: the message it replies to names the node. The
    nodes that did not reply are said in a line.
    """
    node_of = {msg.metadata.message_id: msg.metadata.dst_node_id for msg in sent}
    answered = []
    for reply in replies:
        node = node_of.pop(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        answered.append((node, reply))
    missing = sorted(node_of.values())
    if missing:
        log(
            WARNING,
            "Round %d: no reply from node(s) %s within round-timeout",
            server_round,
            ", ".join(map(str, missing)),
        )
    return answered, missing


def too_few(server_round: int, accepted: int, minimum: int) -> bool:
    """Whether ``accepted`` replies are too few to update the model (then said in a line)."""
    if accepted and accepted >= minimum:
        return False
    log(
        WARNING,
        "Round %d: %d valid replies (minimum %d); keeping the previous global model",
        server_round,
        accepted,
        minimum,
    )
    return True


@dataclass
class ValidUpdates:
    """A round's valid train replies: each node's update, in float64, and its metrics.

    Also counts the replies rejected (`reject` says why, in a line) and the
    unreadable images the nodes left out.
    """

    server_round: int
    nodes: list[int] = field(default_factory=list)
    updates: list[Update] = field(default_factory=list)
    metrics: list[RecordDict] = field(default_factory=list)
    rejected: int = 0
    skipped_images: int = 0

    def add(
        self,
        node: int,
        metrics: MetricRecord,
        arrays: Sequence[np.ndarray],
        sent: Sequence[np.ndarray],
        weight_key: str,
    ) -> None:
        """Keep ``node``'s update: its ``arrays`` minus those ``sent`` (float64)."""
        # Unreadable images a node left out: reported, not averaged.
        self.skipped_images += int(metrics.get("skipped_images", 0))
        # In float64: float32 differences and sums would lose digits to cancellation.
        self.updates.append([a.astype(np.float64) - r for a, r in zip(arrays, sent, strict=True)])
        self.nodes.append(node)
        self.metrics.append(trimmed(metrics, TRAIN_METRICS, weight_key))

    def reject(self, node: int, why: str) -> None:
        """Count ``node``'s reply as rejected, and say why."""
        self.rejected += 1
        log(WARNING, "Round %d: rejected reply from node %d: %s", self.server_round, node, why)

    def screen(self, reasons: Sequence[str | None]) -> None:
        """Reject the updates a screen gave a reason against (one per update, ``None``: kept)."""
        for node, why in zip(self.nodes, reasons, strict=True):
            if why is not None:
                self.reject(node, why)
        kept = [i for i, why in enumerate(reasons) if why is None]
        self.nodes = [self.nodes[i] for i in kept]
        self.updates = [self.updates[i] for i in kept]
        self.metrics = [self.metrics[i] for i in kept]
