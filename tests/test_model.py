"""The ResNet50 transfer model: architecture, phases, preprocessing, weight exchange."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from keras.applications import resnet50

from fl_app.backbones import RESNET50
from fl_app.model.classifier import (
    STEPS_PER_EXECUTION,
    ImagePreprocessing,
    build_head,
    build_model,
    compile_model,
    load_arrayrecord,
    reset_optimizer,
    set_phase,
    to_arrayrecord,
    trainable_parameter_count,
    with_augmentation,
)
from fl_app.schedule import FINE_TUNE, HEAD

CONV5 = RESNET50.cut.fine_tune_layers

NUM_CLASSES = 10
HEAD_PARAMS = 2048 * 128 + 128 + 128 * NUM_CLASSES + NUM_CLASSES


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return build_model(NUM_CLASSES, (28, 28, 1), input_size=32)


def _numpy(variable) -> np.ndarray:
    return np.array(variable.numpy())


def test_architecture_is_resnet50_then_pool_dense128_softmax(model):
    names = [layer.name for layer in model.layers]
    assert names == [
        "image",
        "preprocessing",
        RESNET50.name,
        "avg_pool",
        "head_dense",
        "predictions",
    ]
    base = model.get_layer(RESNET50.name)
    assert len(base.layers) == RESNET50.layers
    assert base.layers[-CONV5].name == "conv5_block1_1_conv"
    assert base.count_params() == 23_587_712  # ResNet50 without top
    assert model.get_layer("head_dense").units == 128
    assert model.get_layer("head_dense").activation is keras.activations.relu
    assert model.get_layer("predictions").activation is keras.activations.softmax
    assert model.input.dtype == "uint8"
    assert model.output.shape == (None, NUM_CLASSES)


def test_trainable_parameters_per_phase(model):
    base = model.get_layer(RESNET50.name)
    conv5_convs = [
        layer for layer in base.layers[-CONV5:] if isinstance(layer, keras.layers.Conv2D)
    ]
    conv5_conv_params = sum(layer.count_params() for layer in conv5_convs)
    assert len(conv5_convs) == 10  # 3 blocks x 3 convs + 1 projection shortcut

    set_phase(model, HEAD, CONV5)
    assert trainable_parameter_count(model) == HEAD_PARAMS
    assert set_phase(model, FINE_TUNE, CONV5) is True
    assert trainable_parameter_count(model) == HEAD_PARAMS + conv5_conv_params
    assert not any(
        layer.trainable
        for layer in base.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    assert set_phase(model, FINE_TUNE, CONV5) is False  # no change, no recompile
    assert set_phase(model, HEAD, CONV5) is True
    assert trainable_parameter_count(model) == HEAD_PARAMS
    with pytest.raises(ValueError, match="phase='warmup' is not one of head, fine-tune"):
        set_phase(model, "warmup", CONV5)
    with pytest.raises(ValueError, match="fine-tune-layers=500 is out of range"):
        set_phase(model, FINE_TUNE, 500)


def test_fine_tune_trains_conv5_only_and_keeps_batchnorm_statistics():
    model = build_model(NUM_CLASSES, (28, 28, 1), input_size=32)
    set_phase(model, FINE_TUNE, CONV5)
    compile_model(model, 1e-3)
    base = model.get_layer(RESNET50.name)
    watched = {
        "conv5": base.get_layer("conv5_block3_3_conv").kernel,
        "conv4": base.get_layer("conv4_block6_3_conv").kernel,
        "bn5 mean": base.get_layer("conv5_block3_3_bn").moving_mean,
        "head": model.get_layer("head_dense").kernel,
    }
    before = {k: _numpy(v).copy() for k, v in watched.items()}
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)
    model.fit(x, rng.integers(0, NUM_CLASSES, 64), batch_size=32, verbose=0)
    changed = {k: not np.array_equal(before[k], _numpy(v)) for k, v in watched.items()}
    assert changed == {"conv5": True, "conv4": False, "bn5 mean": False, "head": True}

    reset_optimizer(model, 5e-5)
    optimizer = model.optimizer
    assert float(_numpy(optimizer.learning_rate)) == pytest.approx(5e-5)
    assert int(_numpy(optimizer.iterations)) == 0
    moments = [v for v in optimizer.variables if "momentum" in v.path or "velocity" in v.path]
    assert moments and all(not _numpy(v).any() for v in moments)


def test_preprocessing_resizes_grey_to_rgb_and_applies_resnet50_normalisation():
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    out = keras.ops.convert_to_numpy(ImagePreprocessing(40)(grey))
    rgb = np.repeat(grey.astype(np.float32), 3, axis=-1)
    resized = keras.ops.convert_to_numpy(keras.ops.image.resize(rgb, (40, 40)))
    expected = resnet50.preprocess_input(resized.copy())
    assert out.shape == (2, 40, 40, 3)
    np.testing.assert_allclose(out, expected, atol=1e-3)


def test_input_size_below_32_is_refused():
    with pytest.raises(ValueError, match="input-size=16 is too small"):
        build_model(NUM_CLASSES, (28, 28, 1), input_size=16)


def test_weights_round_trip_through_arrayrecord_and_bytes(model):
    record = to_arrayrecord(model)
    assert list(record.keys()) == [v.path for v in model.weights]
    assert len(set(record.keys())) == len(model.weights)
    # Through the wire format Flower uses (serialised numpy bytes per Array).
    other = build_model(NUM_CLASSES, (28, 28, 1), input_size=32)
    load_arrayrecord(other, record)
    for a, b in zip(model.get_weights(), other.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(2).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    np.testing.assert_allclose(model.predict(x, verbose=0), other.predict(x, verbose=0), atol=1e-6)

    del record[next(iter(record.keys()))]
    with pytest.raises(ValueError, match="arrays do not match the model: missing"):
        load_arrayrecord(other, record)


def test_saved_model_loads_with_its_preprocessing(model, tmp_path):
    compile_model(model, 1e-3)
    path = tmp_path / "model.keras"
    model.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = keras.saving.load_model(path)
    x = np.random.default_rng(3).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_augmentation_acts_in_training_only_and_trains_the_same_weights(model):
    images = np.random.default_rng(0).integers(0, 255, (4, 28, 28, 1), dtype=np.uint8)
    augmented = with_augmentation(model, "flip-shift")

    np.testing.assert_allclose(augmented(images, training=False), model(images), rtol=1e-6)
    np.testing.assert_allclose(augmented.predict(images, verbose=0), model(images), rtol=1e-5)
    keras.utils.set_random_seed(1)
    assert not np.allclose(augmented(images, training=True), model(images))
    assert {id(v) for v in augmented.weights} == {id(v) for v in model.weights}
    with pytest.raises(ValueError, match="augmentation='rotate' is not one of shift, flip-shift"):
        with_augmentation(model, "rotate")


def test_several_steps_per_call_train_the_same_weights_as_one():
    # 70 rows at batch 32: 3 steps, fewer than one call's STEPS_PER_EXECUTION.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((70, 64)).astype("float32")
    y = rng.integers(0, 3, 70)
    trained = []
    for steps in (STEPS_PER_EXECUTION, 1):
        keras.utils.set_random_seed(1)
        head = build_head(3, 64)
        compile_model(head, 1e-2)
        if steps == 1:
            head.compile(
                optimizer=head.optimizer,
                loss=head.loss,
                metrics=["accuracy"],
                steps_per_execution=1,
            )
        assert head.steps_per_execution == steps
        head.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
        trained.append([w.numpy() for w in head.weights])
    for several, one in zip(*trained, strict=True):
        np.testing.assert_array_equal(several, one)
