"""Client-level DP: the clipping bound, the noise's standard deviation, ε, the budget.

ε is checked against a computation that shares nothing with fl_app's: the
Gaussian mechanism's Rényi DP in closed form, order / (2 z²) per round, turned into
(ε, δ) by dp-accounting's conversion.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from helpers import message_metadata, strategy_in_round, train_reply

from fl_app import privacy
from fl_app.config import RunConfig, defaults
from fl_app.privacy import BudgetSpentError
from fl_app.run_folder import load_checkpoint

SHAPES = {"dense/kernel": (64, 32), "dense/bias": (32,)}


def closed_form_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    orders = np.concatenate([np.linspace(1.01, 10, 300), np.arange(11, 512)])
    rdp = rounds * orders / (2 * noise_multiplier**2)
    return rdp_privacy_accountant.compute_epsilon(orders, rdp, delta)[0]


@pytest.mark.parametrize(
    "noise_multiplier,rounds,delta", [(0.8, 5, 1e-5), (1.1, 30, 1e-5), (4.0, 100, 1e-6)]
)
def test_epsilon_equals_an_independent_computation(noise_multiplier, rounds, delta):
    ours = privacy.epsilon(noise_multiplier, rounds, delta)
    assert ours == pytest.approx(closed_form_epsilon(noise_multiplier, rounds, delta), rel=1e-3)
    assert privacy.epsilon(noise_multiplier, 0, delta) == 0


def test_noise_multiplier_for_a_target_is_the_smallest_that_keeps_it():
    z = privacy.noise_multiplier_for(3.0, 20, 1e-5)
    assert privacy.epsilon(z, 20, 1e-5) <= 3.0 < privacy.epsilon(z * 0.99, 20, 1e-5)
    with pytest.raises(ValueError, match="needs a noise multiplier above"):
        privacy.noise_multiplier_for(1e-6, 1000, 1e-9)


def test_clipping_bounds_the_norm_and_keeps_small_updates():
    rng = np.random.default_rng(0)
    big = [rng.standard_normal((50, 4)) * 10, rng.standard_normal(4)]
    norm = privacy.clip(big, 1.5)
    assert norm > 1.5
    assert np.sqrt(sum(np.sum(a**2) for a in big)) == pytest.approx(1.5)
    small = [np.full(3, 0.1)]
    assert privacy.clip(small, 1.5) == pytest.approx(np.sqrt(0.03))
    np.testing.assert_array_equal(small[0], np.full(3, 0.1))
    zero = [np.zeros(3)]
    assert privacy.clip(zero, 1.0) == 0 and not zero[0].any()


def test_the_noise_has_the_stated_standard_deviation():
    # 10 nodes, clip 0.5, z 1.2: std 0.06 on each coordinate of the average.
    total = [np.full((400, 500), 2.0), np.full(1000, -1.0)]
    noised = privacy.noised_mean(total, 10, 1.2, 0.5, np.random.default_rng(7))
    noise = np.concatenate([(noised[0] - 0.2).ravel(), (noised[1] + 0.1).ravel()])
    std = privacy.noise_std(1.2, 0.5, 10)
    assert std == pytest.approx(0.06)
    # 201,000 draws: the sample std is within 0.5 % (over 3 standard errors) of 0.06.
    assert np.std(noise) == pytest.approx(std, rel=0.005)
    assert abs(np.mean(noise)) < 4 * std / np.sqrt(noise.size)


def _replies(sent: dict[str, np.ndarray], nodes: range, rng) -> list[Message]:
    replies = []
    for node in nodes:
        scale = 10.0 ** (node % 4 - 2)  # update norms from ~0.06 to ~60
        arrays = {k: v + scale * rng.standard_normal(v.shape) for k, v in sent.items()}
        replies.append(train_reply(node, arrays, 10**node))
    return replies


def _dp_strategy(tmp_path, noise_multiplier=1e-9, target=0.0, sampled=8, clip=1.0):
    rng = np.random.default_rng(1)
    sent = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    strategy = strategy_in_round(
        tmp_path,
        sent,
        range(1, sampled + 1),
        dp_clip=clip,
        privacy=privacy.PrivacyBudget(noise_multiplier, 1e-5, target),
    )
    return strategy, sent, rng


def _flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def test_every_update_is_clipped_and_the_average_is_uniform_over_the_sampled(tmp_path):
    # 8 nodes sampled, 6 reply (two never do); claims of 10 to 10⁶ examples do not weigh.
    strategy, sent, rng = _dp_strategy(tmp_path, sampled=8)
    replies = _replies(sent, range(1, 7), rng)
    clipped, norms = [], []
    for reply in replies:
        update = [
            reply.content["arrays"][k].numpy() - v.astype(np.float64) for k, v in sent.items()
        ]
        norms.append(privacy.clip(update, 1.0))
        clipped.append(_flat(update))

    arrays, _ = strategy.aggregate_train(1, replies)

    assert arrays is not None
    step = _flat(arrays[k].numpy() - sent[k] for k in sent)
    # Noise of std 1e-9 / 8: the step is the sum of the clipped updates over 8 (not 6).
    np.testing.assert_allclose(step, np.sum(clipped, axis=0) / 8, atol=1e-6)
    assert all(np.linalg.norm(c) <= 1.0 + 1e-9 for c in clipped)
    record = strategy.record.entries()
    assert record["dp_clipped"] == sum(norm > 1.0 for norm in norms) == 5
    assert record["dp_epsilon"] == pytest.approx(privacy.epsilon(1e-9, 1, 1e-5))
    assert record["dp_noise_std"] == pytest.approx(1e-9 / 8)
    assert record["missing_replies"] == 2 and strategy.privacy.rounds == 1


def test_the_run_stops_before_the_round_that_would_exceed_the_target(tmp_path):
    z = 1.0
    target = (privacy.epsilon(z, 2, 1e-5) + privacy.epsilon(z, 3, 1e-5)) / 2
    strategy, _, _ = _dp_strategy(tmp_path, noise_multiplier=z, target=target)
    strategy.privacy.rounds = 2
    assert not strategy.privacy.allows_another_round()
    with pytest.raises(BudgetSpentError) as stop:
        strategy.configure_train(3, strategy.global_arrays, ConfigRecord({}), grid=None)
    assert str(stop.value) == (
        f"round 3 would take epsilon from {privacy.epsilon(z, 2, 1e-5):.3g} to "
        f"{privacy.epsilon(z, 3, 1e-5):.3g} > dp-target-epsilon={target:g} (delta 1e-05): "
        "the run stops after round 2"
    )
    strategy.privacy.rounds = 1
    assert strategy.privacy.allows_another_round()


def test_the_budget_spent_survives_a_checkpoint(tmp_path):
    strategy, sent, rng = _dp_strategy(tmp_path, noise_multiplier=2.0)
    strategy.aggregate_train(1, _replies(sent, range(1, 9), rng))
    strategy._end_round(1, strategy.global_arrays, None)
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.state["privacy"] == {"rounds": 1, "noise_multiplier": 2.0}
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["rounds"][-1]["dp_epsilon"] == pytest.approx(privacy.epsilon(2.0, 1, 1e-5))


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("aggregation", "median", "expected 'mean' (clipping already bounds every update"),
        ("exchange", "full", "expected 'trainable' (noise is added to what travels"),
    ],
)
def test_dp_refuses_what_its_analysis_does_not_cover(key, value, expected):
    values = {**defaults(), "dp": "server", key: value}
    with pytest.raises(ValueError) as err:
        RunConfig.parse(values, check_files=False)
    assert str(err.value).startswith(f"{key}={value!r} is not allowed with dp='server': {expected}")


def _train_message(received: dict[str, np.ndarray]) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in received.items()}),
            "config": ConfigRecord({"phase": "head"}),
        }
    )
    return Message(content, metadata=message_metadata(0, 5))


@pytest.mark.parametrize("mode", ["client", "server"])
def test_dp_clip_mod_clips_on_the_node_only_with_dp_client(mode):
    rng = np.random.default_rng(4)
    received = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    trained = {k: v + 5.0 for k, v in received.items()}
    context = Context(
        run_id=1,
        node_id=5,
        node_config={},
        state=RecordDict(),
        run_config={**defaults(), "dp": mode, "dp-clip": 0.5},
    )

    def train(msg: Message, context: Context) -> Message:
        reply = ArrayRecord({k: Array(v) for k, v in trained.items()})
        return Message(RecordDict({"arrays": reply}), reply_to=msg)

    reply = privacy.dp_clip_mod(_train_message(received), context, train)

    update = [reply.content["arrays"][k].numpy() - received[k] for k in received]
    norm = np.linalg.norm(_flat(update))
    if mode == "client":
        assert norm == pytest.approx(0.5, rel=1e-4)
    else:
        assert norm == pytest.approx(5.0 * np.sqrt(64 * 32 + 32), rel=1e-4)
