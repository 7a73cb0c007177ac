"""Trainable-only exchange: nodes keep the frozen model, rounds carry what trains.

The first message a node gets carries the whole global model as its *base*
(exact float32, under the RecordDict key ``base``) and the base's hash; the
node stores it (memory, and disk, so the per-message ClientApp processes of a
deployed SuperNode share it). Every message also carries the arrays that may
have changed since the base (the round's trainable ones, under ``arrays``);
the node lays them over its stored base to get the global model, and replies
with the same keys only. The server sends a node its base again when the node
lost it (an error reply), or when an array outside the trainable set differs
from the node's base, so the node's model is always the server's.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import IO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fl_app.cache import Codec, Store, digest_arrays
from fl_app.wire.compression import RECORD, UPLOAD_ERROR, decode, encode

# RecordDict key of the full model a node stores, and the config key naming it.
BASE = "base"
BASE_HASH = "base-hash"
# Bases a node keeps on disk and in memory; a ResNet50 is 95 MB. Disk holds several,
# so runs side by side on one machine do not evict each other's.
BASE_DISK_BYTES = 2**30
BASE_MEMORY_BYTES = 128 * 2**20


def base_hash(arrays: ArrayRecord) -> str:
    """A digest of every array, in order: the name of a base."""
    digest = hashlib.blake2b(digest_size=20)
    digest_arrays(digest, arrays, arrays.keys())
    return digest.hexdigest()


def differing_keys(current: ArrayRecord, base: ArrayRecord) -> list[str]:
    """Keys whose arrays differ between two records with the same keys."""
    # Unchanged arrays are usually the very same objects: compare bytes only otherwise.
    return [
        key
        for key, array in current.items()
        if array is not base[key] and array.data != base[key].data
    ]


def assemble(base: ArrayRecord, arrays: ArrayRecord) -> ArrayRecord:
    """The base with ``arrays`` laid over it, in the base's order."""
    unknown = [key for key in arrays if key not in base]
    if unknown:
        raise ValueError(f"arrays {unknown[:3]} are not in the stored base model")
    return ArrayRecord({key: arrays.get(key, array) for key, array in base.items()})


def _read_record(file: IO[bytes]) -> ArrayRecord:
    with np.load(file) as stored:
        return ArrayRecord({key: Array(stored[key]) for key in stored.files})


def _write_record(file: IO[bytes], value: ArrayRecord) -> None:
    np.savez(file, **{key: array.numpy() for key, array in value.items()})


class BaseStore(Store):
    """Base models (ArrayRecords) by hash, as ``.npz`` files.

    A file that fails its checksum is deleted and is a miss (`fl_app.cache.Store`):
    the node answers that it lacks the base, and the server sends it again.
    """

    codec = Codec(".npz", _read_record, _write_record, ArrayRecord.count_bytes)


