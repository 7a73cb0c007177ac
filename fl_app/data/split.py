"""Labelled images read by rows: in-memory arrays, image files or a Hugging Face table.

A `Split` is some rows of a `Source`. Nothing reads all its images at once:
training, evaluation and the activation cache read a batch of rows at a time
(`fl_app.data.batches`), so a node's memory is bounded by the batch, not by its
dataset. Images come out ``uint8``, ``(rows, height, width, channels)``; the
model does the rest of the preprocessing.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import numpy as np


class Source(Protocol):
    """Images and their global class indices, readable by row."""

    labels: np.ndarray
    image_shape: tuple[int, int, int]
    # Rows whose image could not be decoded so far (a warning named each once).
    failed: set[int]

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The images of ``rows`` that decode, and a mask of which rows did."""
        ...

    def digest(self, rows: np.ndarray) -> str:
        """A digest of everything the images of ``rows`` depend on (for cache keys)."""
        ...


class ArraySource:
    """Arrays already in memory: images (built-in datasets, ``partition.npz``) or activations.

    Images without a channel axis get one.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x = x[..., None] if x.ndim == 3 else x
        self.labels = np.asarray(y, np.int64).reshape(-1)
        self.image_shape = tuple(self.x.shape[1:])
        self.failed: set[int] = set()

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The images of ``rows``; in-memory images always decode."""
        return self.x[rows], np.ones(len(rows), bool)

    def digest(self, rows: np.ndarray) -> str:
        """A digest of the images' bytes, shape and dtype."""
        digest = hashlib.blake2b(digest_size=20)
        images = np.ascontiguousarray(self.x[rows])
        digest.update(f"arrays|{images.dtype}|{images.shape}".encode())
        digest.update(images.data)
        return digest.hexdigest()


class Split:
    """Some rows of a source: a node's training or validation set, a test set.

    Parameters
    ----------
    source : Source
        Where the images and labels are.
    rows : numpy.ndarray, optional
        Which of the source's rows, in order (default: all).
    """

    def __init__(self, source: Source, rows: np.ndarray | None = None) -> None:
        self.source = source
        self.rows = np.arange(len(source.labels)) if rows is None else np.asarray(rows, np.int64)
        self._digest: str | None = None

    @classmethod
    def of_arrays(cls, x: np.ndarray, y: np.ndarray) -> Split:
        """All of an in-memory array (images or cached activations) and its labels."""
        return cls(ArraySource(x, y))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def y(self) -> np.ndarray:
        """The labels, as global class indices."""
        return self.source.labels[self.rows]

    @property
    def x(self) -> np.ndarray:
        """Every image that decodes, as one array: for small splits only (tests, tools)."""
        images, _ = self.source.read(self.rows)
        return images

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(height, width, channels)`` of every image read."""
        return self.source.image_shape

    @property
    def skipped(self) -> int:
        """How many of these rows failed to decode so far."""
        return int(np.isin(self.rows, list(self.source.failed)).sum()) if self.source.failed else 0

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images at ``positions`` (indices into this split) that decode, and the mask."""
        return self.source.read(self.rows[positions])

    def take(self, positions: np.ndarray) -> Split:
        """The split of the rows at ``positions``."""
        return Split(self.source, self.rows[positions])

    def digest(self) -> str:
        """A digest of these images (computed once): part of activation-cache keys."""
        if self._digest is None:
            self._digest = self.source.digest(self.rows)
        return self._digest
