"""The server's global model at the start of a run: built, and its weights loaded.

Only the server loads pretrained weights; ClientApps build the bare
architecture and receive every weight from it, so nodes need no internet.
"""

from __future__ import annotations

from logging import WARNING

import keras
from flwr.common import log

from fl_app.backbones import BACKBONES, EFFICIENTNET_LITE0
from fl_app.config import RunConfig
from fl_app.model.classifier import build_model
from fl_app.model.efficientnet_lite_weights import imagenet_weights_file


def initial_model(
    config: RunConfig, image_shape: tuple[int, ...], num_classes: int
) -> tuple[keras.Model, str]:
    """Build the global model and say how its weights started.

    Returns the model and ``"imagenet"``, ``"random"`` or ``"file:<path>"``.
    EfficientNet-Lite0's ImageNet weights come from an installed package (converted
    on first use), so they need no download. What is not loaded (the head, or a
    random start) follows the run's seed, drawn right before the model is built.
    """
    weights, strict, backbone = config.weights, config.strict_weights, config.backbone

    def build(backbone_weights: str | None = None) -> keras.Model:
        if backbone_weights == "imagenet" and backbone == EFFICIENTNET_LITE0.name:
            # Converting the shipped checkpoint on first use builds a model, which draws
            # random numbers: convert before seeding, so the head starts the same
            # whether or not this machine had converted it before.
            imagenet_weights_file()
        keras.utils.set_random_seed(config.seed)
        return build_model(num_classes, image_shape, config.input_size, backbone_weights, backbone)

    if weights == "none":
        return build(), "random"
    if weights == "imagenet":
        try:
            return build("imagenet"), "imagenet"
        except Exception as err:  # keras raises bare Exception when a download fails
            if strict:
                raise RuntimeError(
                    f"weights=imagenet: ImageNet {BACKBONES[backbone].title} weights are "
                    f"unavailable ({err}) and strict-weights=true forbids random initialisation"
                ) from err
            log(
                WARNING,
                "!!! ImageNet weights are unavailable (%s): training starts from RANDOM "
                "initialisation, not transfer learning. %s, pass weights=<file>, or set "
                "strict-weights=true to make this an error.",
                err,
                BACKBONES[backbone].weights_hint,
            )
            return build(), "random"
    path = config.weights_file
    if path.name.endswith((".keras", ".weights.h5")):
        model = build()
        model.load_weights(path)
    else:
        model = build(str(path))
    return model, f"file:{path}"
