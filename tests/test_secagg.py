"""Secure aggregation with Flower's SecAgg+: the server learns only the weighted mean.

The config refusals, the node's own checks, its refusal of a stage message that comes
after its round, and the server's check of the unmasked mean run in-process. Two `flwr
run` simulations compare a SecAgg+ run (each node with two of three others as
neighbours) with the plain one; a third, under client-level DP, has one node crash while
it trains, one upload a masked vector of the wrong shape, and one train into NaN. A run
resumed under SecAgg+ is in the slow tier; tests/test_deployment.py runs SecAgg+ on
real SuperNodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import adversary
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitRes, Parameters, Status
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from helpers import TINY, log_lines, message_metadata, strategy_in_round, train_metrics

from fl_app import privacy
from fl_app.config import RunConfig, defaults
from fl_app.model.classifier import build_model
from fl_app.run_folder import load_checkpoint
from fl_app.secagg import CLIPPED, ROUND_RECORD
from fl_app.secagg.node import checked_update, secagg_mod, secure_weight
from fl_app.secagg.protocol import SecAggPlusRound, SecureResult
from fl_app.strategy import TransferFedAvg

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
        (
            {"secagg-num-shares": 4},
            "secagg-num-shares=4 is not allowed: expected 0 (all sampled nodes) or an odd integer",
        ),
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
    with pytest.raises(ValueError, match="needs at least 2 nodes a round, 1 was sampled"):
        SecAggPlusRound(parse(**{"secure-aggregation": "secagg+"})).check_sampled(1)


def test_a_node_with_more_examples_than_the_max_weight_refuses_to_send():
    config = parse(**{"secure-aggregation": "secagg+", "secagg-max-weight": 64.0})
    assert secure_weight(config, 64) == 64
    with pytest.raises(ValueError, match="num-examples 65 > secagg-max-weight=64: not sent"):
        secure_weight(config, 65)
    # Under client-level DP every node weighs 1, whatever its examples.
    assert secure_weight(parse(**{"secure-aggregation": "secagg+", "dp": "client"}), 10**6) == 1


def _stage(stage: str, server_round: int | None, **configs) -> Message:
    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage, **configs})})
    if server_round is not None:
        content[ROUND_RECORD] = ConfigRecord({"round": server_round})
    return Message(content, metadata=message_metadata(0, 7))


def _setup(server_round: int) -> Message:
    return _stage(
        Stage.SETUP,
        server_round,
        **{
            Key.SAMPLE_NUMBER: 3,
            Key.SHARE_NUMBER: 3,
            Key.THRESHOLD: 2,
            Key.CLIPPING_RANGE: 8.0,
            Key.TARGET_RANGE: 2**22,
            Key.MOD_RANGE: 2**32,
            Key.MAX_WEIGHT: 64.0,
        },
    )


def test_a_stage_message_that_comes_after_its_round_is_refused_and_the_node_state_kept():
    context = Context(1, 7, {}, RecordDict(), defaults())

    def train(msg, ctx):
        raise AssertionError("a stage message reached training")

    def protocol_state() -> dict:
        return dict(context.state.config_records[RECORD_KEY_STATE])

    reply = secagg_mod(_setup(3), context, train)  # Flower's mod: the node's public keys
    assert Key.PUBLIC_KEY_1 in reply.content.config_records[RECORD_KEY_CONFIGS]
    in_round_3 = protocol_state()
    assert in_round_3["current_stage"] == Stage.SETUP

    # Round 2's messages after round 3 started on this node. Flower's mod would take the
    # setup (new keys: the node would drop out of round 3), train for the masked vector,
    # and answer an unmask message with shares of round 3's secrets.
    late_ones = (_setup(2), _stage(Stage.COLLECT_MASKED_VECTORS, 2), _stage(Stage.UNMASK, 2))
    for late in late_ones:
        with pytest.raises(ValueError, match="of round 2 arrived while this node is in round 3"):
            secagg_mod(late, context, train)
        assert protocol_state() == in_round_3
    with pytest.raises(ValueError, match="without fl_app's round record"):
        secagg_mod(_stage(Stage.SHARE_KEYS, None), context, train)
    assert protocol_state() == in_round_3

    # Round 3 goes on where it was; the next round's setup starts afresh.
    with pytest.raises(ValueError, match="Abort secure aggregation: expect share_keys stage"):
        secagg_mod(_stage(Stage.COLLECT_MASKED_VECTORS, 3), context, train)
    secagg_mod(_setup(4), context, train)
    assert protocol_state()["current_stage"] == Stage.SETUP
    assert context.state.config_records[ROUND_RECORD]["round"] == 4


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


def _secure_round(
    tmp_path: Path, mean: list[np.ndarray] | None, failure: str = ""
) -> tuple[TransferFedAvg, dict[str, np.ndarray], ArrayRecord | None]:
    """A round whose SecAgg+ run gave ``mean`` from three nodes; what the strategy makes of it."""
    rng = np.random.default_rng(0)
    sent = {"dense/kernel": rng.standard_normal((16, 8)).astype(np.float32)}
    sent["dense/bias"] = np.zeros(8, np.float32)
    secure = SecAggPlusRound(parse(**{"secure-aggregation": "secagg+"}))
    strategy = strategy_in_round(tmp_path, sent, [1, 2, 3], secure=secure)
    fitres = FitRes(Status(Code.OK, ""), Parameters([], ""), 50, {**train_metrics(50), CLIPPED: 1})
    replies = [(node, fitres) for node in (1, 2, 3)] if mean is not None else []
    dropped = {} if mean is not None else {1: "no reply", 2: "no reply", 3: "no reply"}
    strategy._secure_result = SecureResult(mean, replies, dropped, 4000, 300, failure)
    arrays, _ = strategy.aggregate_train(1, [])
    return strategy, sent, arrays


def test_a_sound_unmasked_mean_steps_the_model_and_is_counted(tmp_path):
    step = [np.full((16, 8), 0.01), np.full(8, -0.02)]
    strategy, sent, arrays = _secure_round(tmp_path, step)
    assert arrays is not None and list(arrays.keys()) == list(sent)
    for (key, before), delta in zip(sent.items(), step, strict=True):
        assert arrays[key].numpy().dtype == np.float32
        np.testing.assert_allclose(arrays[key].numpy(), before + delta, rtol=1e-6)
    record = strategy.record.entries()
    assert record["model_updated"] and record["train_replies"] == 3
    assert record["secagg_dropped"] == 0 and record["secagg_clipped"] == 3
    assert strategy.wire.stats["bytes_received"] == 4000


@pytest.mark.parametrize(
    "mean,failure,expected",
    [
        (
            [np.full((16, 8), np.nan), np.zeros(8)],
            "",
            "Round 1: the unmasked mean contains NaN or Inf; keeping the previous global model",
        ),
        (
            # One node that sent the clipping range everywhere, at a third of the weight.
            [np.full((16, 8), 8.0 / 3), np.full(8, 8.0 / 3)],
            "",
            "Round 1: the unmasked mean has L2 norm 31.1 > twice the nodes' clip bound 8; keeping",
        ),
        (
            [np.zeros((8, 16)), np.zeros(8)],
            "",
            "Round 1: the unmasked mean has shapes other than the round's arrays; keeping",
        ),
        (
            None,
            "SecAgg+ halted in stage 1: too few nodes left",
            "Round 1: SecAgg+ halted in stage 1: too few nodes left; keeping the previous global",
        ),
    ],
    ids=["nan", "too-large", "shape", "halted"],
)
def test_an_unmasked_mean_that_fails_its_check_keeps_the_previous_model(
    tmp_path, flwr_warnings, mean, failure, expected
):
    strategy, _, arrays = _secure_round(tmp_path, mean, failure)
    assert arrays is None and strategy.record.entries()["model_updated"] is False
    assert [r.getMessage() for r in flwr_warnings if expected in r.getMessage()], [
        r.getMessage() for r in flwr_warnings
    ]


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
    # Each node shares its secrets with two of the three others.
    shares = {"secagg-num-shares": 3, "secagg-threshold": 2}
    secure = superlink.run(
        tmp_path / "secagg", {**config, **SECURE, **shares}, num_supernodes=NODES
    )
    plain_rounds, secure_rounds = _finished(plain), _finished(secure)

    for p, s in zip(plain_rounds, secure_rounds, strict=True):
        assert s["model_updated"] and s["train_replies"] == NODES
        assert s["secagg_dropped"] == 0 and s["secagg_clipped"] == 0
        # Masked uploads are int64: twice the bytes of the plain float32 replies.
        ratio = s["bytes_received"] / p["bytes_received"]
        assert 1.9 < ratio < 2.5, ratio
        assert s["bytes_received"] >= 8 * HEAD_PARAMETERS * NODES
    assert log_lines(
        secure.log,
        r"Secure aggregation: SecAgg\+, updates clipped to L2 8 .* split into 3 shares, 2 of them",
    )

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
    assert log_lines(run.log, r"Round 1 summary: .*3 nodes left SecAgg\+")
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


@pytest.mark.e2e
@pytest.mark.slow
def test_a_run_resumed_under_secagg_goes_on_in_its_own_round_numbers(superlink, tmp_path):
    # The resumed run's first stage messages name round 2; its nodes start with no round.
    config = {**BASE, **SECURE, "num-server-rounds": 1, "head-rounds": 1}
    first = superlink.run(tmp_path / "first", config, num_supernodes=NODES)
    _finished(first)
    resumed = superlink.run(
        tmp_path / "resumed",
        {**config, "num-server-rounds": 2, "resume": str(first.run_dir)},
        num_supernodes=NODES,
    )
    assert resumed.status == "finished:completed", resumed.details + resumed.log[-3000:]
    assert f"Resuming {first.run_dir} after round 1 of 2" in resumed.log
    *_, record = _finished(first)  # a resumed run goes on writing its folder
    assert record["round"] == 2 and record["phase"] == "fine-tune" and record["model_updated"]
    assert record["train_replies"] == NODES and record["secagg_dropped"] == 0
