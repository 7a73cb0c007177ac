"""Caches that heal: a damaged entry file is one warning and one miss, never a lasting failure.

Real files in a real folder, damaged the ways disks and killed processes damage them;
a fresh store object on the folder stands for the next ClientApp process. The last
two tests are the client's side: a node with a damaged cache-dir answers the next
message as a node without the entry would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

# test_client's model, deployed node and clean-cache reply (module fixtures, shared here).
from test_client import arrays_of, cached, initial, node, train  # noqa: F401

from fl_app.cache import CHECKSUM_MAGIC, TRAILER_BYTES, MappedArrays, Store, entry_checksum
from fl_app.data.partition import PartitionStore
from fl_app.model.classifier import is_head_variable
from fl_app.model.features import FeatureCache
from fl_app.wire.exchange import BASE_DISK_BYTES, BaseStore, base_hash

KEY = "0123456789abcdef0123456789abcdef01234567"


def _features() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)


def _base() -> ArrayRecord:
    rng = np.random.default_rng(1)
    shapes = {"conv1/kernel": (3, 3, 1, 8), "conv1/bias": (8,), "head/kernel": (8, 4)}
    return ArrayRecord(
        {k: Array(rng.standard_normal(s).astype(np.float32)) for k, s in shapes.items()}
    )


def _partitions() -> list[np.ndarray]:
    rows = np.random.default_rng(2).permutation(50)
    return [rows[:7], rows[7:7], rows[7:]]  # an empty partition too


def _assert_same(value, expected) -> None:
    if isinstance(expected, list):
        assert len(value) == len(expected)
        for got, want in zip(value, expected, strict=True):
            np.testing.assert_array_equal(got, want)
    elif isinstance(expected, ArrayRecord):
        assert list(value.keys()) == list(expected.keys())
        for key in expected:
            np.testing.assert_array_equal(value[key].numpy(), expected[key].numpy(), err_msg=key)
    else:
        np.testing.assert_array_equal(value, expected)


# What each store keeps: its class, a value, and that value in the format before checksums.
STORES = {
    "features": (FeatureCache, _features, np.save),
    "bases": (
        BaseStore,
        _base,
        lambda file, record: np.savez(file, **{k: a.numpy() for k, a in record.items()}),
    ),
    "partitions": (
        PartitionStore,
        _partitions,
        lambda file, parts: np.savez(file, rows=np.concatenate(parts)),
    ),
    "decoded datasets": (MappedArrays, _features, np.save),
}


@pytest.fixture(params=list(STORES))
def kind(request) -> tuple[type[Store], Callable[[], object], Callable]:
    return STORES[request.param]


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _dead_pid() -> int:
    """The id of a process that has ended (a writer killed mid-write)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _leave_partial(path: Path) -> None:
    """As if the writer died mid-write: half its partial file, and no entry."""
    data = path.read_bytes()
    path.unlink()
    name = f".{KEY}.{_dead_pid()}.partial{path.suffix}"
    (path.parent / name).write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncated to 0 bytes": lambda path: os.truncate(path, 0),
    "truncated to half": lambda path: os.truncate(path, path.stat().st_size // 2),
    "one byte flipped": _flip_middle_byte,
    "checksum cut off": lambda path: os.truncate(path, path.stat().st_size - TRAILER_BYTES),
    "stale partial write": _leave_partial,
}
REASONS = {
    "truncated to 0 bytes": "is empty",
    "truncated to half": "has no checksum",
    "one byte flipped": "does not match its checksum",
    "checksum cut off": "has no checksum",
    "stale partial write": "is a partial write of process",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_entry_is_one_warning_and_one_miss_then_heals(
    kind, damage, tmp_path, flwr_warnings
):
    store_class, make, _ = kind
    value = make()
    store_class(1 << 20, tmp_path).put(KEY, value)
    [path] = tmp_path.iterdir()
    DAMAGE[damage](path)
    assert not flwr_warnings

    assert store_class(1 << 20, tmp_path).get(KEY) is None  # the next ClientApp process
    [warning] = [record.getMessage() for record in flwr_warnings]
    assert KEY in warning and REASONS[damage] in warning and "deleted" in warning
    assert not list(tmp_path.iterdir())  # the bad file is gone

    # The caller computes (or receives) the value again and stores it: it is back.
    store = store_class(1 << 20, tmp_path)
    store.put(KEY, value)
    _assert_same(store.get(KEY), value)
    _assert_same(store_class(1 << 20, tmp_path).get(KEY), value)
    assert len(flwr_warnings) == 1 and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_put_replaces_a_bad_file_it_finds_without_a_get_first(kind, tmp_path, flwr_warnings):
    store_class, make, _ = kind
    value = make()
    store_class(1 << 20, tmp_path).put(KEY, value)
    [path] = tmp_path.iterdir()
    os.truncate(path, path.stat().st_size // 2)
    store_class(1 << 20, tmp_path).put(KEY, value)  # e.g. the server sends the base again
    assert len(flwr_warnings) == 1
    _assert_same(store_class(1 << 20, tmp_path).get(KEY), value)
    assert len(flwr_warnings) == 1


def test_an_entry_written_before_checksums_is_a_miss_once(kind, tmp_path, flwr_warnings):
    store_class, make, write_old_format = kind
    value = make()
    path = tmp_path / f"{KEY}{store_class.codec.suffix}"
    with path.open("wb") as file:
        write_old_format(file, value)
    assert store_class(1 << 20, tmp_path).get(KEY) is None
    assert len(flwr_warnings) == 1 and "has no checksum" in flwr_warnings[0].getMessage()
    store_class(1 << 20, tmp_path).put(KEY, value)
    _assert_same(store_class(1 << 20, tmp_path).get(KEY), value)
    assert len(flwr_warnings) == 1


def test_bytes_that_pass_the_checksum_but_do_not_decode_are_a_miss(kind, tmp_path, flwr_warnings):
    store_class, _, _ = kind
    body = b"not an array at all"
    checksum = entry_checksum(KEY)
    checksum.update(body)
    path = tmp_path / f"{KEY}{store_class.codec.suffix}"
    path.write_bytes(body + CHECKSUM_MAGIC + checksum.digest())
    assert store_class(1 << 20, tmp_path).get(KEY) is None
    [warning] = [record.getMessage() for record in flwr_warnings]
    assert "cannot be decoded" in warning and not path.exists()


def test_a_file_under_another_keys_name_is_refused(tmp_path, flwr_warnings):
    value = _features()
    FeatureCache(1 << 20, tmp_path).put("a", value)
    shutil.copy(tmp_path / "a.npy", tmp_path / "b.npy")
    assert FeatureCache(1 << 20, tmp_path).get("b") is None
    assert "does not match its checksum" in flwr_warnings[0].getMessage()
    _assert_same(FeatureCache(1 << 20, tmp_path).get("a"), value)
    assert len(flwr_warnings) == 1


def test_memory_entries_are_trusted(tmp_path, flwr_warnings):
    value = _features()
    store = FeatureCache(1 << 20, tmp_path)
    store.put(KEY, value)
    os.truncate(tmp_path / f"{KEY}.npy", 0)
    assert store.get(KEY) is value  # never left this process: the file is not read
    assert not flwr_warnings


def test_eviction_bounds_the_folder_and_spares_live_partial_writes(tmp_path, flwr_warnings):
    values = [np.full((10, 2048), i, np.float32) for i in range(4)]  # 80 KiB each
    # Another process (alive: our parent) is writing an entry right now.
    live = tmp_path / f".other.{os.getppid()}.partial.npy"
    live.write_bytes(b"half")
    for i, value in enumerate(values):
        FeatureCache(200 * 1024, tmp_path).put(f"k{i}", value)
    entries = sorted(tmp_path.glob("k*.npy"))
    assert [p.stem for p in entries] == ["k2", "k3"]  # the least recently used went
    assert sum(p.stat().st_size for p in entries) <= 200 * 1024
    assert live.exists() and FeatureCache(200 * 1024, tmp_path).get("other") is None
    assert live.exists() and not flwr_warnings
    _assert_same(FeatureCache(200 * 1024, tmp_path).get("k3"), values[3])


def test_a_partial_write_of_an_ended_process_goes_after_the_next_put(tmp_path, flwr_warnings):
    stale = tmp_path / f".other.{_dead_pid()}.partial.npy"
    stale.write_bytes(b"half")
    FeatureCache(1 << 20, tmp_path).put(KEY, _features())
    assert not stale.exists() and len(flwr_warnings) == 1


def test_a_file_that_cannot_be_written_is_a_warning_and_stays_in_memory(tmp_path, flwr_warnings):
    folder = tmp_path / "not-a-folder"
    folder.write_bytes(b"")  # a file where the folder should be
    store = FeatureCache(1 << 20, folder)
    value = _features()
    store.put(KEY, value)
    assert store.get(KEY) is value
    [warning] = [record.getMessage() for record in flwr_warnings]
    assert "could not be written" in warning


def _counting(value: np.ndarray) -> tuple[Callable[[], np.ndarray], list[int]]:
    calls: list[int] = []

    def build() -> np.ndarray:
        calls.append(1)
        return value.copy()

    return build, calls


def test_mapped_arrays_are_built_once_then_every_process_maps_the_file(tmp_path, flwr_warnings):
    value = _features()
    build, calls = _counting(value)
    first = MappedArrays(1 << 20, tmp_path).mapped(KEY, build)
    again = MappedArrays(1 << 20, tmp_path).mapped(KEY, build)  # the next process
    assert len(calls) == 1
    for array in (first, again):
        assert isinstance(array, np.memmap) and not array.flags.writeable
        assert Path(array.filename) == tmp_path / f"{KEY}.npy"
        _assert_same(array, value)
    # The checksum trailer after the array is not part of it.
    assert (tmp_path / f"{KEY}.npy").stat().st_size == 128 + value.nbytes + TRAILER_BYTES
    assert not flwr_warnings


def test_a_damaged_mapped_file_is_rebuilt_before_it_is_mapped(tmp_path, flwr_warnings):
    value = _features()
    build, calls = _counting(value)
    MappedArrays(1 << 20, tmp_path).mapped(KEY, build)
    _flip_middle_byte(tmp_path / f"{KEY}.npy")
    _assert_same(MappedArrays(1 << 20, tmp_path).mapped(KEY, build), value)
    assert len(calls) == 2
    [warning] = [record.getMessage() for record in flwr_warnings]
    assert "does not match its checksum" in warning


def test_mapped_arrays_without_a_writable_folder_are_the_processs_own(tmp_path, flwr_warnings):
    folder = tmp_path / "not-a-folder"
    folder.write_bytes(b"")
    value = _features()
    array = MappedArrays(1 << 20, folder).mapped(KEY, _counting(value)[0])
    assert not isinstance(array, np.memmap)
    _assert_same(array, value)
    assert "could not be written" in flwr_warnings[0].getMessage()


# The client's side: a deployed node whose cache-dir was damaged between two messages.


@pytest.fixture
def client(request) -> tuple[ArrayRecord, dict[str, str], object]:
    """test_client's model, deployed node and train reply on a clean feature cache."""
    return tuple(request.getfixturevalue(name) for name in ("initial", "node", "cached"))


def test_a_node_whose_base_file_was_emptied_asks_for_it_then_takes_it(
    client, tmp_path, flwr_warnings
):
    model, deployed, clean = client
    head = ArrayRecord({k: a for k, a in model.items() if is_head_variable(k)})
    name = base_hash(model)
    bases = tmp_path / "bases"
    BaseStore(BASE_DISK_BYTES, bases).put(name, model)  # an earlier message's process
    [path] = bases.iterdir()
    os.truncate(path, 0)
    damaged = {**deployed, "cache-dir": str(tmp_path)}

    with pytest.raises(LookupError, match="does not hold base model"):
        train(head, damaged, base_name=name)  # not EOFError, and not for good
    [warning] = [record.getMessage() for record in flwr_warnings]
    assert path.name in warning and "is empty" in warning

    reply = train(head, damaged, base=model)  # the server sends it again
    expected = arrays_of(clean)
    for key, array in arrays_of(reply).items():
        np.testing.assert_allclose(array, expected[key], rtol=1e-6, atol=1e-7, err_msg=key)
    stored = BaseStore(BASE_DISK_BYTES, bases).get(name)  # a later process finds it intact
    assert stored is not None and base_hash(stored) == name
    assert len(flwr_warnings) == 1


def test_a_node_whose_feature_files_were_all_bit_flipped_recomputes_them(
    client, tmp_path, flwr_warnings
):
    model, deployed, clean = client
    # The features the clean run cached, each file with one byte flipped.
    features = tmp_path / "features"
    shutil.copytree(Path(deployed["cache-dir"]) / "features", features)
    flipped = sorted(features.iterdir())
    assert flipped
    for path in flipped:
        _flip_middle_byte(path)

    damaged = {**deployed, "cache-dir": str(tmp_path)}
    reply = train(model, damaged, **{"feature-cache": True})
    expected = arrays_of(clean)
    for key, array in arrays_of(reply).items():
        np.testing.assert_allclose(array, expected[key], rtol=1e-6, atol=1e-7, err_msg=key)
    # One line per damaged file (training reads the train and the validation split's),
    # each computed again and written afresh: a later process reads them silently.
    warnings = [record.getMessage() for record in flwr_warnings]
    assert all("does not match its checksum" in warning for warning in warnings)
    assert sorted(Path(warning.split()[2]) for warning in warnings) == flipped
    assert sorted(features.iterdir()) == flipped
    for path in flipped:
        assert FeatureCache(1 << 30, features).get(path.stem) is not None
    assert len(flwr_warnings) == len(flipped)
