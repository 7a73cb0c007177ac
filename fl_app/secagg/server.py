"""What the strategy does with a round under SecAgg+: run it, then check the mean it gave.

The round's train messages go through the protocol instead of one exchange
(`SecureTrainGrid`); the server then holds only the weighted mean of the nodes'
clipped updates, which it checks as a whole (`mean_problem`): no reply can be
validated, screened or capped alone. `secure_update` books the round (the
wire's bytes, the nodes that left, their metrics) and gives the mean, or
``None`` to keep the previous model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fl_app.aggregation import Update, update_norm
from fl_app.config import RunConfig
from fl_app.replies import TRAIN_METRICS, metric_problem, too_few, trimmed
from fl_app.round_record import RoundRecord
from fl_app.secagg import CLIPPED
from fl_app.secagg.protocol import SecAggPlusRound, SecureResult, log_dropped
from fl_app.wire.exchange import ServerExchange


class SecureTrainGrid:
    """The grid FedAvg's round loop talks to under secure aggregation.

    Train messages run the SecAgg+ protocol (``train``) instead of one exchange,
    and no reply comes back: what the round learns is the protocol's result.
    Everything else goes to ``grid`` unchanged.
    """

    def __init__(self, grid: Grid, train: Callable[[Grid, list[Message]], None]) -> None:
        self.grid = grid
        self.train = train

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Run train ``messages`` through SecAgg+ (no replies); send any others."""
        messages = list(messages)
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self.train(self.grid, messages)
            return []
        return self.grid.send_and_receive(messages, timeout=timeout)


def mean_problem(
    mean: Sequence[np.ndarray], norm: float, shapes: Sequence[tuple[int, ...]], bound: float
) -> str | None:
    """Why the unmasked mean (of L2 norm ``norm``) cannot be the round's update, or ``None``.

    Every node clipped its update to ``bound``, so their weighted mean lies
    within it; twice the bound leaves room for the quantization's error. A node
    that sends the largest value everywhere moves every coordinate and far
    exceeds it. ``shapes`` are the round's arrays'.
    """
    if [tuple(np.shape(a)) for a in mean] != list(shapes):
        return "has shapes other than the round's arrays"
    if not all(np.isfinite(a).all() for a in mean):
        return "contains NaN or Inf"
    if norm > 2 * bound:
        return f"has L2 norm {norm:.4g} > twice the nodes' clip bound {bound:g}"
    return None


def _book(result: SecureResult, wire: ServerExchange) -> None:
    """Tell the wire who took part and what the protocol moved."""
    for node in result.dropped:
        wire.forget(node)  # it may hold nothing of what it was sent
    for node in result.nodes:
        wire.received_from(node, 0)
    wire.stats["bytes_received"] += result.bytes_up
    wire.stats["bytes_sent"] += result.bytes_down


def _metric_records(server_round: int, result: SecureResult, weight_key: str) -> list[RecordDict]:
    """The nodes' train metrics to average; a node's that fail their check are left out."""
    records = []
    for node, fitres in result.replies:
        metrics = MetricRecord({k: v for k, v in fitres.metrics.items() if k != CLIPPED})
        problem = metric_problem(metrics, TRAIN_METRICS, weight_key)
        if problem is not None:  # its update is in the sum already; only its numbers go
            log(WARNING, "Round %d: node %d's metrics left out: %s", server_round, node, problem)
            continue
        records.append(trimmed(metrics, TRAIN_METRICS, weight_key))
    return records


def secure_update(
    server_round: int,
    result: SecureResult,
    wire: ServerExchange,
    record: RoundRecord,
    weight_key: str,
    min_nodes: int,
    bound: float,
) -> tuple[Update, list[RecordDict]] | None:
    """The round's mean update (float64) and the nodes' metrics; ``None``: keep the model.

    ``record`` gets the nodes that took part, left or clipped, and the mean's
    norm; ``wire`` the bytes the protocol moved. The mean must come from at
    least ``min_nodes`` nodes and pass `mean_problem` against ``bound``.
    """
    log_dropped(server_round, result)
    _book(result, wire)
    metric_records = _metric_records(server_round, result, weight_key)
    record.train_replies = len(result.nodes)
    record.secagg_dropped = len(result.dropped)
    record.secagg_clipped = sum(int(f.metrics.get(CLIPPED, 0)) for _, f in result.replies)
    if result.mean is None:
        log(
            WARNING, "Round %d: %s; keeping the previous global model", server_round, result.failure
        )
        return None
    if too_few(server_round, len(result.nodes), min_nodes):
        return None
    mean = [np.asarray(a, np.float64) for a in result.mean]
    norm = update_norm(mean)
    shapes = [tuple(array.shape) for array in wire.sent.values()]
    problem = mean_problem(mean, norm, shapes, bound)
    if problem is not None:
        log(
            WARNING,
            "Round %d: the unmasked mean %s; keeping the previous global model",
            server_round,
            problem,
        )
        return None
    record.update_norm_mean = norm
    return mean, metric_records


def log_secagg_settings(config: RunConfig, secure: SecAggPlusRound) -> None:
    """Log how the run's SecAgg+ clips, weighs and splits, and what it hides from the server."""
    log(
        INFO,
        "Secure aggregation: SecAgg+, updates clipped to L2 %g on the nodes, max weight %g, "
        "each secret split into %s, %s of them reconstruct it, %g s per stage; the server "
        "sees only their weighted mean, so max-update-norm-ratio and max-examples-ratio do "
        "not apply",
        secure.bound,
        secure.workflow.max_weight,
        f"{config.secagg_num_shares} shares"
        if config.secagg_num_shares
        else "one share per sampled node",
        config.secagg_threshold or "two thirds",
        secure.timeout,
    )
