"""EfficientNet-Lite0: the checkpoint reader, the conversion (real photos), the backbone."""

from __future__ import annotations

import io
import pickle
import random
import sys
import warnings
from dataclasses import replace

import keras
import numpy as np
import pytest
import skimage.data

from fl_app.backbones import EFFICIENTNET_LITE0
from fl_app.config import RunConfig
from fl_app.model import efficientnet_lite_weights, torch_checkpoint
from fl_app.model.classifier import (
    ImagePreprocessing,
    backbone_of,
    build_model,
    compile_model,
    feature_extractor,
    load_arrayrecord,
    set_phase,
    to_arrayrecord,
    trainable_parameter_count,
)
from fl_app.model.efficientnet_lite import EfficientNetLite0
from fl_app.model.efficientnet_lite_weights import checkpoint_path, imagenet_weights_file
from fl_app.model.initial import initial_model
from fl_app.model.torch_checkpoint import read_torch_state_dict
from fl_app.schedule import FINE_TUNE, HEAD

NUM_CLASSES = 10
LITE0 = EFFICIENTNET_LITE0.name
LITE0_CONFIG = RunConfig(backbone=LITE0, strict_weights=True)
HEAD_PARAMS = 1280 * 128 + 128 + 128 * NUM_CLASSES + NUM_CLASSES
# ImageNet classes: tabby, tiger cat, Persian, Siamese, Egyptian cat; espresso, cup, mug.
CATS = {281, 282, 283, 284, 285}
COFFEE = {967, 968, 504}


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    return read_torch_state_dict(checkpoint_path())


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return build_model(NUM_CLASSES, (28, 28, 1), 32, None, LITE0)


def _imagenet_classifier(weights: str | None) -> keras.Model:
    """uint8 photo -> the model's own preprocessing -> Lite0 with its 1000-class top."""
    inputs = keras.Input((None, None, 3), dtype="uint8")
    x = ImagePreprocessing(224, LITE0)(inputs)
    return keras.Model(inputs, EfficientNetLite0(include_top=True, weights=weights)(x))


def _top5(classifier: keras.Model, photo: np.ndarray) -> list[int]:
    probabilities = classifier.predict(photo[None], verbose=0)[0]
    return [int(i) for i in np.argsort(probabilities)[::-1][:5]]


def test_the_checkpoint_reads_into_numpy_without_torch(state):
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    assert all(np.isfinite(v).all() for v in state.values())
    # BatchNorm variances are positive; trained weights are not all alike.
    assert (state["_bn1.running_var"] > 0).all()
    assert state["_conv_head.weight"].std() > 0.01
    assert "torch" not in sys.modules  # read without PyTorch


def test_the_unpickler_refuses_anything_but_tensors():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle builtins\.print"):
        torch_checkpoint._RestrictedUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()


def test_converted_imagenet_classifier_labels_real_photos(tmp_path, monkeypatch):
    monkeypatch.setenv("FL_APP_CACHE_DIR", str(tmp_path))
    pretrained = _imagenet_classifier("imagenet")
    # The conversion ran once, into the cache, and is what the model loaded.
    assert imagenet_weights_file(include_top=True).parent == tmp_path / "weights"
    assert imagenet_weights_file(include_top=True).is_file()

    cat, coffee = skimage.data.chelsea(), skimage.data.coffee()
    assert _top5(pretrained, cat)[0] in CATS
    assert _top5(pretrained, coffee)[0] in COFFEE
    assert set(_top5(pretrained, cat)[:3]) <= CATS  # tabby, tiger cat, Egyptian cat
    # The same architecture without the weights knows neither photo.
    keras.utils.set_random_seed(0)
    random = _imagenet_classifier(None)
    assert _top5(random, cat)[0] not in CATS or _top5(random, coffee)[0] not in COFFEE


def test_architecture_and_parameter_counts(state):
    keras.utils.set_random_seed(0)
    top = EfficientNetLite0(include_top=True, input_shape=(224, 224, 3))
    notop = EfficientNetLite0(include_top=False, input_shape=(224, 224, 3))
    assert top.count_params() == 4_694_024  # 4.65M trainable + BatchNorm statistics
    assert notop.count_params() == 3_413_024
    assert sum(np.prod(v.shape) for v in top.trainable_weights) == 4_652_008
    assert notop.output.shape == (None, 7, 7, 1280)
    assert len(notop.layers) == EFFICIENTNET_LITE0.layers
    # Lite: ReLU6 everywhere, no squeeze-excite, 16 MBConv blocks.
    activations = [layer for layer in notop.layers if isinstance(layer, keras.layers.ReLU)]
    assert activations and all(float(layer.max_value) == 6.0 for layer in activations)
    assert not any("se_" in layer.name for layer in notop.layers)
    assert len([lyr for lyr in notop.layers if "dwconv" in lyr.name]) == 16
    # Every checkpoint weight has a Keras variable of its size (num_batches_tracked aside).
    checkpoint = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert checkpoint == top.count_params()


