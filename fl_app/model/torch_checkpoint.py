"""PyTorch state dicts read into numpy without PyTorch (the legacy, pre-zip format).

A legacy ``torch.save`` file (torch < 1.6) is a sequence of pickles followed by raw
tensor storages. A restricted unpickler reads it: it makes nothing but an
``OrderedDict`` of tensor references, so a file cannot run code or build other
objects, and the tensors are then cut out of the storages with numpy.
"""

from __future__ import annotations

import collections
import os
import pickle
from pathlib import Path
from typing import BinaryIO

import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
}
# Legacy torch.save writes this number first (torch/serialization.py, MAGIC_NUMBER).
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _TensorRef:
    """What the unpickler makes of a tensor: where its data lies, read afterwards."""

    def __init__(self, storage: tuple[str, type], offset: int, size, stride) -> None:
        self.key, self.dtype = storage
        self.offset, self.size, self.stride = offset, tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, *_):
    return _TensorRef(storage, offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a state dict and nothing else: no arbitrary classes, no code.

    ``find_class`` allows ``OrderedDict``, torch's tensor rebuild function (replaced
    by `_rebuild_tensor_v2`, which records where the data is) and storage types
    (replaced by their numpy dtype); anything else is refused.
    """

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")

    def persistent_load(self, pid):
        # ("storage", storage type, key, location, number of elements, view metadata)
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        if pid[5] is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        return pid[2], pid[1]


def _strided(flat: np.ndarray, ref: _TensorRef) -> np.ndarray:
    itemsize = flat.itemsize
    return np.lib.stride_tricks.as_strided(
        flat[ref.offset :],
        shape=ref.size,
        strides=tuple(s * itemsize for s in ref.stride),
        writeable=False,
    ).copy()


def _read_legacy(f: BinaryIO) -> dict[str, np.ndarray]:
    # Format (torch < 1.6, torch/serialization.py _legacy_save): pickles of the magic
    # number, the protocol version and system info, then the state dict with storages
    # as persistent ids, then the list of storage keys; then each storage in that
    # order as an int64 element count followed by its raw little-endian bytes.
    if _RestrictedUnpickler(f).load() != _LEGACY_MAGIC:
        raise ValueError("not a legacy PyTorch checkpoint")
    _RestrictedUnpickler(f).load()  # protocol version
    sys_info = _RestrictedUnpickler(f).load()
    if not sys_info.get("little_endian", True):
        raise ValueError("big-endian PyTorch checkpoints are not supported")
    state = _RestrictedUnpickler(f).load()
    keys = _RestrictedUnpickler(f).load()
    dtypes = {ref.key: ref.dtype for ref in state.values()}
    storages = {}
    for key in keys:
        count = int(np.frombuffer(f.read(8), "<i8")[0])
        dtype = np.dtype(dtypes[key]).newbyteorder("<")
        storages[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype)
    return {name: _strided(storages[ref.key], ref) for name, ref in state.items()}


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict of tensors into numpy arrays, without PyTorch.

    Parameters
    ----------
    path : str or path-like
        A ``torch.save``'d ``OrderedDict`` of tensors in the legacy (torch < 1.6) format.

    Returns
    -------
    dict of str to numpy.ndarray
        Every entry, in the file's order, with the tensor's shape and dtype.

    """
    with Path(path).open("rb") as f:
        if f.read(4) == b"PK\x03\x04":
            # torch >= 1.6 writes a zip (data.pkl + data/<key>); the shipped file is older.
            raise ValueError(f"{path}: zip-format PyTorch checkpoints are not supported")
        f.seek(0)
        return _read_legacy(f)
