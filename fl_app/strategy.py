"""FedAvg for transfer learning: a server-driven schedule and validated replies.

``TransferFedAvg`` averages client models weighted by ``num-examples`` like
stock FedAvg, but first rejects malformed replies (one log line each, naming
the node) and keeps the previous global model when too few valid replies are
left. It combines updates robustly on request (`fl_app.aggregation`) or with
client-level differential privacy (`fl_app.privacy`), or learns only the sum of the
updates under secure aggregation (`fl_app.secagg`). What each node is sent
and how replies decode is the wire's (`fl_app.wire.exchange.ServerExchange`);
what a run leaves behind is the run folder's (`fl_app.run_folder.RunFolder`).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fl_app import aggregation
from fl_app.privacy import PrivacyBudget, clip, noise_std, noised_mean
from fl_app.run_folder import RunFolder
from fl_app.schedule import TransferSchedule
from fl_app.secagg import CLIPPED, SecAggPlusRound, SecureResult, log_dropped
from fl_app.server_opt import ServerOptimizer
from fl_app.wire.exchange import ServerExchange

TRAIN_METRICS = ("train_loss", "train_accuracy", "train_time", "client_time")


class BudgetSpentError(Exception):
    """The next round would take ε past ``dp-target-epsilon``: the run ends here."""


EVAL_METRICS = ("eval_loss", "eval_accuracy")
# With personalize-epochs: the node's fine-tuned copy of the head, on the same split.
PERSONAL_METRICS = ("personalized_loss", "personalized_accuracy")


def _metric_problem(metrics: MetricRecord, keys: Iterable[str], weight_key: str) -> str | None:
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


def _only_metrics(msg: Message) -> MetricRecord | str:
    """The reply's single MetricRecord, or why there is not exactly one."""
    if msg.has_error():
        return f"client error {msg.error.code}: {msg.error.reason}"
    records = list(msg.content.metric_records.values())
    if len(records) != 1:
        return f"expected 1 MetricRecord, got {len(records)}"
    return records[0]


