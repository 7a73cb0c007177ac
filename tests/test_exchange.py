"""Trainable-only exchange: bases held by nodes, what the server sends whom, end to end."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from helpers import TINY, log_lines, message_metadata

from fl_app.model.classifier import build_model, trainable_keys
from fl_app.schedule import FINE_TUNE, HEAD
from fl_app.wire.exchange import (
    BASE,
    BASE_HASH,
    BaseStore,
    ServerExchange,
    assemble,
    base_hash,
    differing_keys,
)

KEYS = {HEAD: ["head/kernel", "head/bias"], FINE_TUNE: ["conv5/kernel", "head/kernel", "head/bias"]}
SHAPES = {
    "conv1/kernel": (3, 3, 8),
    "conv5/kernel": (8, 8),
    "head/kernel": (8, 4),
    "head/bias": (4,),
}


def _global(seed: int) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord(
        {k: Array(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()}
    )


def _sampled(*nodes: int) -> list[Message]:
    """Messages as FedAvg's sampling makes them, before our strategy addresses them."""
    return [
        Message(
            RecordDict({"config": ConfigRecord({"server-round": 1})}),
            metadata=message_metadata(0, n),
        )
        for n in nodes
    ]


def _ok(node: int) -> Message:
    return Message(
        RecordDict({"metrics": MetricRecord({"x": 1.0})}), metadata=message_metadata(node, 0)
    )


def _failed(node: int) -> Message:
    return Message(Error(code=0, reason="base lost"), metadata=message_metadata(node, 0))


def _bases(messages: list[Message]) -> dict[int, bool]:
    return {m.metadata.dst_node_id: BASE in m.content.array_records for m in messages}


def test_each_node_gets_its_base_once_and_again_only_when_needed(tmp_path):
    wire = ServerExchange("trainable", "none", KEYS)
    wire.start_round()
    first = _global(0)
    messages, sent = wire.address(_sampled(1, 2), first, HEAD), wire.sent
    assert _bases(messages) == {1: True, 2: True}
    assert list(sent.keys()) == KEYS[HEAD]
    name = messages[0].content["config"][BASE_HASH]
    assert name == base_hash(first) and messages[0].content[BASE] is first
    assert list(messages[0].content["arrays"].keys()) == KEYS[HEAD]

    # Node 1 confirms; node 2's reply is an error (e.g. it lost its stored base).
    for reply in (_ok(1), _failed(2)):
        wire.confirm(reply, reply.metadata.src_node_id)
    # The head trained: only trainable arrays changed, node 1 needs no new base.
    trained = ArrayRecord(dict(first.items()))
    trained["head/bias"] = Array(np.ones(4, np.float32))
    messages = wire.address(_sampled(1, 2, 3), trained, HEAD)
    assert _bases(messages) == {1: False, 2: True, 3: True}  # node 3 joins late
    assert {m.content["config"][BASE_HASH] for m in messages} == {name}

    for reply in (_ok(2), _ok(3)):
        wire.confirm(reply, reply.metadata.src_node_id)
    # An array outside the trainable set changed: everyone needs the new model once.
    moved = ArrayRecord(dict(trained.items()))
    moved["conv1/kernel"] = Array(np.zeros(SHAPES["conv1/kernel"], np.float32))
    messages = wire.address(_sampled(1, 2), moved, HEAD)
    assert _bases(messages) == {1: True, 2: True}
    assert messages[0].content["config"][BASE_HASH] == base_hash(moved) != name
    # ...but in the fine-tune phase conv5 travels anyway, so a changed conv5 needs no base.
    for reply in (_ok(1), _ok(2)):
        wire.confirm(reply, reply.metadata.src_node_id)
    tuned = ArrayRecord(dict(moved.items()))
    tuned["conv5/kernel"] = Array(np.ones(SHAPES["conv5/kernel"], np.float32))
    messages, sent = wire.address(_sampled(1, 2), tuned, FINE_TUNE), wire.sent
    assert _bases(messages) == {1: False, 2: False}
    np.testing.assert_array_equal(sent["conv5/kernel"].numpy(), 1)
    # The server keeps the bases nodes hold: node 3 still has the first one.
    assert set(wire.bases) == {name, base_hash(moved)}


