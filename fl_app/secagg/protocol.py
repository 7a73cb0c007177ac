"""The server's side of SecAgg+: one round's train messages through Flower's four stages.

`SecAggPlusRound` runs the stage methods of Flower's ``SecAggPlusWorkflow`` with a
stand-in for the legacy context and strategy they want, through a grid that tags,
counts and screens the stage messages; `SecureResult` is what the round gave.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any, NamedTuple

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, bytes_to_ndarray, log, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fl_app.config import RunConfig
from fl_app.secagg import ROUND_RECORD, update_bound

# Flower's quantization levels and mask modulus (its defaults): sums of up to
# 2^32 / 2^22 = 1,024 nodes cannot overflow.
QUANTIZATION_RANGE = 2**22
MODULUS_RANGE = 2**32


def max_weight(config: RunConfig) -> float:
    """The largest weight of a node's update: 1 under ``dp=client``, where all weigh 1."""
    return 1.0 if config.dp == "client" else config.secagg_max_weight


class _Proxy(NamedTuple):
    """What the stages read of a legacy ClientProxy: its node id."""

    node_id: int


@dataclass
class _LegacyStandIn:
    """The parts of a LegacyContext and its strategy that the stage methods use."""

    nodes: list[int]
    server_round: int
    state: RecordDict = field(default_factory=RecordDict)
    mean: list[np.ndarray] | None = None
    results: list[tuple[Any, FitRes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: self.server_round}
        )
        self.state[MAIN_PARAMS_RECORD] = ArrayRecord()
        self.strategy = self
        self.client_manager = self

    def num_available(self) -> int:
        return len(self.nodes)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: Any
    ) -> list[tuple[_Proxy, FitIns]]:
        # The real content of each node's message replaces these after the setup stage.
        return [(_Proxy(node), FitIns(parameters, {})) for node in self.nodes]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[Any, FitRes]], failures: list[Any]
    ) -> tuple[None, dict]:
        self.results = results
        if results:  # every result carries the same unmasked mean
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}


class SecureResult(NamedTuple):
    """What one SecAgg+ round gave the server.

    ``mean`` is the weighted mean of the updates of ``nodes`` (``None`` when the
    protocol halted; ``failure`` says why); ``replies`` are their train replies,
    whose metrics and weight stay visible; ``dropped`` the sampled nodes that
    fell out, each with the reason; ``bytes_up`` what the nodes uploaded, and
    ``bytes_down`` what the protocol sent them besides the round's arrays.
    """

    mean: list[np.ndarray] | None
    replies: list[tuple[int, FitRes]]
    dropped: dict[int, str]
    bytes_up: int
    bytes_down: int
    failure: str

    @property
    def nodes(self) -> list[int]:
        """The nodes whose updates the mean holds."""
        return [node for node, _ in self.replies]


def _config_bytes(msg: Message) -> int:
    """Bytes of the byte strings in a message's config records (keys, shares, masked vectors)."""
    total = 0
    for record in msg.content.config_records.values():
        for value in record.values():
            values = value if isinstance(value, list) else [value]
            total += sum(len(v) for v in values if isinstance(v, bytes))
    return total


def _reply_bytes(msg: Message) -> int:
    """Bytes a reply carries: its arrays and its config records' byte strings."""
    if msg.has_error():
        return 0
    arrays = sum(record.count_bytes() for record in msg.content.array_records.values())
    return arrays + _config_bytes(msg)


