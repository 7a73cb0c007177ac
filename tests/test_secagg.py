"""Secure aggregation with Flower's SecAgg+: the server learns only the weighted mean.

The config refusals and the node's own checks run in-process; two `flwr run`
simulations compare a SecAgg+ run with the plain one, and a third, under client-level
DP, has one node crash while it trains, one upload a masked vector of the wrong shape,
and one train into NaN.
"""

from __future__ import annotations

import json
from pathlib import Path

import adversary
import numpy as np
import pytest
from conftest import TINY, log_lines
from flwr.app import Array, ArrayRecord

from fl_app import privacy
from fl_app.config import RunConfig, defaults
from fl_app.model.classifier import build_model
from fl_app.run_folder import load_checkpoint
from fl_app.secagg import SecAggPlusRound, checked_update

NODES = 4
BASE = {
    **TINY,
    "num-server-rounds": 2,
    "head-rounds": 2,
    "max-examples-per-node": 64,
    "min-train-nodes": NODES,
    "min-available-nodes": NODES,
    "fraction-evaluate": 0.0,
}
SECURE = {
    "secure-aggregation": "secagg+",
    # Each node trains on 58 examples: a max weight close to it keeps the weights precise.
    "secagg-max-weight": 64.0,
}
# ResNet50's head: Dense 2048 -> 128 and 128 -> 10, what travels in the head phase.
HEAD_PARAMETERS = 2048 * 128 + 128 + 128 * 10 + 10


def parse(**values) -> RunConfig:
    return RunConfig.parse({**defaults(), **values}, check_files=False)


@pytest.mark.parametrize(
    "values,expected",
    [
        (
            {"compression": "int8"},
            "compression='int8' is not allowed with secure-aggregation='secagg+': expected 'none'",
        ),
        (
            {"aggregation": "median"},
            "aggregation='median' is not allowed with secure-aggregation='secagg+': "
            "expected 'mean'",
        ),
        ({"dp": "server"}, "dp='server' is not allowed with secure-aggregation='secagg+'"),
        (
            {"secagg-num-shares": 5, "secagg-threshold": 5},
            "secagg-threshold=5 is not allowed with secagg-num-shares=5",
        ),
        (
            {"dp": "client", "dp-clip": 2.0, "secagg-clipping-range": 1.0},
            "secagg-clipping-range=1 is not allowed with dp-clip=2: expected at least dp-clip",
        ),
        ({"secagg-num-shares": 2}, "secagg-num-shares=2 is not allowed: expected 0"),
        ({"secure-aggregation": "secagg"}, "secure-aggregation='secagg' is not allowed"),
    ],
)
def test_combinations_that_cannot_work_are_refused_in_one_line(values, expected):
    with pytest.raises(ValueError) as refused:
        parse(**{"secure-aggregation": "secagg+", **values})
    assert expected in str(refused.value) and "\n" not in str(refused.value)


def test_the_defaults_and_client_dp_are_accepted():
    assert parse(**{"secure-aggregation": "secagg+"}).secure_aggregation == "secagg+"
    config = parse(**{"secure-aggregation": "secagg+", "dp": "client", "dp-clip": 1.0})
    assert SecAggPlusRound(config).bound == 1.0  # the DP clip bounds the update
    assert SecAggPlusRound(parse(**{"secure-aggregation": "secagg+"})).bound == 8.0


def test_a_threshold_above_the_sampled_nodes_fails_the_round_in_one_line():
    secure = SecAggPlusRound(parse(**{"secure-aggregation": "secagg+", "secagg-threshold": 3}))
    secure.check_sampled(3)
    with pytest.raises(ValueError, match="secagg-threshold=3 is more than the 2 nodes sampled"):
        secure.check_sampled(2)


