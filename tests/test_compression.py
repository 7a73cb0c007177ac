"""float16/int8 compression: round-trip error bounds, deltas, malformed records, the mod."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from helpers import message_metadata

from fl_app.config import RunConfig, defaults
from fl_app.wire.compression import RECORD, UPLOAD_ERROR, compression_mod, decode, encode

# Per element, relative to the array's largest magnitude: float16 keeps 11 significant
# bits on values scaled into [-1, 1]; int8 rounds to the nearest of 127 levels a side.
BOUNDS = {"float16": 2.0**-11, "int8": 0.5 / 127}


def _incoming(content: RecordDict) -> Message:
    return Message(content, metadata=message_metadata(0, 1))


def _record(rng: np.random.Generator) -> ArrayRecord:
    return ArrayRecord(
        {
            "dense/kernel": Array(rng.standard_normal((256, 64)).astype(np.float32)),
            # Tiny values, as in a fine-tuning update: float16 alone would flush them.
            "dense/bias": Array((rng.standard_normal(10) * 1e-6).astype(np.float32)),
            "zeros": Array(np.zeros(3, np.float32)),
            "steps": Array(np.arange(4, dtype=np.int64)),
        }
    )


@pytest.mark.parametrize("method", sorted(BOUNDS))
def test_round_trip_error_is_within_the_per_array_bound(method):
    original = _record(np.random.default_rng(0))
    encoded, config, error = encode(original, method)
    decoded = decode(encoded, config)

    assert list(decoded.keys()) == list(original.keys())
    for key, array in original.items():
        value, back = array.numpy(), decoded[key].numpy()
        assert back.dtype == value.dtype and back.shape == value.shape
        bound = BOUNDS[method] * np.max(np.abs(value)) if value.size else 0
        assert np.max(np.abs(back.astype(np.float64) - value)) <= bound * (1 + 1e-6), key
    np.testing.assert_array_equal(decoded["steps"].numpy(), np.arange(4))
    np.testing.assert_array_equal(decoded["zeros"].numpy(), 0)
    # The reported error is the measured one: relative RMS over all float arrays.
    floats = [k for k in original if k != "steps"]
    lost = sum(np.sum((decoded[k].numpy() - original[k].numpy()) ** 2.0) for k in floats)
    norm = sum(np.sum(original[k].numpy() ** 2.0) for k in floats)
    assert error == pytest.approx(np.sqrt(lost / norm), rel=1e-3)
    assert 0 < error < {"float16": 1e-3, "int8": 2e-2}[method]
    packed, kernel = encoded["dense/kernel"], original["dense/kernel"]
    assert packed.numpy().dtype == (np.float16 if method == "float16" else np.int8)
    assert len(packed.data) < len(kernel.data) / (1.9 if method == "float16" else 3.8)


@pytest.mark.parametrize("method", sorted(BOUNDS))
def test_an_update_sent_as_a_difference_loses_far_less(method):
    rng = np.random.default_rng(1)
    received = _record(rng)
    trained = ArrayRecord(
        {
            key: Array(a.numpy() + (rng.standard_normal(a.shape) * 1e-4).astype(a.dtype))
            for key, a in received.items()
        }
    )
    encoded, config, _ = encode(trained, method, reference=received)
    decoded = decode(encoded, config, reference=received)

    kernel, back = trained["dense/kernel"].numpy(), decoded["dense/kernel"].numpy()
    delta = kernel - received["dense/kernel"].numpy()
    # The bound scales with the update, not with the weights (~1e-4 vs ~3).
    assert np.max(np.abs(back - kernel)) <= BOUNDS[method] * np.max(np.abs(delta)) + 1e-6
    np.testing.assert_array_equal(decoded["steps"].numpy(), trained["steps"].numpy())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a, c: c.__setitem__("method", "bf8"), "not one of none, float16, int8"),
        (lambda a, c: c.__setitem__("scales", c["scales"][:-1]), "compression scales for"),
        (lambda a, c: c.__setitem__("scales", [float("nan")] * 4), "expected int8"),
        (
            lambda a, c: a.__setitem__("dense/kernel", Array(np.ones((256, 64), np.float32))),
            "expected int8",
        ),
        (lambda a, c: c.__setitem__("delta", True), "'delta' flag"),
    ],
)
def test_a_malformed_record_is_refused_with_the_reason(change, message):
    encoded, config, _ = encode(_record(np.random.default_rng(2)), "int8")
    change(encoded, config)
    with pytest.raises(ValueError, match=message):
        decode(encoded, config)


def test_an_unknown_method_is_one_clear_error():
    with pytest.raises(ValueError) as error:
        RunConfig.parse({**defaults(), "compression": "int4"})
    assert str(error.value) == (
        "compression='int4' is not allowed: expected one of none, float16, int8"
    )


def test_the_client_mod_decodes_what_came_and_encodes_the_reply_as_a_difference():
    rng = np.random.default_rng(4)
    sent = _record(rng)
    encoded, config, _ = encode(sent, "float16")
    seen: dict[str, ArrayRecord] = {}

    def train(msg: Message, context: Context) -> Message:
        seen["arrays"] = msg.content["arrays"]
        trained = ArrayRecord(
            {
                k: Array(a.numpy() + np.ones_like(a.numpy()))
                for k, a in msg.content["arrays"].items()
            }
        )
        reply = RecordDict({"arrays": trained, "metrics": MetricRecord({"num-examples": 5})})
        return Message(reply, reply_to=msg)

    incoming = _incoming(RecordDict({"arrays": encoded, RECORD: config}))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = compression_mod(incoming, context, train)

    received = decode(encoded, config)
    for key in sent:
        np.testing.assert_array_equal(seen["arrays"][key].numpy(), received[key].numpy())
    back = decode(reply.content["arrays"], reply.content[RECORD], reference=received)
    for key, array in received.items():
        np.testing.assert_allclose(back[key].numpy(), array.numpy() + 1, rtol=0, atol=1e-3)
    assert reply.content[RECORD]["delta"] is True
    assert 0 <= reply.content["metrics"][UPLOAD_ERROR] < 1e-3


def test_the_mod_leaves_uncompressed_messages_alone():
    arrays = _record(np.random.default_rng(5))
    incoming = _incoming(RecordDict({"arrays": arrays}))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def echo(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg)

    reply = compression_mod(incoming, context, echo)
    assert RECORD not in reply.content.config_records
    assert reply.content["arrays"] is arrays