def test_a_node_rebuilds_the_global_model_from_its_base_and_what_came(tmp_path):
    base = _global(1)
    name = base_hash(base)
    BaseStore(1 << 20, tmp_path).put(name, base)
    # A new ClientApp process (deployment): the base comes back from disk.
    stored = BaseStore(1 << 20, tmp_path).get(name)
    assert stored is not None and base_hash(stored) == name

    update = ArrayRecord({"head/bias": Array(np.full(4, 7.0, np.float32))})
    model = assemble(stored, update)
    assert list(model.keys()) == list(SHAPES)
    assert differing_keys(model, base) == ["head/bias"]
    np.testing.assert_array_equal(model["head/bias"].numpy(), 7.0)
    with pytest.raises(ValueError, match=r"\['other'\] are not in the stored base"):
        assemble(stored, ArrayRecord({"other": Array(np.zeros(1, np.float32))}))


def test_trainable_keys_follow_the_schedule():
    model = build_model(10, (28, 28, 1), 32)
    keys = trainable_keys(model, 32)
    assert [k.split("/")[0] for k in keys[HEAD]] == ["head_dense"] * 2 + ["predictions"] * 2
    conv5 = [k for k in keys[FINE_TUNE] if k.startswith("conv5_")]
    # conv5's convolutions (kernel + bias), not its frozen BatchNorm.
    assert len(conv5) == 2 * 10 and keys[FINE_TUNE][-4:] == keys[HEAD]
    order = [v.path for v in model.weights]
    assert keys[FINE_TUNE] == sorted(keys[FINE_TUNE], key=order.index)
    assert not model.get_layer("resnet50").trainable  # left in the head phase


def _rounds(run) -> list[dict]:
    assert run.status == "finished:completed", run.details + run.log[-3000:]
    return json.loads((run.run_dir / "metrics.json").read_text())["rounds"]


# Two runs (~90 s): in make test-faults, to keep make test within CI's budget.
@pytest.mark.e2e
@pytest.mark.slow
def test_trainable_only_exchange_gives_the_global_model_of_full_exchange(superlink, tmp_path):
    start = tmp_path / "start.weights.h5"
    keras.utils.set_random_seed(0)
    build_model(10, (28, 28, 1), 32).save_weights(start)
    config = {**TINY, "weights": str(start)}
    trainable = superlink.run(tmp_path / "trainable", {**config, "exchange": "trainable"})
    full = superlink.run(tmp_path / "full", {**config, "exchange": "full"})

    rounds = {"trainable": _rounds(trainable), "full": _rounds(full)}
    models = [keras.saving.load_model(r.run_dir / "final.keras") for r in (trainable, full)]
    for a, b in zip(models[0].weights, models[1].weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7, err_msg=a.path)
    for ours, stock in zip(rounds["trainable"], rounds["full"], strict=True):
        assert ours.get("server_loss") == pytest.approx(stock.get("server_loss"), rel=1e-5)
    # Round 2 (conv5 + head) uploads 64% of the model instead of all of it; round 1's
    # uploads are the head alone, ~1% of it.
    for r in (1, 2):
        assert rounds["trainable"][r]["bytes_received"] < rounds["full"][r]["bytes_received"]
    assert rounds["trainable"][1]["bytes_received"] < 0.012 * rounds["full"][1]["bytes_received"]


@pytest.mark.e2e
def test_late_joiners_get_their_base_and_int8_rounds_complete(superlink, tmp_path):
    # 4 nodes, 2 sampled per round for training and 2 for evaluation: nodes first
    # contacted in later rounds need the full model once; nobody needs it twice.
    # (Augmentation is on too, to see that it bypasses the activation cache.)
    config = {
        **TINY,
        "num-server-rounds": 3,
        "head-rounds": 3,
        "fraction-train": 0.5,
        "fraction-evaluate": 0.5,
        "min-train-nodes": 2,
        "min-evaluate-nodes": 2,
        "min-available-nodes": 4,
        "compression": "int8",
        "augmentation": "shift",
    }
    run = superlink.run(tmp_path, config, num_supernodes=4)
    rounds = _rounds(run)[1:]
    assert log_lines(run.log, r"augmentation=shift: the activation cache is bypassed")

    for r in rounds:
        assert r["train_replies"] == 2 and r["rejected_replies"] == 0 and r["eval_replies"] == 2
        assert 0 < r["upload_error"] < 0.02 and 0 < r["download_error"] < 0.02
    assert 2 <= sum(r["bases_sent"] for r in rounds) <= 4
    assert rounds[0]["bases_sent"] >= 2
    # int8 head updates: ~a quarter of the float32 head (1.05 MB) per reply.
    assert all(0.4e6 < r["bytes_received"] < 0.7e6 for r in rounds)
