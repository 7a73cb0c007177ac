"""FedAvg for transfer learning: a server-driven schedule and validated replies.

``TransferFedAvg`` averages client models weighted by ``num-examples`` like
stock FedAvg, but first rejects malformed replies (`fl_app.replies`, one log
line each, naming the node) and keeps the previous global model when too few
valid replies are left. It combines updates robustly (`fl_app.aggregation`),
under client-level DP (`fl_app.privacy`) or learns only their mean under SecAgg+
(`fl_app.secagg.server`); `fl_app.server_opt` takes the step. The wire addresses
the messages and decodes the replies (`fl_app.wire.exchange`); a round's record
is a `fl_app.round_record.RoundRecord`, kept by the run folder (`fl_app.run_folder`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fl_app import aggregation
from fl_app.config import RunConfig
from fl_app.grid import wait_for_nodes
from fl_app.privacy import BudgetSpentError, PrivacyBudget, clip, log_dp_settings, private_mean
from fl_app.replies import (
    ValidUpdates,
    check_eval_reply,
    check_train_reply,
    eval_keys,
    replies_by_node,
    too_few,
    trimmed,
)
from fl_app.round_record import RoundRecord
from fl_app.run_folder import RunFolder
from fl_app.schedule import TransferSchedule
from fl_app.secagg.protocol import SecAggPlusRound, SecureResult
from fl_app.secagg.server import SecureTrainGrid, log_secagg_settings, secure_update
from fl_app.server_opt import ServerOptimizer
from fl_app.wire.exchange import ServerExchange

Combined = tuple[aggregation.Update, list[RecordDict]]


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
    run_config : RunConfig, optional
        The run's settings, whose rule, DP and SecAgg+ lines `summary` adds to
        Flower's (without it, Flower's lines only).
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
        run_config: RunConfig | None = None,
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
        self.run_config = run_config
        # Noise must be unpredictable: from the OS, never from the run's seed.
        self._noise_rng = np.random.default_rng()
        self.global_arrays = ArrayRecord()
        # The round in flight, as far as it went.
        self.record = RoundRecord()
        # The messages of the round in flight: replies name their node through them.
        self._sent: list[Message] = []
        # What the round's SecAgg+ run gave, for `aggregate_train`.
        self._secure_result: SecureResult | None = None

    def summary(self) -> None:
        """Log Flower's settings, then the run's rule, DP and SecAgg+ settings."""
        super().summary()
        config = self.run_config
        if config is None:
            return
        settings = self.server_optimizer.settings(config.proximal_mu)
        log(INFO, "Strategy %s%s", config.strategy, settings)
        if self.privacy is not None:
            log_dp_settings(config)
        if self.secure is not None:
            log_secagg_settings(config, self.secure)

    # ---- train ---------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and send them the global model and this round's schedule."""
        server_round += self.rounds_done
        if self.privacy is not None:
            self.privacy.check_round(server_round)
        wait_for_nodes(grid, self.min_available_nodes, self.wait_for_nodes_timeout)
        started = time.perf_counter()
        # Flower samples with Python's global random: seed it per round.
        random.seed(f"{self.seed}/{server_round}/train")
        round_config = self.schedule.train_config(server_round)
        config.update(round_config)
        self.global_arrays = arrays
        phase, learning_rate = str(round_config["phase"]), float(round_config["learning-rate"])
        self.record = RoundRecord(
            round=server_round, phase=phase, learning_rate=learning_rate, started=started
        )
        self.wire.start_round()
        sampled = super().configure_train(server_round, arrays, config, grid)
        self._sent = self.wire.address(sampled, arrays, phase)
        log(
            INFO,
            "Round %d: phase %s, learning rate %g, %d nodes",
            server_round,
            phase,
            learning_rate,
            len(self._sent),
        )
        return self._sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Combine the valid replies' updates; reject the rest, one line per node."""
        server_round += self.rounds_done
        sent = [array.numpy().astype(np.float64) for array in self.wire.sent.values()]
        if self._secure_result is not None:
            combined = self._combine_secure(server_round, self._secure_result)
            self._secure_result = None
        else:
            combined = self._combine_replies(server_round, replies, sent)
        self.record.model_updated = combined is not None
        if combined is None:
            return None, None
        update, metric_records = combined
        keys = list(self.wire.sent.keys())
        new_global = self.server_optimizer.next_global(
            server_round,
            self.global_arrays,
            dict(zip(keys, sent, strict=True)),
            dict(zip(keys, update, strict=True)),
        )
        train_metrics = self.train_metrics_aggr_fn(metric_records, self.weighted_by_key)
        self.record.train_metrics = {k: float(v) for k, v in train_metrics.items()}
        return new_global, train_metrics

    def _combine_replies(
        self, server_round: int, replies: Iterable[Message], sent: list[np.ndarray]
    ) -> Combined | None:
        """Check every reply, screen and combine the updates; ``None``: keep the model."""
        sampled = len(self._sent)
        answered, self.record.missing_replies = self._answered(server_round, replies)
        valid = ValidUpdates(server_round)
        for node, msg in answered:
            self.wire.confirm(msg, node)
            checked = check_train_reply(msg, self.wire, self.weighted_by_key, self.arrayrecord_key)
            if isinstance(checked, str):
                valid.reject(node, checked)
            else:
                valid.add(node, *checked, sent, self.weighted_by_key)
        norms = [aggregation.update_norm(update) for update in valid.updates]
        if norms:
            self.record.update_norm_median = float(np.median(norms))
        if self.privacy is None:
            valid.screen(self.combiner.norm_rejections(norms))
        self.record.train_replies = len(valid.updates)
        self.record.rejected_replies = valid.rejected
        self.record.skipped_images = valid.skipped_images
        if too_few(server_round, len(valid.updates), self.min_train_nodes):
            return None
        if self.privacy is not None:
            clipped = sum(clip(update, self.dp_clip) > self.dp_clip for update in valid.updates)
            total = [sum(arrays) for arrays in zip(*valid.updates, strict=True)]
            noised = private_mean(
                total, sampled, self.privacy, self.dp_clip, self._noise_rng, self.record, clipped
            )
            return noised, valid.metrics
        claims = [float(r["metrics"][self.weighted_by_key]) for r in valid.metrics]
        combined, capped = self.combiner.combine(valid.updates, claims)
        self.record.capped_claims = capped or None
        return combined, valid.metrics

    def _combine_secure(self, server_round: int, result: SecureResult) -> Combined | None:
        """The checked unmasked mean, noised under DP; ``None`` (keep the model) when it fails."""
        assert self.secure is not None
        sampled = len(self._sent)
        self._sent = []
        combined = secure_update(
            server_round,
            result,
            self.wire,
            self.record,
            self.weighted_by_key,
            self.min_train_nodes,
            self.secure.bound,
        )
        if combined is None or self.privacy is None:
            return combined
        mean, metric_records = combined
        # Every node weighed 1: the mean times the nodes is the sum of clipped updates.
        total = [a * len(result.nodes) for a in mean]
        noised = private_mean(
            total, sampled, self.privacy, self.dp_clip, self._noise_rng, self.record
        )
        return noised, metric_records

    def _answered(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[list[tuple[int, Message]], int]:
        """Each reply with the node it answers for, and how many nodes did not reply."""
        answered, missing = replies_by_node(server_round, self._sent, replies)
        self._sent = []
        for node in missing:
            self.wire.forget(node)  # it may hold nothing of what it was sent
        return answered, len(missing)

    # ---- evaluate ------------------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes for federated evaluation of the global model."""
        server_round += self.rounds_done
        if self.fraction_evaluate > 0:
            wait_for_nodes(grid, self.min_available_nodes, self.wait_for_nodes_timeout)
        random.seed(f"{self.seed}/{server_round}/evaluate")
        sampled = super().configure_evaluate(server_round, arrays, config, grid)
        self._sent = self.wire.address(sampled, arrays, self.schedule.phase(server_round))
        return self._sent

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Average the valid evaluation replies' metrics by ``num-examples``."""
        server_round += self.rounds_done
        answered, self.record.eval_missing_replies = self._answered(server_round, replies)
        checked: list[MetricRecord] = []
        for node, msg in answered:
            self.wire.confirm(msg, node)
            metrics = check_eval_reply(msg, self.weighted_by_key)
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
        self.record.eval_replies = len(checked)
        keys = eval_keys(checked)
        valid = [trimmed(m, keys, self.weighted_by_key) for m in checked]
        if not valid:
            return None
        eval_metrics = self.evaluate_metrics_aggr_fn(valid, self.weighted_by_key)
        self.record.eval_metrics = {k: float(v) for k, v in eval_metrics.items()}
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
            grid = SecureTrainGrid(grid, self._train_securely)  # type: ignore[assignment]
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
        assert self.secure is not None and self.record.round is not None
        shapes = [tuple(array.shape) for array in self.wire.sent.values()]
        self._secure_result = self.secure.run(grid, messages, self.record.round, shapes)

    def _end_round(
        self, server_round: int, arrays: ArrayRecord, server_metrics: MetricRecord | None
    ) -> None:
        """Record the round (0: the start) and write its checkpoint."""
        saved = self.record.saved(server_round, self.wire.stats, server_metrics)
        self.record = RoundRecord()
        state = {"privacy": self.privacy.state()} if self.privacy is not None else {}
        self.folder.record(
            saved,
            arrays,
            (self.wire.held(), self.wire.bases),
            state,
            self.server_optimizer.state(),
        )
