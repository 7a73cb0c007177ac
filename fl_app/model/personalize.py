"""Personalisation: a copy of the global head fine-tuned on a node's own training split.

With ``personalize-epochs`` a node's evaluation also scores this copy on its
validation split, so the server sees how far local fine-tuning would take each node.
"""

from __future__ import annotations

from logging import INFO

import keras
from flwr.common import log

from fl_app.data import NodeData
from fl_app.data.batches import Batches, fit_seeded
from fl_app.model import node_models
from fl_app.model.classifier import load_part, reset_optimizer
from fl_app.model.features import cached_split
from fl_app.model.node_inputs import NodeInputs


def personalize(inputs: NodeInputs, data: NodeData, seed: int) -> tuple[float, float] | None:
    """Fine-tune a copy of the global head on the train split; score it on the val split.

    Trains for ``personalize-epochs`` at the run's head ``learning-rate`` on pooled
    features, and leaves the global model and the cache as they were.

    Parameters
    ----------
    inputs : NodeInputs
        The received weights, the models' shape, the run config and the node's cache.
    data : NodeData
        The node's training and validation splits.
    seed : int
        The round's seed (`fl_app.client_task.round_seed`).

    Returns
    -------
    tuple of float or None
        ``(loss, accuracy)`` on the readable validation examples; ``None`` when the
        node has no readable training example.
    """
    config = inputs.config
    train = cached_split(inputs.pooled_features(data.train), data.train)
    val = cached_split(inputs.pooled_features(data.val), data.val)
    if not len(train) or not len(val):
        log(INFO, "personalize-epochs: no readable training example, nothing to personalise")
        return None
    head = node_models.personal_head(config.backbone, inputs.shape.num_classes)
    load_part(head, inputs.received.arrays)
    reset_optimizer(head, config.learning_rate)
    keras.utils.set_random_seed(seed)
    fit_seeded(head, train, config.batch_size, seed, config.personalize_epochs)
    loss, accuracy = head.evaluate(Batches(val, config.batch_size), verbose=0)
    return float(loss), float(accuracy)
