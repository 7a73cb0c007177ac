"""The server's centralised evaluation, on cached activations of its test set.

Every round the server scores the new global model on the whole test set. In the
head phase the backbone does not change, so the test images' pooled features are
the same every round; while conv5 fine-tunes, conv4's output is. The evaluation
keeps those activations, keyed by a digest of the frozen layers' weights, and runs
only what lies after them: a head-phase round scores 10,000 images with two Dense
layers. It is exact: the same batches through the same layers under the same
weights (``tests/test_evaluation.py`` checks the metrics against the full model's).

Which boundary to keep is read off the weights themselves: the deepest boundary
whose frozen part did not change since the last evaluation. Weights that change
everywhere (``exchange=full`` with a lossy compression, say) are evaluated through
the whole model, as are activations that would not fit ``max_bytes``.
"""

from __future__ import annotations

from logging import INFO

import keras
import numpy as np
from flwr.app import ArrayRecord, MetricRecord
from flwr.common import log

from fl_app.backbones import BACKBONES
from fl_app.data.batches import Batches
from fl_app.data.split import Split
from fl_app.model.classifier import (
    build_head,
    compile_model,
    feature_extractor,
    load_arrayrecord,
    load_part,
    split_at,
)
from fl_app.model.features import (
    POOLED,
    boundaries,
    cached_split,
    frozen_digest,
    frozen_keys,
    predict_within,
)


class CentralEvaluation:
    """``evaluate_fn`` of the strategy: test loss and accuracy of each round's global model.

    Parameters
    ----------
    model : keras.Model
        The server's compiled model; each call loads the round's arrays into it.
    test : Split
        The server's test set.
    batch_size : int
        Batch size of the evaluation.
    backbone : str
        The model's backbone, which says where the frozen part may end.
    max_bytes : int
        Most memory the cached activations may take (0: no cache, every round runs
        the whole model).
    """

    def __init__(
        self, model: keras.Model, test: Split, batch_size: int, backbone: str, max_bytes: int
    ) -> None:
        self.model = model
        self.test = test
        self.batch_size = batch_size
        self.backbone = backbone
        self.max_bytes = max_bytes
        self.boundaries = boundaries(backbone)
        # The frozen-part digest of each boundary at the last evaluation that missed.
        self._last: dict[str, str] = {}
        # (boundary, digest, activations as a split) of the one boundary kept.
        self._kept: tuple[str, str, Split] | None = None
        self._parts: dict[str, tuple[keras.Model, keras.Model]] = {}
        # Passes of the test images through the frozen part, by boundary: what the cache saves.
        self.frozen_passes: dict[str, int] = {}

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Score ``arrays`` on the test set."""
        del server_round
        load_arrayrecord(self.model, arrays)
        model, inputs = self.model, self.test
        kept = self._kept
        # A hit hashes only the kept boundary's weights: the others matter only on a miss.
        if kept is not None and self._digest(arrays, kept[0]) == kept[1]:
            model, inputs = self._back(kept[0], arrays), kept[2]
        elif self.max_bytes > 0:
            digests = {b: self._digest(arrays, b) for b in self.boundaries}
            boundary = self._stable(digests)
            if boundary is not None:
                activations = self._compute(boundary)
                if activations is not None:
                    inputs = cached_split(activations, self.test)
                    self._kept = (boundary, digests[boundary], inputs)
                    model = self._back(boundary, arrays)
            self._last = digests
        loss, accuracy = model.evaluate(Batches(inputs, self.batch_size), verbose=0)
        return MetricRecord({"loss": float(loss), "accuracy": float(accuracy)})

    def _digest(self, arrays: ArrayRecord, boundary: str) -> str:
        return frozen_digest(arrays, frozen_keys(arrays, boundary, self.backbone))

    def _stable(self, digests: dict[str, str]) -> str | None:
        """The deepest boundary whose frozen part did not change since the last miss.

        Between misses the kept boundary's part did not change, nor did the parts
        before it. The first evaluation has nothing to compare with: training starts in
        the head phase, so the pooled features are the ones to keep.
        """
        if not self._last:
            return POOLED
        return next((b for b in self.boundaries if self._last.get(b) == digests[b]), None)

    def _front_back(self, boundary: str) -> tuple[keras.Model, keras.Model]:
        """The model cut at ``boundary``: the frozen part, and what comes after it."""
        if boundary not in self._parts:
            if boundary == POOLED:
                head = build_head(self.model.output.shape[-1], BACKBONES[self.backbone].features)
                parts = (feature_extractor(self.model), head)
            else:
                cut = BACKBONES[self.backbone].cut
                assert cut is not None and cut.layer == boundary
                parts = split_at(self.model, cut)
            compile_model(parts[1], 0.0)
            self._parts[boundary] = parts
        return self._parts[boundary]

    def _back(self, boundary: str, arrays: ArrayRecord) -> keras.Model:
        back = self._front_back(boundary)[1]
        # The head has its own variables (the cut shares the model's): set them.
        return load_part(back, arrays) if boundary == POOLED else back

    def _compute(self, boundary: str) -> np.ndarray | None:
        """The test set's activations at ``boundary``; ``None`` when they would not fit."""
        front = self._front_back(boundary)[0]
        activations = predict_within(front, self.test, self.batch_size, self.max_bytes, boundary)
        if activations is not None:
            self.frozen_passes[boundary] = self.frozen_passes.get(boundary, 0) + 1
            log(INFO, "Server evaluation: the test set's activations at %s kept", boundary)
        return activations
