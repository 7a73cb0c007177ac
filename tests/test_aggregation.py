"""Robust aggregation: the rules, the norm screen and the cap on claimed examples.

Strategy-level tests give TransferFedAvg real replies (Flower Messages of real
arrays) from nine honest nodes and two bad ones: one that sends its model
times 10⁴, one that claims 10⁹ examples.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message
from helpers import strategy_in_round, train_reply

from fl_app import aggregation
from fl_app.aggregation import Combiner
from fl_app.strategy import TransferFedAvg

SHAPES = {"dense/kernel": (16, 8), "dense/bias": (8,)}
HONEST, SCALED, CLAIMS = 9, 10, 11  # node ids of the last honest node and the two bad ones


def test_rules_match_numpy_per_coordinate():
    rng = np.random.default_rng(0)
    updates = [[rng.standard_normal((3, 2)), rng.standard_normal(4)] for _ in range(7)]
    weights = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    stacked = [np.stack([u[i] for u in updates]) for i in range(2)]
    mean = aggregation.combine(updates, weights, "mean")
    median = aggregation.combine(updates, weights, "median")
    trimmed = aggregation.combine(updates, weights, "trimmed-mean", 0.2)
    for i in range(2):
        np.testing.assert_allclose(mean[i], np.average(stacked[i], axis=0, weights=weights))
        np.testing.assert_allclose(median[i], np.median(stacked[i], axis=0))
        # 7 updates, 20 % cut from each end: the lowest and the highest go.
        ordered = np.sort(stacked[i], axis=0)
        np.testing.assert_allclose(trimmed[i], ordered[1:-1].mean(axis=0))


def test_screen_and_cap_are_relative_to_the_median():
    assert aggregation.norm_outliers([1.0, 2.0, 3.0, 100.0], 5) == [False, False, False, True]
    assert aggregation.norm_outliers([1.0, 100.0], 0) == [False, False]
    assert aggregation.capped_weights([10, 20, 30, 1e9], 10) == [10, 20, 30, 250]
    assert aggregation.capped_weights([10, 1e9], 0) == [10, 1e9]


def _replies(rng: np.random.Generator, sent: dict[str, np.ndarray]) -> list[Message]:
    """Nine honest updates near +0.1, one model times 10⁴, one claim of 10⁹ examples.

    The claiming node's update is as large as an honest one, in the opposite
    direction: no norm screen can tell it from them.
    """
    replies = []
    for node in range(1, CLAIMS + 1):
        arrays = {k: v + 0.1 + 0.01 * rng.standard_normal(v.shape) for k, v in sent.items()}
        count = 1e9 if node == CLAIMS else 50
        if node == CLAIMS:
            arrays = {k: v - 0.1 for k, v in sent.items()}
        if node == SCALED:
            arrays = {k: v * 1e4 for k, v in arrays.items()}
        replies.append(train_reply(node, arrays, count))
    return replies


def _round(
    tmp_path, combiner: Combiner
) -> tuple[TransferFedAvg, dict[str, np.ndarray], ArrayRecord]:
    rng = np.random.default_rng(3)
    sent = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    strategy = strategy_in_round(tmp_path, sent, range(1, CLAIMS + 1), combiner=combiner)
    arrays, _ = strategy.aggregate_train(1, _replies(rng, sent))
    assert arrays is not None
    return strategy, sent, arrays


def _step(sent: dict[str, np.ndarray], arrays: ArrayRecord) -> float:
    """How far the global model moved, on average per coordinate (honest nodes: +0.1)."""
    return float(
        np.mean(np.concatenate([(arrays[k].numpy() - v).ravel() for k, v in sent.items()]))
    )


def test_a_plain_mean_is_taken_over_by_the_bad_nodes(tmp_path):
    _, sent, arrays = _round(tmp_path, Combiner())
    # The 10⁹ claim makes the global model that node's (step -0.1), not the honest +0.1.
    assert _step(sent, arrays) == pytest.approx(-0.1, abs=0.001)


@pytest.mark.parametrize(
    "combiner",
    [
        Combiner("median", max_examples_ratio=10),
        Combiner("trimmed-mean", 0.2, max_examples_ratio=10),
        Combiner(max_update_norm_ratio=5, max_examples_ratio=10),
    ],
    ids=["median", "trimmed-mean", "norm-screen"],
)
def test_robust_settings_keep_the_honest_step(tmp_path, flwr_warnings, combiner):
    strategy, sent, arrays = _round(tmp_path, combiner)
    step = _step(sent, arrays)
    if combiner.max_update_norm_ratio:
        # The scaled node is rejected in one line naming it; the capped claim weighs as
        # much as ten median nodes (500 of 950), no more.
        lines = [r.getMessage() for r in flwr_warnings]
        assert [line for line in lines if "rejected" in line] == [
            line for line in lines if f"rejected reply from node {SCALED}: update norm" in line
        ]
        assert strategy.record.entries()["rejected_replies"] == 1
        assert strategy.record.entries()["capped_claims"] == 1
        expected = (9 * 50 * 0.1 + 500 * -0.1) / 950
        assert step == pytest.approx(expected, abs=0.002)
    else:
        assert step == pytest.approx(0.1, abs=0.02)
        assert strategy.record.entries()["rejected_replies"] == 0
