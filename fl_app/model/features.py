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

Entries live in memory (simulation: the Ray actor process serves every round)
and, given a folder, on disk as well (deployment: each message starts a new
ClientApp process). Both are bounded; the least recently used entries go first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import keras
import numpy as np
from flwr.app import ArrayRecord

from fl_app.cache import Codec, Store, digest_arrays

# Part of every key: bump when preprocessing or the backbone's code changes meaning.
FEATURE_VERSION = f"2/keras-{keras.__version__}"


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


class FeatureCache(Store):
    """Activations (numpy arrays) by `feature_key`, as ``.npy`` files.

    A file that fails its checksum is deleted and is a miss (`fl_app.cache.Store`):
    the activations are computed again.
    """

    codec = Codec(".npy", np.load, np.save, lambda value: value.nbytes)
