"""The server's centralised evaluation on cached test activations: exact, and only when valid."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from helpers import require_fashion_mnist

from fl_app.backbones import BACKBONES, EFFICIENTNET_LITE0, RESNET50
from fl_app.config import RunConfig
from fl_app.data import load_test_set, run_classes
from fl_app.data.batches import Batches
from fl_app.evaluation import CentralEvaluation
from fl_app.model.classifier import (
    build_model,
    compile_model,
    is_head_variable,
    load_arrayrecord,
    to_arrayrecord,
)
from fl_app.model.features import POOLED

BATCH = 32


@pytest.fixture(scope="module")
def test_set():
    require_fashion_mnist()
    config = RunConfig(max_test_examples=160)
    test, _ = load_test_set(config, run_classes(config))
    return test


def _model(backbone: str, test) -> keras.Model:
    keras.utils.set_random_seed(3)
    model = build_model(10, test.image_shape, 32, None, backbone)
    compile_model(model, 1e-3)
    return model


def _moved(arrays: ArrayRecord, which, seed: int) -> ArrayRecord:
    """``arrays`` with noise added to the arrays ``which(key)`` selects."""
    rng = np.random.default_rng(seed)
    moved = {}
    for key, array in arrays.items():
        value = array.numpy()
        if which(key) and value.dtype.kind == "f":
            value = value + rng.normal(0, 0.05 * (value.std() + 1e-3), value.shape).astype(
                value.dtype
            )
        moved[key] = Array(value)
    return ArrayRecord(moved)


def _full(model: keras.Model, arrays: ArrayRecord, test) -> tuple[float, float]:
    """The uncached reference: the whole model on the test images."""
    load_arrayrecord(model, arrays)
    loss, accuracy = model.evaluate(Batches(test, BATCH), verbose=0)
    return loss, accuracy


def _check(evaluation: CentralEvaluation, model, arrays, test) -> None:
    got = evaluation(1, arrays)
    loss, accuracy = _full(model, arrays, test)
    assert got["loss"] == pytest.approx(loss, rel=1e-5)
    assert got["accuracy"] == pytest.approx(accuracy, abs=1e-6)


@pytest.mark.parametrize("backbone", [RESNET50.name, EFFICIENTNET_LITE0.name])
def test_head_rounds_score_the_cached_features_exactly_and_pass_the_images_once(backbone, test_set):
    model = _model(backbone, test_set)
    evaluation = CentralEvaluation(model, test_set, BATCH, backbone, 2**30)
    arrays = to_arrayrecord(model)

    _check(evaluation, model, arrays, test_set)
    for seed in (1, 2, 3):  # three head rounds: only the head moves
        arrays = _moved(arrays, is_head_variable, seed)
        _check(evaluation, model, arrays, test_set)

    assert evaluation.frozen_passes == {POOLED: 1}


@pytest.mark.e2e  # a full ResNet50 trained or run several times: ~15 s
def test_fine_tune_rounds_keep_conv4s_output_and_a_moved_backbone_runs_the_whole_model(
    test_set,
):
    model = _model(RESNET50.name, test_set)
    evaluation = CentralEvaluation(model, test_set, BATCH, RESNET50.name, 2**30)
    cut = BACKBONES[RESNET50.name].cut
    arrays = to_arrayrecord(model)
    _check(evaluation, model, arrays, test_set)

    # Fine-tune rounds: conv5 and the head move, conv4 and below do not.
    for seed in (1, 2):
        arrays = _moved(arrays, lambda key: is_head_variable(key) or cut.prefix in key, seed)
        _check(evaluation, model, arrays, test_set)
    assert evaluation.frozen_passes == {POOLED: 1, cut.layer: 1}

    # Everything moved (say, exchange=full with int8): no boundary held still, no pass kept.
    arrays = _moved(arrays, lambda key: True, 4)
    _check(evaluation, model, arrays, test_set)
    assert evaluation.frozen_passes == {POOLED: 1, cut.layer: 1}
    # The same weights again: their pooled features are now worth keeping.
    _check(evaluation, model, arrays, test_set)
    assert evaluation.frozen_passes == {POOLED: 2, cut.layer: 1}


@pytest.mark.e2e  # a full ResNet50 trained or run several times: ~15 s
def test_no_cache_and_activations_too_large_run_the_whole_model(test_set, caplog):
    model = _model(RESNET50.name, test_set)
    arrays = to_arrayrecord(model)
    off = CentralEvaluation(model, test_set, BATCH, RESNET50.name, 0)
    # Room for the pooled features (160 x 2048 floats, 1.3 MB), not for conv4's output.
    small = CentralEvaluation(model, test_set, BATCH, RESNET50.name, 2 * 2**20)
    cut = BACKBONES[RESNET50.name].cut

    for evaluation in (off, small):
        _check(evaluation, model, arrays, test_set)
    moved = _moved(arrays, lambda key: cut.prefix in key, 1)
    for evaluation in (off, small):
        _check(evaluation, model, moved, test_set)

    assert off.frozen_passes == {}
    assert small.frozen_passes == {POOLED: 1}
    assert "would take 2 MB > feature-cache-mb=2" in caplog.text
