"""Datasets that Hugging Face ``datasets`` loads: hub ids, parquet and ``save_to_disk`` folders.

Tables stay Arrow files on disk (memory-mapped); rows are read and decoded a
batch at a time. The image and label columns are found by their feature types
(``Image``, ``ClassLabel``) unless named, and labels are mapped to the run's
global class list by name.
"""

from __future__ import annotations

import hashlib
import io
import socket
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fl_app.data.images import read_rows, to_array

HUB_HOST = "huggingface.co"


def hub_address() -> tuple[str, int]:
    """The host and port of the hub the client uses: ``HF_ENDPOINT`` (a mirror), else the hub."""
    from huggingface_hub import constants

    url = urllib.parse.urlsplit(constants.ENDPOINT)
    return url.hostname or HUB_HOST, url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers on its port.

    Behind an HTTPS proxy a direct connection proves nothing (networks with a proxy
    often block it): there the hub client's own request decides.
    """
    host, port = hub_address()
    if urllib.request.getproxies().get("https") and not urllib.request.proxy_bypass(host):
        return True
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_table(kind: str, value: str, key: str) -> Any:
    """A ``datasets.DatasetDict`` of a hub id (``kind="hub"``), parquet or ``save_to_disk`` folder.

    Offline, a hub id not in the local Hugging Face cache fails at once with one line.
    """
    import datasets  # deferred: pulls in pyarrow and pandas

    datasets.logging.set_verbosity_error()
    if kind == "disk":
        loaded = datasets.load_from_disk(str(Path(value).expanduser()))
        return loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    if kind == "parquet":
        return datasets.load_dataset("parquet", data_dir=str(Path(value).expanduser()))
    if not datasets.config.HF_HUB_OFFLINE and not hub_reachable():
        # Without this the hub client retries for ~25 s before failing.
        datasets.config.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(value)
    except ConnectionError as err:
        raise ValueError(
            f"{key}={value!r}: the Hugging Face hub ({hub_address()[0]}) cannot be reached and the "
            "dataset is not in the local Hugging Face cache; offline, pass a folder instead "
            "(an image folder, parquet files or a save_to_disk dataset)"
        ) from err
    except FileNotFoundError as err:
        raise ValueError(f"{key}={value!r} is not a dataset on the Hugging Face hub") from err


def columns(table: Any, image_column: str, label_column: str, key: str) -> tuple[str, str]:
    """The image and label column names: as given, else found by feature type."""
    import datasets

    features = table.features

    def find(given: str, kind: type, what: str, fallback: str) -> str:
        if given:
            if given not in features:
                raise ValueError(
                    f"{what}-column={given!r} is not a column of {key}: its columns are "
                    + ", ".join(features)
                )
            return given
        typed = [name for name, feature in features.items() if isinstance(feature, kind)]
        if len(typed) == 1:
            return typed[0]
        if fallback in features:
            return fallback
        raise ValueError(
            f"{key} has no single {kind.__name__} column: set {what}-column to one of "
            + ", ".join(features)
        )

    return (
        find(image_column, datasets.Image, "image", "image"),
        find(label_column, datasets.ClassLabel, "label", "label"),
    )


def table_classes(table: Any, label_column: str) -> list[str]:
    """The class names a table's label column carries.

    ``ClassLabel`` names; for integer labels, which `global_labels` takes as class
    indices, ``"0"`` up to the largest; else the sorted values.
    """
    feature = table.features[label_column]
    names = getattr(feature, "names", None)
    if names:
        return list(names)
    values = table.unique(label_column)
    if str(getattr(feature, "dtype", "")).startswith(("int", "uint")):
        # Sorted as text, "10" would come before "2" and name index 2's class "10".
        return [str(i) for i in range(max(values, default=-1) + 1)]
    return sorted({str(value) for value in values})


def global_labels(table: Any, label_column: str, classes: Sequence[str], key: str) -> np.ndarray:
    """Each row's index in the run's ``classes``; an unknown label is one error line."""
    # One column as one array: iterating the Column object takes seconds per 50,000 rows.
    values = np.asarray(table.with_format("numpy", columns=[label_column])[:][label_column])
    names = getattr(table.features[label_column], "names", None)
    index = {name: i for i, name in enumerate(classes)}
    if names:
        values = values.astype(np.int64)  # an empty column comes back as floats
        bad = values[(values < 0) | (values >= len(names))]
        if bad.size:
            # Hugging Face marks unlabelled rows -1: as an index it would be the last class.
            raise ValueError(
                f"{key}: column {label_column!r} holds label {int(bad[0])}, outside "
                f"0..{len(names) - 1} (its {len(names)} class names)"
                + ("; -1 marks an unlabelled row" if bad[0] == -1 else "")
            )
        unknown = [name for name in names if name not in index]
        present = set(np.unique(values).tolist())
        unknown = [name for i, name in enumerate(names) if i in present and name in unknown]
        if unknown:
            raise ValueError(
                f"{key}: label {unknown[0]!r} is not a known class; the run's classes are: "
                + ", ".join(classes)
            )
        return np.asarray([index.get(name, -1) for name in names], np.int64)[values]
    if values.dtype.kind in "iu":
        bad = values[(values < 0) | (values >= len(classes))]
        if bad.size:
            raise ValueError(
                f"{key}: column {label_column!r} holds label {int(bad[0])}, outside "
                f"0..{len(classes) - 1} (the run's {len(classes)} classes)"
            )
        return values.astype(np.int64)
    labels = [index.get(str(value), -1) for value in values]
    if -1 in labels:
        value = values[labels.index(-1)]
        raise ValueError(
            f"{key}: label {str(value)!r} is not a known class; the run's classes are: "
            + ", ".join(classes)
        )
    return np.asarray(labels, np.int64)


class TableSource:
    """A Hugging Face table's images, decoded a batch of rows at a time.

    Parameters
    ----------
    table : datasets.Dataset
        The split.
    image_column : str
        Its column of images (an ``Image`` feature, or encoded bytes).
    labels : numpy.ndarray
        Each row's global class index (`global_labels`).
    size : int
        Side of the square images read (the model's ``input-size``).
    """

    def __init__(self, table: Any, image_column: str, labels: np.ndarray, size: int) -> None:
        import datasets

        # Decoded here, per image, so that one corrupt image costs only itself.
        self.table = table.cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column
        self.labels = labels
        self.size = size
        self.image_shape = (size, size, 3)
        self.failed: set[int] = set()

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decode the images of ``rows``; an unreadable one is skipped with one warning."""
        from PIL import Image

        # A null image is skipped as well.
        empty = {"bytes": None, "path": None}
        cells = [c or empty for c in self.table[[int(r) for r in rows]][self.image_column]]

        def decode(i: int) -> np.ndarray:
            cell = cells[i]
            if cell["bytes"] is not None:
                data = cell["bytes"]
            elif cell["path"]:
                data = Path(cell["path"]).read_bytes()
            else:
                raise ValueError("no image")
            with Image.open(io.BytesIO(data)) as image:
                return to_array(image, self.size, 3)

        def name(i: int) -> str:
            cell = cells[i]
            what = cell["path"] or ("bytes" if cell["bytes"] is not None else "null")
            return f"row {int(rows[i])} ({what})"

        return read_rows(rows, decode, name, self.failed, self.image_shape)

    def digest(self, rows: np.ndarray) -> str:
        """A digest of the table's fingerprint, the rows and the decode size."""
        digest = hashlib.blake2b(digest_size=20)
        digest.update(f"table|{self.table._fingerprint}|{self.size}".encode())
        digest.update(np.ascontiguousarray(rows, np.int64).data)
        return digest.hexdigest()
