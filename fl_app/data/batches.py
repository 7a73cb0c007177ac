"""Keras input of a `Split`: batches read from disk as training and evaluation need them.

A ``keras.utils.PyDataset`` rather than ``tf.data`` or grain: it runs on every Keras
backend (the GPU recipe uses JAX), decodes with the same Pillow code as
`fl_app.data.images` and ``fl-app predict``, and needs no extra dependency.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from fl_app.data.split import Split


class Batches(keras.utils.PyDataset):
    """``(images, labels)`` batches of a split, reshuffled every epoch when seeded.

    Images that do not decode are left out of their batch (each is warned about
    once); a batch with none left is an error.
    """

    def __init__(
        self, split: Split, batch_size: int, shuffle_seed: int | None = None, labels: bool = True
    ) -> None:
        super().__init__()
        self.split, self.batch_size, self.labels = split, batch_size, labels
        self._rng = None if shuffle_seed is None else np.random.default_rng(shuffle_seed)
        self._order = np.arange(len(split))
        self.on_epoch_end()

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def __getitem__(self, index: int):
        positions = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        images, ok = self.split.read(positions)
        if not ok.any():
            raise ValueError(f"none of the {len(positions)} images of batch {index} can be read")
        if not self.labels:
            return images
        return images, self.split.y[positions][ok]

    def on_epoch_end(self) -> None:
        """Draw the next epoch's order."""
        if self._rng is not None:
            self._order = self._rng.permutation(len(self.split))


def predict_rows(model: keras.Model, split: Split, batch_size: int) -> np.ndarray:
    """``model``'s output for every row of ``split``, filled a batch at a time.

    Rows whose image does not decode are NaN: a cached result keeps saying which.
    """
    out: np.ndarray | None = None
    for start in range(0, len(split), batch_size):
        positions = np.arange(start, min(start + batch_size, len(split)))
        images, ok = split.read(positions)
        if not ok.any():
            continue
        result = np.asarray(model.predict_on_batch(images))
        if out is None:
            out = np.full((len(split), *result.shape[1:]), np.nan, result.dtype)
        out[positions[ok]] = result
    if out is None:
        shape = tuple(model.output.shape[1:])
        out = np.full((len(split), *shape), np.nan, np.float32)
    return out


def readable(outputs: np.ndarray) -> np.ndarray:
    """Which rows of a `predict_rows` result came from an image that decoded."""
    return ~np.isnan(outputs.reshape(len(outputs), -1)[:, 0])