def _record(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({key: Array(value) for key, value in arrays.items()})


def test_the_node_refuses_to_send_an_update_it_cannot_vouch_for():
    received = _record(kernel=np.zeros((2, 3), np.float32), bias=np.zeros(3, np.float32))
    trained = _record(kernel=np.ones((2, 3), np.float32), bias=np.full(3, 2, np.float32))
    update = checked_update(received, trained)
    np.testing.assert_array_equal(update[0], np.ones((2, 3)))
    np.testing.assert_array_equal(update[1], np.full(3, 2.0))
    nan = _record(kernel=np.full((2, 3), np.nan, np.float32), bias=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="array 'kernel' contains NaN or Inf: not sent"):
        checked_update(received, nan)
    wrong = _record(kernel=np.zeros((3, 2), np.float32), bias=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"array 'kernel' is \[3, 2\], not \[2, 3\]: not sent"):
        checked_update(received, wrong)
    renamed = _record(weights=np.zeros((2, 3), np.float32), bias=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="keys differ"):
        checked_update(received, renamed)


# ---- end to end --------------------------------------------------------------


def _finished(run) -> list[dict]:
    assert run.status == "finished:completed", run.details + run.log[-3000:]
    return json.loads((run.run_dir / "metrics.json").read_text())["rounds"][1:]


def _weights(run_dir: Path) -> dict[str, np.ndarray]:
    """The global arrays the server ended with (its last checkpoint), by key."""
    return {key: array.numpy() for key, array in load_checkpoint(run_dir).arrays.items()}


@pytest.mark.e2e
def test_the_secagg_global_model_is_the_plain_one_within_the_quantisation(superlink, tmp_path):
    # One round: the aggregate itself. Later rounds would train on, and ResNet50 from random
    # weights amplifies a difference of 1e-6 to 1e-2 within a round. Both runs start from
    # one weights file: a random start is not always the same in two server processes.
    start = tmp_path / "start.weights.h5"
    build_model(10, (28, 28, 1), BASE["input-size"], None, "resnet50").save_weights(start)
    config = {**BASE, "num-server-rounds": 1, "head-rounds": 1, "weights": str(start)}
    plain = superlink.run(tmp_path / "plain", config, num_supernodes=NODES)
    secure = superlink.run(tmp_path / "secagg", {**config, **SECURE}, num_supernodes=NODES)
    plain_rounds, secure_rounds = _finished(plain), _finished(secure)

    for p, s in zip(plain_rounds, secure_rounds, strict=True):
        assert s["model_updated"] and s["train_replies"] == NODES
        assert s["secagg_dropped"] == 0 and s["secagg_clipped"] == 0
        # Masked uploads are int64: twice the bytes of the plain float32 replies.
        ratio = s["bytes_received"] / p["bytes_received"]
        assert 1.9 < ratio < 2.5, ratio
        assert s["bytes_received"] >= 8 * HEAD_PARAMETERS * NODES
    assert log_lines(secure.log, r"Secure aggregation: SecAgg\+, updates clipped to L2 8")

    a, b = _weights(plain.run_dir), _weights(secure.run_dir)
    assert a.keys() == b.keys()
    difference = np.concatenate([(a[key] - b[key]).ravel() for key in a])
    rms = float(np.sqrt(np.mean(difference**2)))
    largest = float(np.abs(difference).max())
    print(f"\n[secagg] difference to plain FedAvg: RMS {rms:.3g}, max {largest:.3g}")
    # Each node's weighted update is quantised in steps of 2 x 8 / 2^22 (its weight
    # 58/64 in steps of 1 / 2^22): the mean is within a few steps, coordinate by coordinate.
    step = 2 * 8.0 / 2**22
    assert largest < 4 * step
    assert rms < step


@pytest.mark.e2e
def test_under_client_dp_three_faulty_nodes_drop_out_and_the_others_noised_sum_stays(
    superlink, tmp_path
):
    nodes, z, clip, delta = 6, 1.0, 0.5, 1e-5
    config = {
        **BASE,
        **SECURE,
        "num-server-rounds": 1,
        "min-train-nodes": 3,
        "min-available-nodes": nodes,
        # Three of six drop out: each node keeps three neighbours, enough to unmask.
        "secagg-threshold": 3,
        # Clip on the node, mask, noise on the server: ε as without secure aggregation.
        "dp": "client",
        "dp-clip": clip,
        "dp-noise-multiplier": z,
        "dp-delta": delta,
    }
    app = adversary.write_app(tmp_path / "app", Path(__file__).with_name("secagg_faults.py"))
    run = superlink.run(tmp_path / "run", config, num_supernodes=nodes, app_dir=app)
    (record,) = _finished(run)
    assert record["model_updated"] and record["train_replies"] == 3
    assert record["secagg_dropped"] == 3
    assert record["dp_epsilon"] == pytest.approx(privacy.epsilon(z, 1, delta))
    # The noise is calibrated to the nodes sampled, whoever drops out.
    assert record["dp_noise_std"] == pytest.approx(z * clip / nodes)
    assert log_lines(
        run.log, r"Secure aggregation: SecAgg\+, updates clipped to L2 0.5 .*max weight 1,"
    )
    faulty = {
        int(partition): int(node)
        for partition, node in (
            line.split("Faulty partition ")[1].split(" is node ")
            for line in log_lines(run.log, r"Faulty partition \d+ is node \d+")
        )
    }
    assert set(faulty) == {0, 1, 2}
    assert log_lines(
        run.log, rf"Round 1: node {faulty[0]} left SecAgg\+: .*injected failure during training"
    )
    assert log_lines(
        run.log,
        rf"Round 1: node {faulty[1]} left SecAgg\+: masked array 4 is \(9,\), expected \(10,\)",
    )
    # The node's own check: it sends nothing rather than NaN the server could not see.
    assert log_lines(
        run.log, rf"Round 1: node {faulty[2]} left SecAgg\+: .*contains NaN or Inf: not sent"
    )
