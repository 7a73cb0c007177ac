"""FedAvg for transfer learning: a server-driven schedule, reply validation, records.

``TransferFedAvg`` averages client models weighted by ``num-examples`` like
stock FedAvg, but first rejects malformed replies (one log line each, naming
the node), keeps the previous global model when too few valid replies are
left, sends each round's phase and learning rate, and writes ``metrics.json``
and ``best.keras``/``final.keras`` into the run folder as it goes. Rounds
carry only the arrays that train (``fl_app.wire.exchange``), optionally compressed
(``fl_app.wire.compression``); bytes each way are recorded per round.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fl_app.wire.compression import METHODS, RECORD, UPLOAD_ERROR, decode, encode
from fl_app.wire.exchange import BASE, BASE_HASH, EXCHANGES, base_hash, differing_keys
from fl_app.model.classifier import FINE_TUNE, HEAD

TRAIN_METRICS = ("train_loss", "train_accuracy", "train_time", "client_time")
EVAL_METRICS = ("eval_loss", "eval_accuracy")


@dataclass(frozen=True)
class TransferSchedule:
    """Which part of the model trains in a round, and how fast.

    Rounds ``1..head_rounds`` train the head on a frozen backbone at
    ``learning_rate``; later rounds also train the backbone's last
    ``fine_tune_layers`` layers at ``fine_tune_learning_rate``.
    """

    head_rounds: int
    learning_rate: float
    fine_tune_learning_rate: float
    fine_tune_layers: int

    def train_config(self, server_round: int) -> dict[str, Any]:
        """The ConfigRecord entries that tell clients how to train this round."""
        head = server_round <= self.head_rounds or self.fine_tune_layers == 0
        return {
            "phase": HEAD if head else FINE_TUNE,
            "learning-rate": self.learning_rate if head else self.fine_tune_learning_rate,
            "fine-tune-layers": self.fine_tune_layers,
        }


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
    run_dir : Path
        Folder for ``metrics.json`` and the ``best``/``final`` model files.
    save_model : Callable[[ArrayRecord, Path], None]
        Writes a model file from global arrays (the server owns the Keras model).
    run_info : Mapping[str, Any]
        Extra top-level entries of ``metrics.json`` (e.g. how weights started).
    on_round_end : Callable[[Mapping[str, Any]], None], optional
        Called with each round's record once it is complete (e.g. TensorBoard).
    trainable_keys : Mapping[str, Sequence[str]], optional
        Per phase, the keys of the arrays that training changes, in model order.
        Required for ``exchange="trainable"``.
    exchange : str
        ``trainable``: after its first message a node gets and returns only
        those arrays; ``full``: every array travels every time.
    compression : str
        ``none``, ``float16`` or ``int8``, for the arrays of every round.
    **kwargs
        Passed to ``FedAvg`` (fractions, minimum nodes, keys).

    """

    def __init__(
        self,
        schedule: TransferSchedule,
        run_dir: Path,
        save_model: Callable[[ArrayRecord, Path], None],
        run_info: Mapping[str, Any] | None = None,
        on_round_end: Callable[[Mapping[str, Any]], None] | None = None,
        trainable_keys: Mapping[str, Sequence[str]] | None = None,
        exchange: str = "trainable",
        compression: str = "none",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange={exchange!r} is not one of {', '.join(EXCHANGES)}")
        if compression not in METHODS:
            raise ValueError(f"compression={compression!r} is not one of {', '.join(METHODS)}")
        if exchange == "trainable" and trainable_keys is None:
            raise ValueError("exchange='trainable' needs trainable_keys")
        self.trainable_keys = trainable_keys
        self.exchange = exchange
        self.compression = compression
        self.schedule = schedule
        self.run_dir = Path(run_dir)
        self.save_model = save_model
        self.run_info = dict(run_info or {})
        self.on_round_end = on_round_end
        self.rounds: list[dict[str, Any]] = []
        self.best_accuracy = -math.inf
        self.global_arrays = ArrayRecord()
        # What nodes trained from this round (decoded as they decoded it).
        self._sent_train = ArrayRecord()
        self._upload_errors: list[float] = []
        # Base models by hash, the one each node holds, and those sent but not yet confirmed.
        self._bases: dict[str, ArrayRecord] = {}
        self._holders: dict[int, str] = {}
        self._pending: dict[int, str] = {}
        self._round: dict[str, Any] = {}
        self._round_start = 0.0

    # ---- train ---------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and send them the global model and this round's schedule."""
        self._round_start = time.perf_counter()
        round_config = self.schedule.train_config(server_round)
        config.update(round_config)
        self.global_arrays = arrays
        self._upload_errors = []
        self._round = {
            "round": server_round,
            "phase": round_config["phase"],
            "learning_rate": round_config["learning-rate"],
            "bytes_sent": 0,
            "bytes_received": 0,
            "bases_sent": 0,
        }
        sampled = super().configure_train(server_round, arrays, config, grid)
        messages, self._sent_train = self._address(sampled, arrays, round_config["phase"])
        log(
            INFO,
            "Round %d: phase %s, learning rate %g, %d nodes",
            server_round,
            round_config["phase"],
            round_config["learning-rate"],
            len(messages),
        )
        return messages

    def _address(
        self, sampled: Iterable[Message], arrays: ArrayRecord, phase: str
    ) -> tuple[list[Message], ArrayRecord]:
        """Give each sampled node this round's arrays, and its base if it needs one.

        Returns the messages and the arrays as the nodes will decode them.
        """
        if self.exchange == "full" or self.trainable_keys is None:
            keys = list(arrays.keys())
        else:
            keys = list(self.trainable_keys[phase])
        payload = ArrayRecord({key: arrays[key] for key in keys})
        compression, received = None, payload
        if self.compression != "none":
            payload, compression, error = encode(payload, self.compression)
            received = decode(payload, compression)
            self._round["download_error"] = error
        messages = []
        for msg in sampled:
            node = msg.metadata.dst_node_id
            config = ConfigRecord(dict(msg.content[self.configrecord_key]))
            content = RecordDict({self.arrayrecord_key: payload, self.configrecord_key: config})
            if compression is not None:
                content[RECORD] = compression
            if self.exchange == "trainable":
                name, new = self._base_for(node, arrays, keys)
                config[BASE_HASH] = name
                if new:
                    content[BASE] = self._bases[name]
                    self._pending[node] = name
                    self._round["bases_sent"] = self._round.get("bases_sent", 0) + 1
            self._round["bytes_sent"] = self._round.get("bytes_sent", 0) + sum(
                record.count_bytes() for record in content.array_records.values()
            )
            msg.content = content
            messages.append(msg)
        return messages, received

    def _base_for(self, node: int, arrays: ArrayRecord, keys: Sequence[str]) -> tuple[str, bool]:
        """The base ``node`` builds the model on, and whether it must be sent.

        Any base that differs from the global model only in arrays that travel
        anyway will do; the one the node holds is free, another costs a send.
        """
        held = self._holders.get(node)
        for name in sorted(self._bases, key=lambda name: name != held):
            if set(differing_keys(arrays, self._bases[name])) <= set(keys):
                return name, name != held
        name = base_hash(arrays)
        self._bases[name] = arrays
        # Keep only bases some node holds or awaits: unchanged arrays are shared objects,
        # so each costs little more than its trainable arrays.
        kept = {name, *self._holders.values(), *self._pending.values()}
        self._bases = {key: base for key, base in self._bases.items() if key in kept}
        return name, True

    def _confirm_base(self, msg: Message) -> None:
        """A reply says whether its node now holds the base it was sent, or lost it."""
        node = msg.metadata.src_node_id
        if msg.has_error():
            # The node may have lost its stored base: send it again next time.
            self._holders.pop(node, None)
            self._pending.pop(node, None)
        elif node in self._pending:
            self._holders[node] = self._pending.pop(node)

    def _decode_update(self, arrays: ArrayRecord) -> list[np.ndarray] | str:
        """The reply's arrays in the order sent, or why they are malformed."""
        reference = self._sent_train
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
        arrays = array_records[self.arrayrecord_key]
        if self.compression != "none":
            compression = msg.content.config_records.get(RECORD)
            if compression is None:
                return f"missing the '{RECORD}' record ({self.compression} was sent)"
            try:
                arrays = decode(arrays, compression, reference=self._sent_train)
            except Exception as err:  # corrupt bytes can fail in many ways
                return f"compressed arrays cannot be decoded ({err})"
            error = metrics.get(UPLOAD_ERROR)
            if isinstance(error, float | int) and math.isfinite(error):
                self._upload_errors.append(float(error))
        update = self._decode_update(arrays)
        if isinstance(update, str):
            return update
        return metrics, update

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the valid replies' arrays by ``num-examples``; reject the rest."""
        total = 0.0
        summed: list[np.ndarray] | None = None
        metric_records: list[RecordDict] = []
        rejected = 0
        for msg in replies:
            self._confirm_base(msg)
            if msg.has_content():
                self._round["bytes_received"] = self._round.get("bytes_received", 0) + sum(
                    record.count_bytes() for record in msg.content.array_records.values()
                )
            checked = self._check_train_reply(msg)
            if isinstance(checked, str):
                rejected += 1
                log(
                    WARNING,
                    "Round %d: rejected reply from node %d: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    checked,
                )
                continue
            metrics, update = checked
            weight = float(metrics[self.weighted_by_key])
            # Sum in float64: float32 products would lose digits to cancellation.
            if summed is None:
                summed = [weight * u.astype(np.float64) for u in update]
            else:
                for acc, u in zip(summed, update, strict=True):
                    acc += weight * u.astype(np.float64)
            total += weight
            metric_records.append(
                RecordDict({"metrics": _trimmed(metrics, TRAIN_METRICS, self.weighted_by_key)})
            )

        accepted = len(metric_records)
        self._round.update(train_replies=accepted, rejected_replies=rejected)
        if summed is None or accepted < self.min_train_nodes:
            log(
                WARNING,
                "Round %d: %d valid replies (minimum %d); keeping the previous global model",
                server_round,
                accepted,
                self.min_train_nodes,
            )
            self._round["model_updated"] = False
            return None, None
        averaged = {
            key: Array((acc / total).astype(expected.dtype))
            for (key, expected), acc in zip(self._sent_train.items(), summed, strict=True)
        }
        # Arrays that did not travel stay the very same objects (bases share them).
        new_global = ArrayRecord(
            {key: averaged.get(key, array) for key, array in self.global_arrays.items()}
        )
        train_metrics = self.train_metrics_aggr_fn(metric_records, self.weighted_by_key)
        if self._upload_errors:
            self._round["upload_error"] = float(np.mean(self._upload_errors))
        self._round["model_updated"] = True
        self._round.update({k: float(v) for k, v in train_metrics.items()})
        return new_global, train_metrics

    # ---- evaluate ------------------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes for federated evaluation of the global model."""
        sampled = super().configure_evaluate(server_round, arrays, config, grid)
        phase = self.schedule.train_config(server_round)["phase"]
        return self._address(sampled, arrays, phase)[0]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Average the valid evaluation replies' metrics by ``num-examples``."""
        valid: list[RecordDict] = []
        for msg in replies:
            self._confirm_base(msg)
            metrics = _only_metrics(msg)
            if not isinstance(metrics, str):
                metrics = _metric_problem(metrics, EVAL_METRICS, self.weighted_by_key) or metrics
            if isinstance(metrics, str):
                log(
                    WARNING,
                    "Round %d: ignored evaluation reply from node %d: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    metrics,
                )
                continue
            valid.append(
                RecordDict({"metrics": _trimmed(metrics, EVAL_METRICS, self.weighted_by_key)})
            )
        self._round["eval_replies"] = len(valid)
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
        """Run FedAvg, recording every round and saving the best and final models."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_info["num_rounds"] = num_rounds
        latest = {"arrays": initial_arrays}

        def evaluate_and_record(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            # FedAvg.start calls this once before round 1 and at the end of every round.
            latest["arrays"] = arrays
            server_metrics = evaluate_fn(server_round, arrays) if evaluate_fn else None
            self._end_round(server_round, arrays, server_metrics)
            return server_metrics

        status = "failed"
        try:
            result = super().start(
                grid,
                initial_arrays,
                num_rounds=num_rounds,
                timeout=timeout,
                train_config=train_config,
                evaluate_config=evaluate_config,
                evaluate_fn=evaluate_and_record,
            )
            self._save(latest["arrays"], "final.keras")
            status = "completed"
        finally:
            self._write_metrics(status)
        return result

    def _end_round(
        self, server_round: int, arrays: ArrayRecord, server_metrics: MetricRecord | None
    ) -> None:
        record = self._round if server_round > 0 else {"round": 0}
        if server_round > 0:
            record["round_time"] = time.perf_counter() - self._round_start
        if server_metrics is not None:
            record.update({f"server_{k}": float(v) for k, v in server_metrics.items()})
        self.rounds.append(record)
        self._round = {}
        accuracy = record.get("server_accuracy")
        is_best = accuracy is not None and accuracy > self.best_accuracy
        if is_best:
            self.best_accuracy = accuracy
            self.run_info["best"] = {"round": server_round, "server_accuracy": accuracy}
            self._save(arrays, "best.keras")
        self._write_metrics("running")
        if self.on_round_end is not None:
            self.on_round_end(record)
        log(INFO, "Round %d summary: %s", server_round, _summary(record, is_best))

    def _save(self, arrays: ArrayRecord, name: str) -> None:
        # Write then rename, so an interrupted save never leaves a broken file.
        final = self.run_dir / name
        partial = final.with_name(f".{final.stem}.partial{final.suffix}")
        self.save_model(arrays, partial)
        os.replace(partial, final)

    def _write_metrics(self, status: str) -> None:
        content = {"status": status, **self.run_info, "rounds": self.rounds}
        final = self.run_dir / "metrics.json"
        partial = final.with_name(".metrics.json.partial")
        partial.write_text(json.dumps(content, indent=2))
        os.replace(partial, final)


def _trimmed(metrics: MetricRecord, keys: Iterable[str], weight_key: str) -> MetricRecord:
    """Only the metrics we aggregate, so extra client metrics cannot break averaging."""
    return MetricRecord({k: metrics[k] for k in (weight_key, *keys)})


def _summary(record: Mapping[str, Any], is_best: bool) -> str:
    parts = []
    for key, label in (
        ("train_accuracy", "train acc"),
        ("eval_accuracy", "val acc"),
        ("server_accuracy", "server acc"),
    ):
        if key in record:
            parts.append(f"{label} {record[key]:.4f}")
    if is_best:
        parts.append("new best")
    if "round_time" in record:
        parts.append(f"{record['round_time']:.1f} s")
    if "bytes_sent" in record:
        sent, received = record["bytes_sent"] / 1e6, record["bytes_received"] / 1e6
        parts.append(f"sent {sent:.1f} MB, received {received:.1f} MB")
    if record.get("rejected_replies"):
        parts.append(f"{record['rejected_replies']} replies rejected")
    return " | ".join(parts) or "no metrics"
