"""Server optimisers: each rule equals Flower's own strategy on the same replies, round by round.

Flower's FedAvgM, FedAdam, FedYogi and FedAdagrad average the replies themselves;
TransferFedAvg combines them (here: the weighted mean, no cap, no screen) and
hands the update to `ServerOptimizer`. Two rounds each, from the same replies.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi
from helpers import strategy_in_round, train_reply

from fl_app.run_folder import load_checkpoint
from fl_app.server_opt import ServerOptimizer

SHAPES = {"dense/kernel": (12, 6), "dense/bias": (6,)}
NODES = (3, 5, 8)
FLOWER = {
    "fedavgm": lambda: FedAvgM(server_learning_rate=0.7, server_momentum=0.9),
    "fedadam": lambda: FedAdam(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-3),
    "fedyogi": lambda: FedYogi(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-3),
    "fedadagrad": lambda: FedAdagrad(eta=0.05, tau=1e-3),
}
OURS = {
    "fedavgm": lambda: ServerOptimizer("fedavgm", 0.7, momentum=0.9),
    "fedadam": lambda: ServerOptimizer("fedadam", 0.05, beta_1=0.8, beta_2=0.95, tau=1e-3),
    "fedyogi": lambda: ServerOptimizer("fedyogi", 0.05, beta_1=0.8, beta_2=0.95, tau=1e-3),
    "fedadagrad": lambda: ServerOptimizer("fedadagrad", 0.05, tau=1e-3),
}


def _replies(rng, current: dict[str, np.ndarray]):
    counts = {3: 40, 5: 10, 8: 25}
    return [
        train_reply(
            node,
            {k: v + 0.05 * rng.standard_normal(v.shape) + 0.01 for k, v in current.items()},
            counts[node],
        )
        for node in NODES
    ]


@pytest.mark.parametrize("rule", sorted(FLOWER))
def test_each_rule_equals_flowers_strategy_for_two_rounds(tmp_path, rule):
    rng = np.random.default_rng(0)
    current = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    flower = FLOWER[rule]()
    optimizer = OURS[rule]()
    for server_round in (1, 2):
        replies = _replies(rng, current)
        # What configure_train would have kept: the arrays this round sent.
        if rule == "fedavgm":
            flower.current_arrays = flower.current_arrays or ArrayRecord(
                {k: Array(v) for k, v in current.items()}
            )
        else:
            flower.current_arrays = {k: v.copy() for k, v in current.items()}
        expected, _ = flower.aggregate_train(server_round, replies)
        ours = strategy_in_round(
            tmp_path / str(server_round),
            current,
            NODES,
            server_optimizer=optimizer,
        )
        got, _ = ours.aggregate_train(server_round, replies)
        for key in SHAPES:
            np.testing.assert_allclose(
                got[key].numpy(), expected[key].numpy(), rtol=1e-5, atol=1e-6
            )
            assert got[key].numpy().dtype == np.float32
        step = max(np.abs(got[k].numpy() - current[k]).max() for k in SHAPES)
        assert step > 1e-4  # the rule moved the model
        current = {k: got[k].numpy() for k in SHAPES}


def test_fedavg_steps_by_the_update_and_keeps_no_state():
    optimizer = ServerOptimizer("fedavg")
    new = optimizer.step(1, {"w": np.ones(3)}, {"w": np.full(3, 0.5)})
    np.testing.assert_array_equal(new["w"], np.full(3, 1.5))
    assert optimizer.state() == {}


def test_moments_start_when_an_array_first_travels_and_survive_a_checkpoint(tmp_path):
    optimizer = ServerOptimizer("fedadam", 0.1)
    optimizer.step(1, {"head": np.zeros(2)}, {"head": np.ones(2)})
    # The fine-tune phase sends conv5 too: its moments start then, the head's go on.
    optimizer.step(
        2, {"head": np.zeros(2), "conv5": np.zeros(3)}, {"head": np.ones(2), "conv5": np.ones(3)}
    )
    assert set(optimizer.state()) == {"first/head", "second/head", "first/conv5", "second/conv5"}
    # m after two updates of 1: 0.1, then 0.9 * 0.1 + 0.1.
    np.testing.assert_allclose(optimizer.first["head"], 0.19)
    np.testing.assert_allclose(optimizer.first["conv5"], 0.1)
    # What a checkpoint keeps, a resumed optimiser takes up: the next steps are the same.
    rng = np.random.default_rng(1)
    sent = {"dense/kernel": rng.standard_normal((4, 2)).astype(np.float32)}
    strategy = strategy_in_round(tmp_path, sent, NODES, server_optimizer=optimizer)
    strategy.aggregate_train(3, _replies(rng, sent))
    strategy._end_round(3, strategy.global_arrays, None)
    resumed = ServerOptimizer("fedadam", 0.1)
    resumed.load_state(load_checkpoint(tmp_path).state_arrays)
    for name, value in optimizer.state().items():
        np.testing.assert_array_equal(resumed.state()[name], value)
    update = {"head": np.full(2, 0.3)}
    np.testing.assert_array_equal(
        resumed.step(4, {"head": np.zeros(2)}, update)["head"],
        optimizer.step(4, {"head": np.zeros(2)}, update)["head"],
    )
