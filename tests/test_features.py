"""The head-phase feature cache: exact, keyed by what determines it, bounded."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from flwr.app import Array

from fl_app.backbones import RESNET50
from fl_app.data.split import Split
from fl_app.model.classifier import (
    build_head,
    build_model,
    compile_model,
    feature_extractor,
    is_head_variable,
    reset_optimizer,
    set_phase,
    split_at,
    to_arrayrecord,
)
from fl_app.model.features import FeatureCache, feature_key, frozen_digest
from fl_app.schedule import FINE_TUNE, HEAD

NUM_CLASSES = 10


def _train(model, inputs, y, seed=7):
    reset_optimizer(model, 1e-3)
    keras.utils.set_random_seed(seed)
    model.fit(inputs, y, epochs=2, batch_size=16, verbose=0)


def test_training_on_cached_features_equals_training_the_full_model():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)
    y = rng.integers(0, NUM_CLASSES, 64)
    keras.utils.set_random_seed(1)
    full = build_model(NUM_CLASSES, (28, 28, 1), input_size=32)
    set_phase(full, HEAD, RESNET50.cut.fine_tune_layers)
    compile_model(full, 1e-3)
    head = build_head(NUM_CLASSES)
    compile_model(head, 1e-3)
    head.set_weights(
        [
            w
            for v, w in zip(full.weights, full.get_weights(), strict=True)
            if is_head_variable(v.path)
        ]
    )
    features = feature_extractor(full).predict(x, verbose=0)

    _train(full, x, y)
    _train(head, features, y)

    trained = {v.path: v.numpy() for v in full.weights if is_head_variable(v.path)}
    assert [v.path for v in head.weights] == list(trained)
    for variable in head.weights:
        np.testing.assert_allclose(variable.numpy(), trained[variable.path], rtol=1e-4, atol=1e-5)


@pytest.mark.e2e  # a full ResNet50 trained or run several times: ~15 s
def test_training_conv5_on_cached_conv4_activations_equals_fine_tuning_the_full_model():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (48, 28, 28, 1), dtype=np.uint8)
    y = rng.integers(0, NUM_CLASSES, 48)
    keras.utils.set_random_seed(3)
    full = build_model(NUM_CLASSES, (28, 28, 1), input_size=32)
    set_phase(full, FINE_TUNE, RESNET50.cut.fine_tune_layers)
    start = full.get_weights()
    front, back = split_at(full, RESNET50.cut)
    activations = front.predict(x, verbose=0)
    compile_model(full, 1e-3)
    _train(full, x, y)
    trained = {v.path: v.numpy() for v in full.weights}

    full.set_weights(start)  # back shares full's layers: start again from the same weights
    compile_model(back, 1e-3)
    _train(back, activations, y)

    assert {v.path for v in back.trainable_weights} == {v.path for v in full.trainable_weights}
    for variable in back.weights:
        np.testing.assert_allclose(variable.numpy(), trained[variable.path], rtol=1e-3, atol=1e-4)


def test_key_changes_with_backbone_images_and_input_size_only():
    model = build_model(NUM_CLASSES, (28, 28, 1), input_size=32)
    arrays = to_arrayrecord(model)
    backbone = [k for k in arrays if not is_head_variable(k)]
    x = np.zeros((4, 28, 28, 1), np.uint8)
    images = Split.of_arrays(x, np.zeros(4)).digest()
    frozen = frozen_digest(arrays, backbone)
    key = feature_key(frozen, images, 32)

    assert feature_key(frozen_digest(arrays, backbone), images, 32) == key
    assert Split.of_arrays(x.copy(), np.ones(4)).digest() == images  # labels do not matter
    head_key = next(k for k in arrays if is_head_variable(k))
    arrays_new_head = to_arrayrecord(model)
    arrays_new_head[head_key] = Array(np.ones(arrays[head_key].shape, np.float32))
    assert frozen_digest(arrays_new_head, backbone) == frozen  # the head does not matter
    other = build_model(NUM_CLASSES, (28, 28, 1), input_size=32)
    assert frozen_digest(to_arrayrecord(other), backbone) != frozen  # new backbone weights
    changed = x.copy()
    changed[0, 0, 0, 0] = 1
    changed_images = Split.of_arrays(changed, np.zeros(4)).digest()
    assert feature_key(frozen, changed_images, 32) != key  # one pixel
    assert feature_key(frozen, images, 64) != key  # input size
    assert feature_key(frozen, images, 32, boundary="conv4") != key
    assert feature_key("base 1234", images, 32) != key  # weights named by a base's hash


def test_cache_persists_on_disk_and_evicts_least_recently_used(tmp_path):
    a, b, c = (np.full((10, 2048), i, np.float32) for i in range(3))  # 80 KiB each
    cache = FeatureCache(max_bytes=200 * 1024, folder=tmp_path)
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # memory hit; "a" is now the most recent

    fresh = FeatureCache(max_bytes=200 * 1024, folder=tmp_path)  # a new ClientApp process
    np.testing.assert_array_equal(fresh.get("b"), b)
    fresh.put("c", c)  # 240 KiB on disk > 200 KiB: the oldest file goes
    on_disk = sorted(p.stem for p in tmp_path.glob("*.npy"))
    assert len(on_disk) == 2 and "c" in on_disk
    assert FeatureCache(max_bytes=10, folder=tmp_path).get("zzz") is None


def test_an_entry_already_on_disk_is_not_written_again_and_a_bad_one_is(tmp_path):
    a = np.ones((10, 2048), np.float32)
    FeatureCache(1 << 20, tmp_path).put("a", a)
    inode = (tmp_path / "a.npy").stat().st_ino
    FeatureCache(1 << 20, tmp_path).put("a", a)  # another process, the same content
    assert (tmp_path / "a.npy").stat().st_ino == inode

    (tmp_path / "bad.npy").write_bytes(b"half written")
    fresh = FeatureCache(1 << 20, tmp_path)
    assert fresh.get("bad") is None
    fresh.put("bad", a)
    np.testing.assert_array_equal(FeatureCache(1 << 20, tmp_path).get("bad"), a)


def test_unreadable_entry_is_a_miss_and_memory_only_cache_has_no_folder(tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"half written")
    assert FeatureCache(1 << 20, tmp_path).get("bad") is None
    memory = FeatureCache(1 << 20)
    memory.put("k", np.ones(3, np.float32))
    assert memory.get("k") is not None and not list(tmp_path.glob("k.npy"))
    with pytest.raises(TypeError):
        FeatureCache()  # the bound is required
