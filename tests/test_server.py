"""ServerApp pieces: where the initial weights come from."""

from __future__ import annotations

import numpy as np
import pytest

from fl_app.config import RunConfig
from fl_app.model.initial import initial_model


def test_none_is_random_init_and_a_weights_file_is_loaded(tmp_path):
    model, init = initial_model(RunConfig(weights="none"), (28, 28, 1), 10)
    assert init == "random"
    path = tmp_path / "start.weights.h5"
    model.save_weights(path)

    loaded, init = initial_model(RunConfig(weights=str(path), strict_weights=True), (28, 28, 1), 10)
    assert init == f"file:{path}"
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_imagenet_without_weights_is_an_error_only_when_strict(tmp_path, monkeypatch):
    # An empty Keras cache: the weights must come from a download, which fails offline.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    try:
        _, init = initial_model(RunConfig(), (28, 28, 1), 10)
    except Exception as err:  # pragma: no cover - only a broken install gets here
        pytest.fail(f"non-strict imagenet must fall back, got {err!r}")
    if init == "imagenet":
        pytest.skip("this machine can download the ImageNet weights")
    assert init == "random"
    with pytest.raises(RuntimeError, match="strict-weights=true forbids random initialisation"):
        initial_model(RunConfig(strict_weights=True), (28, 28, 1), 10)