def _last_line(reason: str) -> str:
    """An error reason in one line: a node's traceback ends with the exception itself."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "error reply without a reason"


class _StageGrid:
    """The grid the stages talk through: it tags, counts and screens the messages.

    Each stage message names its round (`ROUND_RECORD`), for the node to refuse
    one that comes too late.

    Masked values say nothing, but their shapes are public: a reply whose shapes
    are not the round's is turned into an error reply, so the protocol drops that
    node as it drops one that failed, instead of the sum failing or broadcasting.
    """

    def __init__(self, grid: Grid, shapes: Sequence[tuple[int, ...]], server_round: int) -> None:
        self.grid = grid
        self.round_record = ConfigRecord({"round": server_round})
        # The first masked array carries the node's quantized weight.
        self.shapes = [(1,), *map(tuple, shapes)]
        self.bytes_up = 0
        # The protocol's own messages; the model and base that ride along are the wire's.
        self.bytes_down = 0
        self.dropped: dict[int, str] = {}

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            msg.content.config_records[ROUND_RECORD] = self.round_record
        node_of = {msg.metadata.message_id: msg.metadata.dst_node_id for msg in messages}
        self.bytes_down += sum(_config_bytes(msg) for msg in messages)
        screened = []
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            self.bytes_up += _reply_bytes(reply)
            problem = _last_line(reply.error.reason) if reply.has_error() else None
            problem = problem or self._masked_problem(reply)
            if problem is not None:
                # An error the SuperLink makes for a node comes from the SuperLink's id.
                node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
                self.dropped.setdefault(node, problem)
                if not reply.has_error():
                    error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, problem)
                    reply = Message(error=error, metadata=reply.metadata)
            screened.append(reply)
        return screened

    def _masked_problem(self, reply: Message) -> str | None:
        record = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if record is None or Key.MASKED_PARAMETERS not in record:
            return None  # not the masked-vector stage
        try:
            shapes = [bytes_to_ndarray(b).shape for b in record[Key.MASKED_PARAMETERS]]
        except Exception as err:  # undecodable bytes can fail in many ways
            return f"masked vector cannot be decoded ({err})"
        if len(shapes) != len(self.shapes):
            return f"masked vector has {len(shapes)} arrays, expected {len(self.shapes)}"
        for index, (shape, expected) in enumerate(zip(shapes, self.shapes, strict=True)):
            if shape != expected:
                return f"masked array {index} is {shape}, expected {expected}"
        return None


class SecAggPlusRound:
    """Runs one round's train messages through Flower's four SecAgg+ stages.

    Parameters
    ----------
    config : RunConfig
        The ``secagg-*`` keys: shares, threshold, clipping range, max weight, timeout.
    """

    def __init__(self, config: RunConfig) -> None:
        shares = config.secagg_num_shares or 1.0  # Flower: a float is a share of the sampled
        threshold = config.secagg_threshold or 2 / 3
        self.threshold = config.secagg_threshold
        self.bound = update_bound(config)
        self.timeout = float(config.secagg_timeout or config.round_timeout)
        self.workflow = SecAggPlusWorkflow(
            shares,
            threshold,
            max_weight=max_weight(config),
            clipping_range=config.secagg_clipping_range,
            quantization_range=QUANTIZATION_RANGE,
            modulus_range=MODULUS_RANGE,
            timeout=self.timeout,
        )

    def check_sampled(self, sampled: int) -> None:
        """``ValueError`` in one line when ``sampled`` nodes cannot run the protocol."""
        if sampled < 2:
            raise ValueError(
                f"secure aggregation needs at least 2 nodes a round, {sampled} was sampled "
                "(raise min-train-nodes or fraction-train)"
            )
        if self.threshold > sampled:
            raise ValueError(
                f"secagg-threshold={self.threshold} is more than the {sampled} nodes sampled: "
                "no secret could be reconstructed (lower it, or sample more nodes)"
            )

    def run(
        self, grid: Grid, messages: Sequence[Message], server_round: int, shapes: Sequence[tuple]
    ) -> SecureResult:
        """Mask, sum and unmask the updates the nodes of ``messages`` train.

        Every exception of the protocol stays in the round: the result then has
        no mean and says why.
        """
        nodes = [msg.metadata.dst_node_id for msg in messages]
        self.check_sampled(len(nodes))
        context = _LegacyStandIn(nodes, server_round)
        state = WorkflowState()
        stage_grid = _StageGrid(grid, shapes, server_round)
        failure = ""
        try:
            for number, stage in enumerate(
                (
                    self.workflow.setup_stage,
                    self.workflow.share_keys_stage,
                    self.workflow.collect_masked_vectors_stage,
                    self.workflow.unmask_stage,
                )
            ):
                if number == 2:
                    # Each node's own message (model, base, config) rides with the stage
                    # that trains; Flower's stand-in FitIns never leaves the server.
                    state.nid_to_fitins = {
                        msg.metadata.dst_node_id: msg.content
                        for msg in messages
                        if msg.metadata.dst_node_id in state.active_node_ids
                    }
                if not stage(stage_grid, context, state):  # type: ignore[arg-type]
                    failure = f"SecAgg+ halted in stage {number}: too few nodes left"
                    break
        except Exception as err:  # a bad reply must not end the run
            failure = f"SecAgg+ failed in the round ({type(err).__name__}: {err})"
        finished = context.mean is not None and not failure
        # The mean holds the updates of the nodes that uploaded a masked vector, even one
        # that fell out while unmasking (its neighbours' shares stood in for it).
        replies = [(proxy.node_id, fitres) for proxy, fitres in context.results] if finished else []
        kept = {node for node, _ in replies}
        dropped = {
            node: stage_grid.dropped.get(node, "no reply within secagg-timeout")
            for node in nodes
            if node not in kept
        }
        return SecureResult(
            context.mean if finished else None,
            replies,
            dropped,
            stage_grid.bytes_up,
            stage_grid.bytes_down,
            failure,
        )


def log_dropped(server_round: int, result: SecureResult) -> None:
    """One warning line per node that fell out of the round."""
    for node, why in sorted(result.dropped.items()):
        log(WARNING, "Round %d: node %d left SecAgg+: %s", server_round, node, why)
