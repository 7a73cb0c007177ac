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
    """``(images, labels)`` batches of a split, in a seeded order per epoch when seeded.

    Images that do not decode are left out of their batch (each is warned about
    once); a batch with none left is an error. Train on seeded batches with
    `fit_seeded`, which keeps each epoch's order to ``(shuffle_seed, epoch)``.
    """

    def __init__(
        self, split: Split, batch_size: int, shuffle_seed: int | None = None, labels: bool = True
    ) -> None:
        super().__init__()
        self.split, self.batch_size, self.labels = split, batch_size, labels
        self._seed = shuffle_seed
        self.set_epoch(0)

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

    def set_epoch(self, epoch: int) -> None:
        """Order the batches as epoch ``epoch`` (0-based) of the seed; unseeded: as stored."""
        n = len(self.split)
        if self._seed is None:
            self._order = np.arange(n)
        else:
            self._order = np.random.default_rng([self._seed, epoch]).permutation(n)


def fit_seeded(
    model: keras.Model, split: Split, batch_size: int, seed: int, epochs: int
) -> keras.callbacks.History:
    """``model.fit`` on ``split`` with epoch ``e``'s order drawn from ``(seed, e)`` alone.

    Keras' own shuffle draws the batch order from Python's global ``random``, and the
    JAX trainer's first ``fit`` of a model reads an extra epoch to build it (one more
    ``on_epoch_end``): either would make a node's result depend on what its process
    trained before. So Keras does not shuffle, and a callback sets each epoch's order.
    """
    batches = Batches(split, batch_size, shuffle_seed=seed)
    order = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs=None: batches.set_epoch(epoch)
    )
    return model.fit(batches, epochs=epochs, verbose=0, shuffle=False, callbacks=[order])


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
