"""Lossy compression of the arrays a round exchanges: ``float16`` or ``int8``.

Each float array is divided by a per-array scale (its largest magnitude), so
that ``float16`` keeps full relative precision even for the tiny values of a
fine-tuning update (unscaled they would fall into float16's subnormal range)
and ``int8`` spends its 255 levels on the array's actual range. Uploads are
encoded as the difference from the arrays the node received, which is far
smaller than the weights themselves and so loses far less to rounding.

The server encodes what it sends and decodes replies in the strategy; the
client does the mirror image in ``compression_mod``, a Flower mod, following
whatever method the incoming message used, so the run config is read in one
place only (the server).
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fl_app.values import COMPRESSIONS

# The ConfigRecord that travels with compressed arrays and says how to decode them.
RECORD = "compression"
# The MetricRecord entry with a node's upload error (relative RMS).
UPLOAD_ERROR = "upload_error"
_INT8_LEVELS = 127


def encode(
    arrays: ArrayRecord, method: str, reference: ArrayRecord | None = None
) -> tuple[ArrayRecord, ConfigRecord, float]:
    """Compress ``arrays`` (minus ``reference``, if given) with ``method``.

    Returns the encoded arrays, the ConfigRecord needed to decode them, and the
    relative RMS error of the values encoded (0 when ``method`` is ``none``).
    Arrays that are not floating point travel unchanged.
    """
    encoded, scales = ArrayRecord(), []
    error2 = norm2 = 0.0
    for key, array in arrays.items():
        value = array.numpy()
        if reference is not None:
            value = value - reference[key].numpy()
        if method == "none" or not np.issubdtype(value.dtype, np.floating):
            encoded[key] = Array(value) if reference is not None else array
            scales.append(0.0)
            continue
        scale = float(np.max(np.abs(value))) if value.size else 0.0
        scale = scale if scale > 0 and math.isfinite(scale) else 1.0
        if method == "float16":
            packed = (value / scale).astype(np.float16)
        else:
            packed = np.round(value / scale * _INT8_LEVELS).astype(np.int8)
        encoded[key] = Array(packed)
        scales.append(scale)
        lost = _unpack(packed, scale, method) - value.astype(np.float64)
        error2 += float(np.sum(lost**2))
        norm2 += float(np.sum(value.astype(np.float64) ** 2))
    config = ConfigRecord({"method": method, "delta": reference is not None, "scales": scales})
    return encoded, config, math.sqrt(error2 / norm2) if norm2 > 0 else 0.0


def decode(
    arrays: ArrayRecord,
    config: ConfigRecord,
    reference: ArrayRecord | None = None,
) -> ArrayRecord:
    """Undo ``encode``: the arrays as the receiver should use them.

    ``reference`` must be what the encoder subtracted (the arrays the sender
    had received). Compressed arrays come back as float32, the model's dtype.
    Raises ``ValueError`` naming the problem when the record is malformed.
    """
    method = config.get("method")
    if method not in COMPRESSIONS:
        raise ValueError(f"compression method {method!r} is not one of {', '.join(COMPRESSIONS)}")
    if bool(config.get("delta")) != (reference is not None):
        raise ValueError("compression 'delta' flag does not match this message")
    scales = list(config.get("scales", []))
    if len(scales) != len(arrays):
        raise ValueError(f"{len(scales)} compression scales for {len(arrays)} arrays")
    decoded = ArrayRecord()
    for (key, array), scale in zip(arrays.items(), scales, strict=True):
        if reference is not None and key not in reference:
            raise ValueError(f"array '{key}' was never sent to this node")
        value = array.numpy()
        if scale:  # zero marks an array that travelled uncompressed
            expected = np.float16 if method == "float16" else np.int8
            if value.dtype != expected or not math.isfinite(scale) or scale < 0:
                raise ValueError(
                    f"array '{key}' is {value.dtype} with scale {scale!r}, "
                    f"expected {np.dtype(expected)} with a finite scale for {method}"
                )
            value = _unpack(value, scale, method).astype(np.float32)
        if reference is not None:
            base = reference[key].numpy()
            value = (base + value).astype(base.dtype)
        decoded[key] = Array(value)
    return decoded


def _unpack(packed: np.ndarray, scale: float, method: str) -> np.ndarray:
    levels = 1.0 if method == "float16" else _INT8_LEVELS
    return packed.astype(np.float64) * (scale / levels)


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Decode the incoming arrays, and encode the reply's as the server did.

    The reply's arrays are sent as their difference from the decoded arrays
    this node received, with the upload's error added to its metrics.
    """
    if RECORD not in msg.content.config_records:
        return call_next(msg, context)
    config = msg.content.config_records[RECORD]
    received = decode(msg.content["arrays"], config)
    msg.content["arrays"] = received
    del msg.content[RECORD]
    reply = call_next(msg, context)
    if not reply.has_content() or "arrays" not in reply.content.array_records:
        return reply
    encoded, reply_config, error = encode(
        reply.content["arrays"], str(config["method"]), reference=received
    )
    reply.content["arrays"] = encoded
    reply.content[RECORD] = reply_config
    if "metrics" in reply.content.metric_records:
        reply.content["metrics"][UPLOAD_ERROR] = error
    return reply
