"""Cache of a node's activations at the boundary of the frozen part of the model.

In the head phase only the two Dense layers train, on pooled features the
frozen backbone computes identically every round; in the fine-tune phase (conv5
unfrozen) everything before conv5 is frozen, so its output is fixed too. A node
computes those activations once, keyed by everything that determines them (the
frozen layers' weights, the images, the input size, the boundary, this code's
version), and later rounds train only what lies after the boundary: far less
compute, and in a deployment's fresh ClientApp process a far smaller model to
trace. A changed frozen part or data gives another key, so a stale entry is
never used.

Entries live in memory and on disk: a deployed node starts a new ClientApp
process for every message, and a simulated node is served by whichever Ray actor
is free, so only the disk carries them from one round to the next. Both are
bounded; the least recently used entries go first.
The boundaries and the frozen keys behind them serve the server's evaluation of
its test set too (`fl_app.evaluation`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from logging import INFO

import keras
import numpy as np
from flwr.app import ArrayRecord
from flwr.common import log

from fl_app.backbones import BACKBONES
from fl_app.cache import Codec, Store, digest_arrays
from fl_app.data.batches import predict_rows, readable
from fl_app.data.split import Split
from fl_app.model.classifier import is_head_variable

# Part of every key: bump when preprocessing or the backbone's code changes meaning.
FEATURE_VERSION = f"2/keras-{keras.__version__}"
# Where the frozen part of the model ends in the head phase: after global pooling, at
# the head's inputs. In the fine-tune phase it may end at a backbone's cut
# (`fl_app.backbones.Cut`), named by its layer.
POOLED = "pooled"


def feature_key(frozen: str, images: str, input_size: int, boundary: str = "pooled") -> str:
    """A digest of everything the activations of some images at ``boundary`` depend on.

    ``frozen`` names the weights of the layers before the boundary (``frozen_digest``);
    ``images`` is the images' own digest (`fl_app.data.split.Split.digest`).
    """
    header = f"{FEATURE_VERSION}|{frozen}|{boundary}|{input_size}|{images}"
    return hashlib.blake2b(header.encode(), digest_size=20).hexdigest()


def frozen_digest(arrays: ArrayRecord, frozen_keys: Iterable[str]) -> str:
    """A digest of the named arrays (the frozen layers' weights), in key order."""
    digest = hashlib.blake2b(digest_size=20)
    digest_arrays(digest, arrays, sorted(frozen_keys))
    return digest.hexdigest()


def boundaries(backbone: str) -> tuple[str, ...]:
    """Where the frozen part may end: the pooled features, or the backbone's cut."""
    cut = BACKBONES[backbone].cut
    return (POOLED,) if cut is None else (POOLED, cut.layer)


def frozen_keys(arrays: ArrayRecord, boundary: str, backbone: str) -> list[str]:
    """The arrays of the layers before ``boundary``: what its activations depend on."""
    cut = BACKBONES[backbone].cut
    trained_prefix = cut.prefix if cut is not None and boundary == cut.layer else None
    return [
        key
        for key in arrays
        if not is_head_variable(key)
        and (trained_prefix is None or not key.startswith(trained_prefix))
    ]


def cached_split(activations: np.ndarray, split: Split) -> Split:
    """The activations and labels of the rows whose images were readable, as a split.

    Batched like the images themselves, so training or evaluating on either sees the
    same order.
    """
    ok = readable(activations)
    if ok.all():
        return Split.of_arrays(activations, split.y)
    return Split.of_arrays(activations[ok], split.y[ok])


def predict_within(
    front: keras.Model, split: Split, batch_size: int, max_bytes: int, boundary: str
) -> np.ndarray | None:
    """``front``'s activations of ``split`` (NaN rows: unreadable images), if they fit.

    ``None``, with one log line, when they would take more than ``max_bytes``: the
    caller then runs the images through the whole model.
    """
    size = len(split) * int(np.prod(front.output.shape[1:])) * 4
    if size > max_bytes:
        log(
            INFO,
            "Activations at %s would take %d MB > feature-cache-mb=%d: images go through "
            "the whole model instead",
            boundary,
            size // 2**20,
            max_bytes // 2**20,
        )
        return None
    return predict_rows(front, split, batch_size)


class FeatureCache(Store):
    """Activations (numpy arrays) by `feature_key`, as ``.npy`` files.

    A file that fails its checksum is deleted and is a miss (`fl_app.cache.Store`):
    the activations are computed again.
    """

    codec = Codec(".npy", np.load, np.save, lambda value: value.nbytes)