def test_backbone_in_the_classifier(model):
    names = [layer.name for layer in model.layers]
    assert names == [
        "image",
        "preprocessing",
        LITE0,
        "avg_pool",
        "head_dense",
        "predictions",
    ]
    assert backbone_of(model).count_params() == 3_413_024
    assert feature_extractor(model).output.shape == (None, 1280)
    assert model.output.shape == (None, NUM_CLASSES)


def test_phases_train_the_head_then_the_last_layers_with_batchnorm_frozen(model):
    base = backbone_of(model)
    set_phase(model, HEAD, 32)
    assert trainable_parameter_count(model) == HEAD_PARAMS
    assert set_phase(model, FINE_TUNE, 32) is True
    last = base.layers[-32:]
    assert last[0].name == "block6b_project_conv" and last[-1].name == "top_activation"
    expected = sum(
        np.prod(v.shape)
        for layer in last
        if not isinstance(layer, keras.layers.BatchNormalization)
        for v in layer.trainable_weights
    )
    assert trainable_parameter_count(model) == HEAD_PARAMS + expected
    assert not any(
        layer.trainable
        for layer in base.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    # Fine-tuning trains what is unfrozen and leaves BatchNorm statistics alone.
    compile_model(model, 1e-3)
    watched = {
        "top conv": base.get_layer("top_conv").kernel,
        "stem conv": base.get_layer("stem_conv").kernel,
        "top bn mean": base.get_layer("top_bn").moving_mean,
    }
    before = {k: np.array(v.numpy()) for k, v in watched.items()}
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 28, 28, 1), dtype=np.uint8)
    model.fit(x, rng.integers(0, NUM_CLASSES, 32), batch_size=16, verbose=0)
    changed = {k: not np.array_equal(before[k], np.array(v.numpy())) for k, v in watched.items()}
    assert changed == {"top conv": True, "stem conv": False, "top bn mean": False}
    with pytest.raises(ValueError, match=r"0\.\.141 layers in efficientnet_lite0"):
        set_phase(model, FINE_TUNE, 142)
    set_phase(model, HEAD, 32)


def test_preprocessing_normalises_as_lite0_expects_and_old_configs_stay_resnet50():
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    out = keras.ops.convert_to_numpy(ImagePreprocessing(40, LITE0)(grey))
    rgb = np.repeat(grey.astype(np.float32), 3, axis=-1)
    resized = keras.ops.convert_to_numpy(keras.ops.image.resize(rgb, (40, 40)))
    np.testing.assert_allclose(out, (resized - 127.0) / 128.0, atol=1e-5)
    # A ResNet50 model saved before the layer had a backbone argument.
    old = ImagePreprocessing.from_config({"name": "preprocessing", "size": 40, "trainable": True})
    assert old.backbone == "resnet50"
    with pytest.raises(ValueError, match="backbone='vgg' is not one of"):
        ImagePreprocessing(40, "vgg")


def test_imagenet_weights_through_build_model_and_a_saved_lite0_model(tmp_path):
    pretrained = build_model(NUM_CLASSES, (28, 28, 1), 32, "imagenet", LITE0)
    converted = efficientnet_lite_weights.convert_checkpoint(checkpoint_path(), include_top=False)
    for a, b in zip(backbone_of(pretrained).get_weights(), converted.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)

    compile_model(pretrained, 1e-3)
    path = tmp_path / "lite0.keras"
    pretrained.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = keras.saving.load_model(path)
    x = np.random.default_rng(3).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), pretrained.predict(x, verbose=0), atol=1e-6
    )
    # Nodes build the bare architecture and take every weight from the server.
    node = build_model(NUM_CLASSES, (28, 28, 1), 32, None, LITE0)
    load_arrayrecord(node, to_arrayrecord(pretrained))
    np.testing.assert_allclose(
        node.predict(x, verbose=0), pretrained.predict(x, verbose=0), atol=1e-6
    )


def test_the_server_starts_lite0_from_imagenet_even_when_strict(state):
    model, init = initial_model(LITE0_CONFIG, (28, 28, 1), 10)
    assert init == "imagenet"
    stem = backbone_of(model).get_layer("stem_conv").kernel.numpy()
    np.testing.assert_array_equal(stem, state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    _, init = initial_model(replace(LITE0_CONFIG, weights="none"), (28, 28, 1), 10)
    assert init == "random"


def test_the_servers_start_repeats_whether_or_not_the_weights_were_converted_before(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("FL_APP_CACHE_DIR", str(tmp_path))
    converting, _ = initial_model(LITE0_CONFIG, (28, 28, 1), 10)
    assert list((tmp_path / "weights").glob("*.weights.h5"))
    random.random()  # other code drawing in between changes nothing either
    converted, _ = initial_model(LITE0_CONFIG, (28, 28, 1), 10)

    for a, b in zip(converting.weights, converted.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_a_random_lite0_still_tells_images_apart(model):
    # With BatchNorm frozen at identity statistics, Keras' default initialiser made every
    # image's features ~1e-13: a random-init baseline that could learn nothing.
    x = np.random.default_rng(4).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
    features = feature_extractor(model).predict(x, verbose=0)
    assert features.std(axis=0).mean() > 1e-3