class ServerExchange:
    """The server's side of the wire: what each sampled node gets, and decoding replies.

    Parameters
    ----------
    exchange : str
        ``trainable``: after its base, a node gets and returns only the round's
        trainable arrays; ``full``: every array travels every time.
    compression : str
        ``none``, ``float16`` or ``int8``, for the arrays of every round.
    trainable_keys : Mapping[str, Sequence[str]]
        Per phase, the keys of the arrays that training changes, in model order.

    Attributes
    ----------
    sent : ArrayRecord
        This round's arrays as the nodes decode them: what replies are checked against.
    stats : dict
        This round's ``bytes_sent``, ``bytes_received``, ``bases_sent`` and, with
        compression, ``download_error`` and ``upload_error``.
    """

    def __init__(
        self, exchange: str, compression: str, trainable_keys: Mapping[str, Sequence[str]]
    ) -> None:
        self.exchange = exchange
        self.compression = compression
        self.trainable_keys = trainable_keys
        self.sent = ArrayRecord()
        self.stats: dict[str, float] = {}
        self._upload_errors: list[float] = []
        # Base models by hash, the one each node holds, and those sent but not yet confirmed.
        self.bases: dict[str, ArrayRecord] = {}
        self._holders: dict[int, str] = {}
        self._pending: dict[int, str] = {}

    def start_round(self) -> None:
        """Zero the round's counters."""
        self.stats = {"bytes_sent": 0, "bytes_received": 0, "bases_sent": 0}
        self._upload_errors = []

    def address(self, sampled: Iterable[Message], arrays: ArrayRecord, phase: str) -> list[Message]:
        """Give each sampled node this round's arrays, and its base if it needs one."""
        full = self.exchange == "full"
        keys = list(arrays.keys()) if full else list(self.trainable_keys[phase])
        payload = ArrayRecord({key: arrays[key] for key in keys})
        compression, self.sent = None, payload
        if self.compression != "none":
            payload, compression, self.stats["download_error"] = encode(payload, self.compression)
            self.sent = decode(payload, compression)
        messages = []
        for msg in sampled:
            node = msg.metadata.dst_node_id
            config = ConfigRecord(dict(msg.content["config"]))
            content = RecordDict({"arrays": payload, "config": config})
            if compression is not None:
                content[RECORD] = compression
            if not full:
                name, new = self._base_for(node, arrays, keys)
                config[BASE_HASH] = name
                if new:
                    content[BASE] = self.bases[name]
                    self._pending[node] = name
                    self.stats["bases_sent"] += 1
            self.stats["bytes_sent"] += sum(r.count_bytes() for r in content.array_records.values())
            msg.content = content
            messages.append(msg)
        return messages

    def _base_for(self, node: int, arrays: ArrayRecord, keys: Sequence[str]) -> tuple[str, bool]:
        """The base ``node`` builds the model on, and whether it must be sent.

        Any base that differs from the global model only in arrays that travel
        anyway will do; the one the node holds is free, another costs a send.
        """
        held = self._holders.get(node)
        for name in sorted(self.bases, key=lambda name: name != held):
            if set(differing_keys(arrays, self.bases[name])) <= set(keys):
                return name, name != held
        name = base_hash(arrays)
        self.bases[name] = arrays
        # Keep only bases some node holds or awaits: unchanged arrays are shared objects,
        # so each costs little more than its trainable arrays.
        kept = {name, *self._holders.values(), *self._pending.values()}
        self.bases = {key: base for key, base in self.bases.items() if key in kept}
        return name, True

    def confirm(self, msg: Message, node: int) -> None:
        """Count a reply's bytes, and note whether ``node`` now holds the base it was sent.

        ``node`` is the node the reply answers for (an error reply the SuperLink
        makes comes from the SuperLink's own id).
        """
        if msg.has_error():
            self.forget(node)
            return
        self.received_from(node, sum(r.count_bytes() for r in msg.content.array_records.values()))

    def received_from(self, node: int, nbytes: int) -> None:
        """Count ``nbytes`` that ``node`` sent; it now holds the base it was sent, if any."""
        if node in self._pending:
            self._holders[node] = self._pending.pop(node)
        self.stats["bytes_received"] = self.stats.get("bytes_received", 0) + nbytes

    def forget(self, node: int) -> None:
        """Send ``node`` its base again next time: it failed, or did not answer."""
        self._holders.pop(node, None)
        self._pending.pop(node, None)

    def held(self) -> dict[int, str]:
        """Which base each node holds, by node id (for a checkpoint)."""
        return dict(self._holders)

    def restore(self, holders: Mapping[int, str], bases: Mapping[str, ArrayRecord]) -> None:
        """Take up the bases nodes held in an earlier run (resuming from its checkpoint).

        A node that lost its base since says so in its first reply and gets it again.
        """
        self.bases.update(bases)
        self._holders.update({node: name for node, name in holders.items() if name in bases})

    def received(self, msg: Message) -> ArrayRecord | str:
        """A train reply's arrays, decompressed, or why they cannot be."""
        arrays = msg.content["arrays"]
        if self.compression == "none":
            return arrays
        compression = msg.content.config_records.get(RECORD)
        if compression is None:
            return f"missing the '{RECORD}' record ({self.compression} was sent)"
        try:
            arrays = decode(arrays, compression, reference=self.sent)
        except Exception as err:  # corrupt bytes can fail in many ways
            return f"compressed arrays cannot be decoded ({err})"
        metrics = next(iter(msg.content.metric_records.values()))
        error = metrics.get(UPLOAD_ERROR)
        if isinstance(error, float | int) and math.isfinite(error):
            self._upload_errors.append(float(error))
            self.stats["upload_error"] = float(np.mean(self._upload_errors))
        return arrays
