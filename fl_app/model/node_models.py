"""The Keras models a node's process holds for a `Shape`, built and compiled once.

They are reused across rounds and (in simulation) across the virtual nodes a
process serves: a rebuild would retrace the training step, ~21 s for a full
ResNet50. Every model but the lone heads shares the full classifier's layers and
weights: the part before the frozen boundary (``front``), what trains after it
(``back``), the classifier behind augmentation, and the FedProx wrappers.
"""

from __future__ import annotations

import functools
import weakref
from typing import NamedTuple

import keras
from flwr.app import ArrayRecord

from fl_app.backbones import BACKBONES
from fl_app.model.classifier import (
    build_head,
    build_model,
    compile_model,
    feature_extractor,
    load_arrayrecord,
    pooling_part,
    reset_optimizer,
    set_phase,
    split_at,
    with_augmentation,
)
from fl_app.model.features import POOLED
from fl_app.model.proximal import Proximal


class Shape(NamedTuple):
    """What the models depend on; the key of every model cached here."""

    image_shape: tuple[int, ...]
    input_size: int
    backbone: str
    num_classes: int


@functools.cache
def _model(shape: Shape) -> keras.Model:
    # Architecture only: the server sends the weights, so nodes never download any.
    return build_model(shape.num_classes, shape.image_shape, shape.input_size, None, shape.backbone)


def global_model(arrays: ArrayRecord, shape: Shape) -> keras.Model:
    """The full classifier, holding ``arrays`` (every variable of it)."""
    model = _model(shape)
    load_arrayrecord(model, arrays)
    return model


@functools.cache
def _split(shape: Shape) -> tuple[keras.Model, keras.Model]:
    cut = BACKBONES[shape.backbone].cut
    assert cut is not None  # only backbones with a cut offer its boundary
    return split_at(_model(shape), cut)


def front(boundary: str, shape: Shape) -> keras.Model:
    """The frozen part up to ``boundary``: images in, activations out."""
    return extractor(shape) if boundary == POOLED else _split(shape)[0]


def back(boundary: str, shape: Shape) -> keras.Model:
    """What trains after ``boundary``; the head alone needs no backbone built."""
    return head(shape.backbone, shape.num_classes) if boundary == POOLED else _split(shape)[1]


@functools.cache
def augmented(shape: Shape, augmentation: str) -> keras.Model:
    """The classifier behind the random ``augmentation`` (training only)."""
    return with_augmentation(_model(shape), augmentation)


@functools.cache
def extractor(shape: Shape) -> keras.Model:
    """Images to pooled features: the classifier up to the head."""
    return feature_extractor(_model(shape))


@functools.cache
def head(backbone: str, num_classes: int) -> keras.Model:
    """The global head alone, on pooled features: what trains in the head phase."""
    model = build_head(num_classes, BACKBONES[backbone].features)
    compile_model(model, 1e-3)  # always fully trainable: compiled once
    return model


@functools.cache
def personal_head(backbone: str, num_classes: int) -> keras.Model:
    """A head with its own variables, for `fl_app.model.personalize`."""
    # Its own variables: personalising must leave the global head, which evaluation
    # and the next round's training reuse, as it came.
    model = build_head(num_classes, BACKBONES[backbone].features)
    compile_model(model, 1e-3)
    return model


@functools.cache
def pooling(shape: Shape) -> keras.Model:
    """Cut activations to pooled features: conv5 and pooling under the loaded weights."""
    return pooling_part(_split(shape)[1])


@functools.cache
def _proximal(model: keras.Model, trainable: tuple[str, ...]) -> Proximal:
    # Keyed by what trains too: the term covers the variables trainable at wrapping.
    del trainable
    return Proximal(model)


# The trainable variables each model was last compiled for. The models share the
# backbone's layers, so a phase change that one of them saw (set_phase) leaves the
# others' compiled train step updating the old set.
_compiled_for: weakref.WeakKeyDictionary[keras.Model, tuple[str, ...]] = weakref.WeakKeyDictionary()


def _trainable_paths(model: keras.Model) -> tuple[str, ...]:
    return tuple(variable.path for variable in model.trainable_variables)


def _compiled(model: keras.Model, learning_rate: float) -> keras.Model:
    """``model``, compiled for the variables that train now (compiling retraces: only then)."""
    trainable = _trainable_paths(model)
    if not model.compiled or _compiled_for.get(model) != trainable:
        compile_model(model, learning_rate)
        _compiled_for[model] = trainable
    return model


def trainer(
    model: keras.Model,
    shape: Shape,
    boundary: str | None,
    phase: str,
    fine_tune_layers: int,
    learning_rate: float,
    mu: float,
) -> keras.Model:
    """What fits ``model`` this round: set to ``phase``, compiled, with a fresh optimizer.

    Parameters
    ----------
    model : keras.Model
        One of this module's models: `back` of ``boundary``, or the full classifier
        (``boundary`` ``None``), possibly `augmented`.
    shape : Shape
        The models' shape.
    boundary : str or None
        Where the cached activations ``model`` takes end; ``None`` for images.
    phase : str
        The round's phase of the transfer schedule.
    fine_tune_layers : int
        The backbone layers that train in the fine-tune phase.
    learning_rate : float
        The round's learning rate.
    mu : float
        FedProx's μ; above 0 the result is ``model``'s `Proximal` wrapper, anchored
        at the weights ``model`` holds now.

    Returns
    -------
    keras.Model
        ``model`` or its wrapper; fitting it trains ``model``.
    """
    # The backbone's layers are shared by every model but the lone head.
    if boundary != POOLED:
        set_phase(_model(shape), phase, fine_tune_layers)
    fitted = model
    if mu > 0:
        # Off at μ = 0: training is then exactly FedAvg's, with no extra model to trace.
        fitted = _proximal(model, _trainable_paths(model))
    _compiled(fitted, learning_rate)
    reset_optimizer(fitted, learning_rate)
    if isinstance(fitted, Proximal):
        fitted.anchor(mu)  # w_global: the weights as received this round
    return fitted
