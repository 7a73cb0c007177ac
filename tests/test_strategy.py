"""TransferFedAvg: weighted averaging, reply validation, schedule, run records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from helpers import message_metadata

from fl_app.run_folder import RunFolder
from fl_app.schedule import FINE_TUNE, HEAD, TransferSchedule
from fl_app.strategy import TransferFedAvg
from fl_app.wire.exchange import ServerExchange

SHAPES = {"dense/kernel": (6, 4), "dense/bias": (4,), "bn/moving_mean": (4,)}


def _metadata(node_id: int) -> Metadata:
    return message_metadata(node_id, 0)


def _arrays(rng: np.random.Generator, shapes=SHAPES) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _reply(node_id: int, arrays: dict[str, np.ndarray] | ArrayRecord, num_examples=10, **extra):
    record = (
        arrays
        if isinstance(arrays, ArrayRecord)
        else ArrayRecord({k: Array(v) for k, v in arrays.items()})
    )
    metrics = {
        "num-examples": num_examples,
        "train_loss": 1.0,
        "train_accuracy": 0.5,
        "train_time": 0.1,
        "client_time": 0.2,
        **extra,
    }
    metrics = {k: v for k, v in metrics.items() if v is not None}
    return Message(
        RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}),
        metadata=_metadata(node_id),
    )


def _strategy(tmp_path, min_train_nodes: int = 1) -> TransferFedAvg:
    strategy = TransferFedAvg(
        schedule=TransferSchedule(2, 1e-3, 1e-4, 32),
        folder=RunFolder(tmp_path, lambda arrays, path: path.write_bytes(b"model")),
        wire=ServerExchange("full", "none", {}),
        min_train_nodes=min_train_nodes,
    )
    # What configure_train would have sent: every array, uncompressed.
    strategy.global_arrays = ArrayRecord(
        {k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()}
    )
    strategy.wire.start_round()
    strategy.wire.sent = strategy.global_arrays
    return strategy


def test_weighted_average_matches_float64_mean_and_stock_fedavg(tmp_path):
    rng = np.random.default_rng(0)
    updates = [_arrays(rng) for _ in range(4)]
    counts = [17, 3, 250, 64]
    replies = [_reply(i + 1, u, n) for i, (u, n) in enumerate(zip(updates, counts, strict=True))]

    ours, metrics = _strategy(tmp_path).aggregate_train(1, replies)
    stock, stock_metrics = FedAvg().aggregate_train(1, replies)

    assert ours is not None and stock is not None
    w = np.asarray(counts, np.float64) / sum(counts)
    for key in SHAPES:
        expected = sum(wi * u[key].astype(np.float64) for wi, u in zip(w, updates, strict=True))
        got = ours[key].numpy()
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got, stock[key].numpy(), rtol=1e-6, atol=1e-7)
    assert dict(metrics) == pytest.approx(dict(stock_metrics))


MALFORMED = {
    "nan": lambda rng: _reply(21, {**_arrays(rng), "dense/bias": np.full(4, np.nan, np.float32)}),
    "inf": lambda rng: _reply(
        22, {**_arrays(rng), "dense/kernel": np.full((6, 4), np.inf, np.float32)}
    ),
    "wrong shape": lambda rng: _reply(
        23, {**_arrays(rng), "dense/kernel": np.ones((4, 6), np.float32)}
    ),
    "wrong dtype": lambda rng: _reply(24, {**_arrays(rng), "dense/bias": np.ones(4, np.float64)}),
    "missing array": lambda rng: _reply(
        25, {k: v for k, v in _arrays(rng).items() if k != "dense/bias"}
    ),
    "extra array": lambda rng: _reply(26, {**_arrays(rng), "other": np.ones(2, np.float32)}),
    "missing num-examples": lambda rng: _reply(27, _arrays(rng), None),
    "zero num-examples": lambda rng: _reply(28, _arrays(rng), 0),
    "negative num-examples": lambda rng: _reply(29, _arrays(rng), -5),
    "nan loss": lambda rng: _reply(30, _arrays(rng), train_loss=float("nan")),
    "client error": lambda rng: Message(
        Error(code=1, reason="out of memory"), metadata=_metadata(31)
    ),
    "corrupt bytes": lambda rng: _reply(
        32,
        ArrayRecord(
            {
                **{k: Array(v) for k, v in _arrays(rng).items() if k != "dense/bias"},
                "dense/bias": Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=b"xx"),
            }
        ),
    ),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_reply_is_rejected_and_the_rest_aggregated(tmp_path, flwr_warnings, kind):
    rng = np.random.default_rng(1)
    good = [_arrays(rng), _arrays(rng)]
    bad = MALFORMED[kind](rng)
    replies = [_reply(1, good[0], 10), bad, _reply(2, good[1], 30)]

    strategy = _strategy(tmp_path)
    arrays, _ = strategy.aggregate_train(3, replies)

    assert arrays is not None
    for key in SHAPES:
        expected = np.average(
            np.stack([good[0][key], good[1][key]]).astype(np.float64), axis=0, weights=[10, 30]
        )
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6)
    lines = [r.getMessage() for r in flwr_warnings]
    node = bad.metadata.src_node_id
    assert len(lines) == 1 and f"rejected reply from node {node}:" in lines[0], lines
    assert strategy.record.entries()["rejected_replies"] == 1


def test_too_few_valid_replies_keep_the_previous_model(tmp_path, flwr_warnings):
    rng = np.random.default_rng(2)
    strategy = _strategy(tmp_path, min_train_nodes=2)
    replies = [_reply(1, _arrays(rng)), MALFORMED["nan"](rng)]

    assert strategy.aggregate_train(1, replies) == (None, None)
    assert any("keeping the previous global model" in r.getMessage() for r in flwr_warnings)


def test_evaluate_replies_are_validated(tmp_path, flwr_warnings):
    def reply(node, **metrics):
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), metadata=_metadata(node))

    replies = [
        reply(1, **{"num-examples": 10, "eval_loss": 1.0, "eval_accuracy": 0.2}),
        reply(2, **{"num-examples": 30, "eval_loss": 2.0, "eval_accuracy": 0.6, "extra": 1.0}),
        reply(3, **{"num-examples": 30, "eval_loss": float("nan"), "eval_accuracy": 0.6}),
        reply(4, **{"eval_loss": 1.0, "eval_accuracy": 0.6}),
    ]
    metrics = _strategy(tmp_path).aggregate_evaluate(1, replies)
    assert dict(metrics) == pytest.approx({"eval_loss": 1.75, "eval_accuracy": 0.5})
    nodes = sorted(int(r.getMessage().split("node ")[1].split(":")[0]) for r in flwr_warnings)
    assert nodes == [3, 4]


def test_personalised_accuracy_is_averaged_when_every_node_reports_it(tmp_path):
    def reply(node, personal, **metrics):
        if personal is not None:
            metrics |= {"personalized_loss": 0.5, "personalized_accuracy": personal}
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), metadata=_metadata(node))

    base = {"eval_loss": 1.0, "eval_accuracy": 0.5}
    both = [
        reply(1, 0.9, **{"num-examples": 10}, **base),
        reply(2, 0.7, **{"num-examples": 30}, **base),
    ]
    metrics = _strategy(tmp_path).aggregate_evaluate(1, both)
    assert dict(metrics) == pytest.approx(
        {**base, "personalized_loss": 0.5, "personalized_accuracy": 0.75}
    )
    # A node without them (another version, or personalize-epochs unset there): none at all.
    mixed = [both[0], reply(2, None, **{"num-examples": 30}, **base)]
    assert dict(_strategy(tmp_path).aggregate_evaluate(1, mixed)) == pytest.approx(base)


def test_schedule_switches_phase_and_learning_rate():
    schedule = TransferSchedule(
        head_rounds=2, learning_rate=1e-3, fine_tune_learning_rate=1e-5, fine_tune_layers=32
    )
    phases = [schedule.train_config(r)["phase"] for r in (1, 2, 3, 4)]
    rates = [schedule.train_config(r)["learning-rate"] for r in (1, 2, 3, 4)]
    assert phases == [HEAD, HEAD, FINE_TUNE, FINE_TUNE]
    assert rates == [1e-3, 1e-3, 1e-5, 1e-5]
    # Nothing to unfreeze means the head trains throughout.
    assert TransferSchedule(0, 1e-3, 1e-5, 0).train_config(5)["phase"] == HEAD


def test_round_records_and_best_checkpoint(tmp_path):
    strategy = _strategy(tmp_path)
    arrays = strategy.global_arrays
    for server_round, accuracy in ((0, 0.1), (1, 0.5), (2, 0.4)):
        strategy._end_round(server_round, arrays, MetricRecord({"accuracy": accuracy, "loss": 1.0}))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["status"] == "running"
    assert [r["server_accuracy"] for r in saved["rounds"]] == [0.1, 0.5, 0.4]
    assert saved["best"] == {"round": 1, "server_accuracy": 0.5}
    assert (tmp_path / "best.keras").read_bytes() == b"model"
    assert not list(tmp_path.glob(".*partial*"))


def test_replies_name_the_node_they_answer_for_and_silent_nodes_are_counted(
    tmp_path, flwr_warnings
):
    strategy = _strategy(tmp_path)
    strategy.wire._holders = {7: "base", 8: "base", 9: "base"}
    # What configure_train sent; the grid gave each message its id when it pushed it.
    strategy._sent = [
        Message(RecordDict(), metadata=message_metadata(0, node)) for node in (7, 8, 9)
    ]
    # The SuperLink answers for an unreachable node itself, from its own id (1 here).
    unavailable = Message(
        Error(code=3, reason="node unavailable"),
        metadata=_metadata(1),
    )
    unavailable.metadata.__dict__["_reply_to_message_id"] = "0-7"
    good = _reply(8, _arrays(np.random.default_rng(0)))
    good.metadata.__dict__["_reply_to_message_id"] = "0-8"

    arrays, _ = strategy.aggregate_train(4, [unavailable, good])

    assert arrays is not None
    lines = [r.getMessage() for r in flwr_warnings]
    assert any("rejected reply from node 7: client error 3" in line for line in lines), lines
    assert any("no reply from node(s) 9 within round-timeout" in line for line in lines), lines
    record = strategy.record.entries()
    assert record["missing_replies"] == 1 and record["rejected_replies"] == 1
    # Nodes 7 and 9 may have lost what they were sent: their bases go again.
    assert strategy.wire.held() == {8: "base"}
