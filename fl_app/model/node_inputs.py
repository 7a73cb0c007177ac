"""What a node's models take this message: cached activations at a frozen boundary, or images.

Nodes train and evaluate only what lies after the frozen part of the model, on its
cached output (`fl_app.model.features`): the head on pooled features in the head
phase, conv5 and the head on conv4's output when fine-tuning the conv5 block. Both
are exact. `NodeInputs.find` is the one lookup (boundary, then cached activations);
`NodeInputs.back` the model that takes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import keras
import numpy as np
from flwr.app import ArrayRecord

from fl_app.backbones import BACKBONES
from fl_app.config import RunConfig
from fl_app.data.batches import predict_rows, readable
from fl_app.data.split import Split
from fl_app.model import node_models
from fl_app.model.classifier import load_part
from fl_app.model.features import (
    POOLED,
    FeatureCache,
    boundaries,
    feature_key,
    frozen_digest,
    frozen_keys,
    predict_within,
)
from fl_app.model.node_models import Shape
from fl_app.schedule import HEAD


class Received(NamedTuple):
    """The global model as a node received it."""

    # Every variable: what came, laid over the node's stored base if one was named.
    arrays: ArrayRecord
    # What the message itself carried.
    sent: ArrayRecord
    # The hash of the base ``arrays`` was laid over; ``None`` for a full exchange.
    base: str | None


def training_boundary(config: RunConfig, phase: str) -> str | None:
    """Where the frozen part ends this round, if training can start from its output.

    The head phase trains on pooled features; the fine-tune phase only when exactly
    the layers after the backbone's cut train (other cuts leave residual branches
    across the boundary).
    """
    if phase == HEAD:
        return POOLED
    cut = BACKBONES[config.backbone].cut
    if cut is not None and config.fine_tune_layers == cut.fine_tune_layers:
        return cut.layer
    return None


# Digests of the frozen weights of a base, per (base hash, boundary), in this process.
_base_digests: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class NodeInputs:
    """The inputs of the models of `fl_app.model.node_models` under the received weights.

    ``cache`` ``None`` (off, or bypassed) means no boundary is ever found: the models
    take images.
    """

    received: Received
    shape: Shape
    config: RunConfig
    cache: FeatureCache | None

    def find(
        self, split: Split, at: tuple[str, ...], compute: bool = False
    ) -> tuple[str, np.ndarray] | None:
        """The first boundary of ``at`` with activations of ``split``, and those activations.

        From the cache; on a miss they are computed (when ``compute``) a batch at a
        time and stored, unless they would not fit the cache: then that boundary is
        passed over. ``None`` when no boundary has them. Rows of unreadable images
        are NaN.
        """
        for boundary in at if self.cache is not None else ():
            activations = self._activations(split, boundary, compute)
            if activations is not None:
                return boundary, activations
        return None

    def back(self, boundary: str) -> keras.Model:
        """The model that takes the activations at ``boundary``, holding the received weights."""
        return load_part(node_models.back(boundary, self.shape), self.received.arrays)

    def global_model(self) -> keras.Model:
        """The full classifier, holding the received weights: it takes images."""
        return node_models.global_model(self.received.arrays, self.shape)

    def pooled_features(self, split: Split) -> np.ndarray:
        """The head's inputs for ``split`` (NaN rows: unreadable).

        From the cache when training left them there (pooled features in the head phase,
        conv4's output while fine-tuning conv5), else from the images. Nothing is stored:
        in head rounds training stored them already, and in fine-tune rounds they depend
        on conv5, which the next round changes, so storing would only evict useful entries.
        """
        found = self.find(split, boundaries(self.config.backbone))
        if found is not None and found[0] == POOLED:
            return found[1]
        self.global_model()
        if found is None:
            return predict_rows(node_models.extractor(self.shape), split, self.config.batch_size)
        activations = found[1]
        ok = readable(activations)
        pooled = np.full((len(split), BACKBONES[self.config.backbone].features), np.nan, np.float32)
        if ok.any():
            pooled[ok] = node_models.pooling(self.shape).predict(
                activations[ok], batch_size=self.config.batch_size, verbose=0
            )
        return pooled

    def _activations(self, split: Split, boundary: str, compute: bool) -> np.ndarray | None:
        assert self.cache is not None
        frozen = self._frozen_id(boundary)
        key = feature_key(frozen, split.digest(), self.config.input_size, boundary)
        activations = self.cache.get(key)
        if activations is None and compute and len(split):
            self.global_model()
            front = node_models.front(boundary, self.shape)
            activations = predict_within(
                front, split, self.config.batch_size, self.cache.max_bytes, boundary
            )
            if activations is None:
                return None
            self.cache.put(key, activations)
        return activations

    def _frozen_id(self, boundary: str) -> str:
        """A digest of the weights before ``boundary``: what the activations depend on.

        Of those weights alone, not of the base they came in (which holds the head too), so
        runs whose heads start differently (a head from another file, say, or a full exchange
        against a trainable-only one) share a machine's activations.
        When they all came from the base, the digest is computed once per base and process.
        """
        arrays, base = self.received.arrays, self.received.base
        keys = frozen_keys(arrays, boundary, self.config.backbone)
        if base is not None and not any(key in self.received.sent for key in keys):
            if (base, boundary) not in _base_digests:
                _base_digests[base, boundary] = frozen_digest(arrays, keys)
            return _base_digests[base, boundary]
        return frozen_digest(arrays, keys)