class TransferFedAvg(FedAvg):
    """FedAvg with a transfer schedule, validated replies and a run folder.

    Parameters
    ----------
    schedule : TransferSchedule
        Phase and learning rate per round, sent in the train ConfigRecord.
    folder : RunFolder
        Where each round's record and the best and final models go.
    wire : ServerExchange
        Addresses each round's messages and decodes the replies.
    wait_for_nodes_timeout : float
        Seconds to wait for ``min_available_nodes`` before a round; then the run fails.
    rounds_done : int
        Rounds an earlier run already did (resuming from its checkpoint): Flower's
        round 1 is round ``rounds_done + 1`` here, in messages, records and seeds.
    resumed : bool
        Whether the run continues a checkpoint (of round ``rounds_done``, maybe 0),
        whose round is already recorded.
    seed : int
        Seeds each round's node sampling, so that a resumed run samples as the
        uninterrupted one would (given the same node ids).
    combiner : Combiner, optional
        How the validated updates combine: the rule, the norm screen, the cap on
        claimed examples (default: the plain weighted mean). Without ``privacy`` only:
        clipping bounds every update, and the privacy analysis would not cover a
        rejection that depends on the other nodes.
    dp_clip : float
        With ``privacy``: the L2 bound of each update. The server clips whether the
        nodes did (``dp=client``) or not (``dp=server``), so the bound holds whatever
        a node sends.
    privacy : PrivacyBudget, optional
        Client-level DP: the noise multiplier, δ, ε target and rounds released.
        Without it, no update is clipped or noised.
    server_optimizer : ServerOptimizer, optional
        Turns the combined update into the next global arrays (default: FedAvg's step).
    secure : SecAggPlusRound, optional
        Secure aggregation: train messages go through SecAgg+, and the server gets
        only the weighted mean of the nodes' clipped updates, which it checks as a
        whole (no reply can be validated, screened or capped alone).
    **kwargs
        Passed to ``FedAvg`` (fractions, minimum nodes).

    """

    def __init__(
        self,
        schedule: TransferSchedule,
        folder: RunFolder,
        wire: ServerExchange,
        wait_for_nodes_timeout: float = 600.0,
        rounds_done: int = 0,
        resumed: bool = False,
        seed: int = 0,
        combiner: aggregation.Combiner | None = None,
        dp_clip: float = 1.0,
        privacy: PrivacyBudget | None = None,
        server_optimizer: ServerOptimizer | None = None,
        secure: SecAggPlusRound | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.schedule = schedule
        self.folder = folder
        self.wire = wire
        self.wait_for_nodes_timeout = wait_for_nodes_timeout
        self.rounds_done = rounds_done
        self.resumed = resumed
        self.seed = seed
        self.combiner = combiner or aggregation.Combiner()
        self.dp_clip = dp_clip
        self.privacy = privacy
        self.server_optimizer = server_optimizer or ServerOptimizer()
        self.secure = secure
        self._secure_result: SecureResult | None = None
        # Noise must be unpredictable: from the OS, never from the run's seed.
        self._noise_rng = np.random.default_rng()
        self.global_arrays = ArrayRecord()
        self._round: dict[str, Any] = {}
        self._round_start = 0.0
        # The messages of the round in flight: replies name their node through them.
        self._sent: list[Message] = []

    # ---- nodes -----------------------------------------------------------------

    def _wait_for_nodes(self, grid: Grid) -> None:
        """Wait, within ``wait_for_nodes_timeout``, for ``min_available_nodes`` nodes.

        Flower's own sampling waits without limit, logging every second.
        """
        needed = self.min_available_nodes
        deadline = time.monotonic() + self.wait_for_nodes_timeout
        next_log = 0.0
        while (connected := len(list(grid.get_node_ids()))) < needed:
            now = time.monotonic()
            if now >= deadline:
                raise RuntimeError(
                    f"only {connected} of the {needed} nodes needed (min-available-nodes) "
                    f"are connected after wait-for-nodes-timeout={self.wait_for_nodes_timeout:g} s"
                )
            if now >= next_log:
                log(INFO, "Waiting for nodes: %d of %d connected", connected, needed)
                next_log = now + 30
            time.sleep(1)

    def _replies_by_node(
        self, server_round: int, replies: Iterable[Message], missing_key: str
    ) -> list[tuple[int, Message]]:
        """Each reply with the node it answers for; logs and counts the nodes that did not reply.

        An error reply the SuperLink makes for a node (unavailable, crashed) comes
        from the SuperLink's own id: the message it replies to names the node.
        """
        node_of = {msg.metadata.message_id: msg.metadata.dst_node_id for msg in self._sent}
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
            for node in missing:
                self.wire.forget(node)  # it may hold nothing of what it was sent
        self._round[missing_key] = len(missing)
        self._sent = []
        return answered

    # ---- train ---------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and send them the global model and this round's schedule."""
        server_round += self.rounds_done
        if self.privacy is not None and not self.privacy.allows_another_round():
            raise BudgetSpentError(
                f"round {server_round} would take epsilon from {self.privacy.epsilon:.3g} to "
                f"{self.privacy.next_epsilon():.3g} > dp-target-epsilon="
                f"{self.privacy.target_epsilon:g} (delta {self.privacy.delta:g}): the run stops "
                f"after round {server_round - 1}"
            )
        self._wait_for_nodes(grid)
        self._round_start = time.perf_counter()
        # Flower samples with Python's global random: seed it per round.
        random.seed(f"{self.seed}/{server_round}/train")
        round_config = self.schedule.train_config(server_round)
        config.update(round_config)
        self.global_arrays = arrays
        self._round = {
            "round": server_round,
            "phase": round_config["phase"],
            "learning_rate": round_config["learning-rate"],
        }
        self.wire.start_round()
        sampled = super().configure_train(server_round, arrays, config, grid)
        messages = self.wire.address(sampled, arrays, str(round_config["phase"]))
        self._sent = messages
        log(
            INFO,
            "Round %d: phase %s, learning rate %g, %d nodes",
            server_round,
            round_config["phase"],
            round_config["learning-rate"],
            len(messages),
        )
        return messages

    def _decode_update(self, arrays: ArrayRecord) -> list[np.ndarray] | str:
        """The reply's arrays in the order sent, or why they are malformed."""
        reference = self.wire.sent
        if list(arrays.keys()) != list(reference.keys()):
            missing = [k for k in reference if k not in arrays]
            extra = [k for k in arrays if k not in reference]
            return (
                f"expected {len(reference)} arrays, got {len(arrays)} "
                f"(missing {missing[:2]}, unexpected {extra[:2]})"
            )
        decoded = []
        for key, expected in reference.items():
            shape, dtype = tuple(expected.shape), expected.dtype
            try:
                value = arrays[key].numpy()
            except Exception as err:  # corrupt bytes can fail in many ways
                return f"array '{key}' cannot be decoded ({err})"
            if value.shape != shape or str(value.dtype) != dtype:
                return (
                    f"array '{key}' is {value.dtype}{list(value.shape)}, "
                    f"expected {dtype}{list(shape)}"
                )
            if not np.isfinite(value).all():
                return f"array '{key}' contains NaN or Inf"
            decoded.append(value)
        return decoded

    def _check_train_reply(self, msg: Message) -> tuple[MetricRecord, list[np.ndarray]] | str:
        """The reply's metrics and decoded arrays, or why it is rejected."""
        metrics = _only_metrics(msg)
        if isinstance(metrics, str):
            return metrics
        problem = _metric_problem(metrics, TRAIN_METRICS, self.weighted_by_key)
        if problem is not None:
            return problem
        array_records = msg.content.array_records
        if list(array_records) != [self.arrayrecord_key]:
            return f"expected one ArrayRecord '{self.arrayrecord_key}', got {list(array_records)}"
        arrays = self.wire.received(msg)
        if isinstance(arrays, str):
            return arrays
        update = self._decode_update(arrays)
        if isinstance(update, str):
            return update
        return metrics, update

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Combine the valid replies' updates; reject the rest, one line per node."""
        server_round += self.rounds_done
        reference = [array.numpy().astype(np.float64) for array in self.wire.sent.values()]
        if self._secure_result is not None:
            combined = self._combine_secure(server_round, self._secure_result)
            self._secure_result = None
        else:
            combined = self._combine_replies(server_round, replies, reference)
        if combined is None:
            self._round["model_updated"] = False
            return None, None
        update, metric_records = combined
        keys = list(self.wire.sent.keys())
        stepped = self.server_optimizer.step(
            server_round,
            dict(zip(keys, reference, strict=True)),
            dict(zip(keys, update, strict=True)),
        )
        # Arrays that did not travel stay the very same objects (bases share them).
        new_global = ArrayRecord(
            {
                key: Array(stepped[key].astype(array.dtype)) if key in stepped else array
                for key, array in self.global_arrays.items()
            }
        )
        train_metrics = self.train_metrics_aggr_fn(metric_records, self.weighted_by_key)
        self._round["model_updated"] = True
        self._round.update({k: float(v) for k, v in train_metrics.items()})
        return new_global, train_metrics

    def _too_few(self, server_round: int, accepted: int) -> bool:
        """Whether ``accepted`` replies are too few to update the model (then said in a line)."""
        if accepted and accepted >= self.min_train_nodes:
            return False
        log(
            WARNING,
            "Round %d: %d valid replies (minimum %d); keeping the previous global model",
            server_round,
            accepted,
            self.min_train_nodes,
        )
        return True

    def _combine_replies(
        self, server_round: int, replies: Iterable[Message], reference: list[np.ndarray]
    ) -> tuple[aggregation.Update, list[RecordDict]] | None:
        """Check every reply, screen and combine the updates; ``None``: keep the model."""
        sampled = len(self._sent)
        nodes: list[int] = []
        updates: list[aggregation.Update] = []
        metric_records: list[RecordDict] = []
        rejected = skipped = 0

        def reject(node: int, why: str) -> None:
            nonlocal rejected
            rejected += 1
            log(WARNING, "Round %d: rejected reply from node %d: %s", server_round, node, why)

        for node, msg in self._replies_by_node(server_round, replies, "missing_replies"):
            self.wire.confirm(msg, node)
            checked = self._check_train_reply(msg)
            if isinstance(checked, str):
                reject(node, checked)
                continue
            metrics, arrays = checked
            # Unreadable images a node left out: reported, not averaged.
            skipped += int(metrics.get("skipped_images", 0))
            # In float64: float32 differences and sums would lose digits to cancellation.
            updates.append(
                [a.astype(np.float64) - r for a, r in zip(arrays, reference, strict=True)]
            )
            nodes.append(node)
            metric_records.append(
                RecordDict({"metrics": _trimmed(metrics, TRAIN_METRICS, self.weighted_by_key)})
            )

        norms = [aggregation.update_norm(update) for update in updates]
        if norms:
            self._round["update_norm_median"] = float(np.median(norms))
        if self.privacy is None:
            outliers = self.combiner.outliers(norms)
            limit = self.combiner.max_update_norm_ratio * self._round.get("update_norm_median", 0)
            for node, norm, outlier in zip(nodes, norms, outliers, strict=True):
                if outlier:
                    reject(
                        node,
                        f"update norm {norm:.4g} > max-update-norm-ratio x median = {limit:.4g}",
                    )
            kept = [i for i, outlier in enumerate(outliers) if not outlier]
            nodes, updates = [nodes[i] for i in kept], [updates[i] for i in kept]
            metric_records = [metric_records[i] for i in kept]

        accepted = len(updates)
        self._round.update(
            train_replies=accepted, rejected_replies=rejected, skipped_images=skipped
        )
        if self._too_few(server_round, accepted):
            return None
        if self.privacy is not None:
            clipped = sum(clip(update, self.dp_clip) > self.dp_clip for update in updates)
            total = [sum(arrays) for arrays in zip(*updates, strict=True)]
            return self._private_mean(total, sampled, int(clipped)), metric_records
        claims = [float(r["metrics"][self.weighted_by_key]) for r in metric_records]
        combined, capped = self.combiner.combine(updates, claims)
        if capped:
            self._round["capped_claims"] = capped
        return combined, metric_records

    def _combine_secure(
        self, server_round: int, result: SecureResult
    ) -> tuple[aggregation.Update, list[RecordDict]] | None:
        """Check the unmasked mean as a whole; ``None`` (keep the model) when it fails."""
        assert self.secure is not None
        sampled = len(self._sent)
        self._sent = []
        log_dropped(server_round, result)
        for node in result.dropped:
            self.wire.forget(node)  # it may hold nothing of what it was sent
        for node in result.nodes:
            self.wire.received_from(node, 0)
        self.wire.stats["bytes_received"] += result.bytes_up
        self.wire.stats["bytes_sent"] += result.bytes_down
        metric_records = []
        for node, fitres in result.replies:
            metrics = MetricRecord({k: v for k, v in fitres.metrics.items() if k != CLIPPED})
            problem = _metric_problem(metrics, TRAIN_METRICS, self.weighted_by_key)
            if problem is not None:  # its update is in the sum already; only its numbers go
                log(
                    WARNING, "Round %d: node %d's metrics left out: %s", server_round, node, problem
                )
                continue
            metric_records.append(
                RecordDict({"metrics": _trimmed(metrics, TRAIN_METRICS, self.weighted_by_key)})
            )
        self._round.update(
            train_replies=len(result.nodes),
            secagg_dropped=len(result.dropped),
            secagg_clipped=sum(int(f.metrics.get(CLIPPED, 0)) for _, f in result.replies),
        )
        if result.mean is None:
            log(
                WARNING,
                "Round %d: %s; keeping the previous global model",
                server_round,
                result.failure,
            )
            return None
        if self._too_few(server_round, len(result.nodes)):
            return None
        mean = [np.asarray(a, np.float64) for a in result.mean]
        norm = aggregation.update_norm(mean)
        problem = self._mean_problem(mean, norm)
        if problem is not None:
            log(
                WARNING,
                "Round %d: the unmasked mean %s; keeping the previous global model",
                server_round,
                problem,
            )
            return None
        self._round["update_norm_mean"] = norm
        if self.privacy is not None:
            # Every node weighed 1: the mean times the nodes is the sum of clipped updates.
            total = [a * len(result.nodes) for a in mean]
            return self._private_mean(total, sampled, None), metric_records
        return mean, metric_records

    def _mean_problem(self, mean: list[np.ndarray], norm: float) -> str | None:
        """Why the unmasked mean (of L2 norm ``norm``) cannot be the round's update, or ``None``.

        Every node clipped its update to the bound, so their weighted mean lies
        within it; twice the bound leaves room for the quantization's error. A node
        that sends the largest value everywhere moves every coordinate and far
        exceeds it.
        """
        assert self.secure is not None
        shapes = [tuple(array.shape) for array in self.wire.sent.values()]
        if [tuple(np.shape(a)) for a in mean] != shapes:
            return "has shapes other than the round's arrays"
        if not all(np.isfinite(a).all() for a in mean):
            return "contains NaN or Inf"
        if norm > 2 * self.secure.bound:
            return f"has L2 norm {norm:.4g} > twice the nodes' clip bound {self.secure.bound:g}"
        return None

    def _private_mean(
        self, total: aggregation.Update, sampled: int, clipped: int | None
    ) -> aggregation.Update:
        """The noised mean of a sum of clipped updates over the nodes sampled; count ε.

        ``clipped`` is how many updates the server had to clip (``None`` when it
        never saw them: under secure aggregation the nodes clip).
        """
        assert self.privacy is not None
        noised = noised_mean(
            total, sampled, self.privacy.noise_multiplier, self.dp_clip, self._noise_rng
        )
        self.privacy.rounds += 1
        if clipped is not None:
            self._round["dp_clipped"] = clipped
        self._round.update(
            dp_noise_std=noise_std(self.privacy.noise_multiplier, self.dp_clip, sampled),
            dp_epsilon=self.privacy.epsilon,
            dp_delta=self.privacy.delta,
        )
        return noised

    # ---- evaluate ------------------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes for federated evaluation of the global model."""
        server_round += self.rounds_done
        if self.fraction_evaluate > 0:
            self._wait_for_nodes(grid)
        random.seed(f"{self.seed}/{server_round}/evaluate")
        sampled = super().configure_evaluate(server_round, arrays, config, grid)
        self._sent = self.wire.address(sampled, arrays, self.schedule.phase(server_round))
        return self._sent

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Average the valid evaluation replies' metrics by ``num-examples``."""
        server_round += self.rounds_done
        checked: list[MetricRecord] = []
        for node, msg in self._replies_by_node(server_round, replies, "eval_missing_replies"):
            self.wire.confirm(msg, node)
            metrics = _only_metrics(msg)
            if not isinstance(metrics, str):
                metrics = _metric_problem(metrics, EVAL_METRICS, self.weighted_by_key) or metrics
            if isinstance(metrics, str):
                log(
                    WARNING,
                    "Round %d: ignored evaluation reply from node %d: %s",
                    server_round,
                    node,
                    metrics,
                )
                continue
            checked.append(metrics)
        self._round["eval_replies"] = len(checked)
        # Personalised numbers count only if every valid reply has them, finite.
        personal = all(
            isinstance(m.get(k), float | int) and math.isfinite(m[k])
            for m in checked
            for k in PERSONAL_METRICS
        )
        keys = EVAL_METRICS + PERSONAL_METRICS if personal else EVAL_METRICS
        valid = [RecordDict({"metrics": _trimmed(m, keys, self.weighted_by_key)}) for m in checked]
        if not valid:
            return None
        eval_metrics = self.evaluate_metrics_aggr_fn(valid, self.weighted_by_key)
        self._round.update({k: float(v) for k, v in eval_metrics.items()})
        return eval_metrics

    # ---- run -------------------------------------------------------------------

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run FedAvg to round ``num_rounds``, recording and checkpointing every round.

        ``timeout`` bounds each round's wait for replies. Resuming
        (``rounds_done`` > 0), the rounds after ``rounds_done`` run.
        """
        self.folder.run_info["num_rounds"] = num_rounds
        latest = {"arrays": initial_arrays}

        def evaluate_and_record(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            # FedAvg.start calls this once before round 1 and at the end of every round.
            latest["arrays"] = arrays
            if server_round == 0 and self.resumed:
                return None  # the resumed checkpoint's round: recorded by the earlier run
            server_round += self.rounds_done
            server_metrics = evaluate_fn(server_round, arrays) if evaluate_fn else None
            self._end_round(server_round, arrays, server_metrics)
            return server_metrics

        if self.secure is not None:
            grid = _SecureTrainGrid(grid, self._train_securely)  # type: ignore[assignment]
        status = "failed"
        result = Result()
        try:
            try:
                result = super().start(
                    grid,
                    initial_arrays,
                    num_rounds=num_rounds - self.rounds_done,
                    timeout=timeout,
                    train_config=train_config,
                    evaluate_config=evaluate_config,
                    evaluate_fn=evaluate_and_record,
                )
            except BudgetSpentError as spent:
                # A planned end: the models so far are kept, and the run counts as completed.
                log(WARNING, "Privacy budget: %s", spent)
                self.folder.run_info["stopped"] = f"privacy budget: {spent}"
            self.folder.save(latest["arrays"], "final.keras")
            status = "completed"
        finally:
            self.folder.write_metrics(status)
        return result

    def _train_securely(self, grid: Grid, messages: list[Message]) -> None:
        """Run the round's train messages through SecAgg+; `aggregate_train` takes the result."""
        assert self.secure is not None
        shapes = [tuple(array.shape) for array in self.wire.sent.values()]
        self._secure_result = self.secure.run(grid, messages, self._round["round"], shapes)

    def _end_round(
        self, server_round: int, arrays: ArrayRecord, server_metrics: MetricRecord | None
    ) -> None:
        record: dict[str, Any] = {"round": server_round}
        if server_round > 0:
            record.update({**self._round, **self.wire.stats})
            record["round_time"] = time.perf_counter() - self._round_start
        if server_metrics is not None:
            record.update({f"server_{k}": float(v) for k, v in server_metrics.items()})
        self._round = {}
        state = {"privacy": self.privacy.state()} if self.privacy is not None else {}
        self.folder.record(
            record,
            arrays,
            (self.wire.held(), self.wire.bases),
            state,
            self.server_optimizer.state(),
        )


class _SecureTrainGrid:
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
        messages = list(messages)
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self.train(self.grid, messages)
            return []
        return self.grid.send_and_receive(messages, timeout=timeout)


def _trimmed(metrics: MetricRecord, keys: Iterable[str], weight_key: str) -> MetricRecord:
    """Only the metrics we aggregate, so extra client metrics cannot break averaging."""
    return MetricRecord({k: metrics[k] for k in (weight_key, *keys)})
