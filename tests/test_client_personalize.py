"""Personalised evaluation (``personalize-epochs``): the ClientApp's evaluate, real Messages.

Same tiny ResNet50 and node data as tests/test_client.py. The node fine-tunes a copy
of the head on its training split and scores it beside the global model; the global
model, the arrays received and the activation cache must come out unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import test_client
from flwr.app import MessageType
from test_client import (
    FASHION,
    RUN_CONFIG,
    VAL_SIZE,
    context,
    evaluate_config,
    message,
    round_config,
)

from fl_app import client_task
from fl_app.model import node_models
from fl_app.schedule import FINE_TUNE

# `make test` runs these again with KERAS_BACKEND=jax.
pytestmark = pytest.mark.jax

initial = test_client.initial
node = test_client.node
cached = test_client.cached
PERSONAL = {"personalized_loss", "personalized_accuracy"}
EPOCHS = {"personalize-epochs": 3}


def evaluate(arrays, node_config, **run_config) -> dict[str, float]:
    msg = message(arrays, evaluate_config(), message_type=MessageType.EVALUATE)
    return dict(client_task.evaluate(msg, context(node_config, **run_config)).content["metrics"])


def cache_files(node_config) -> dict[str, bytes]:
    folder = Path(node_config["cache-dir"]) / "features"
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.npy"))}


def test_personalized_evaluation_scores_a_fine_tuned_head_and_changes_nothing(
    initial, node, cached
):
    received = {k: a.numpy().copy() for k, a in initial.items()}
    files = cache_files(node)  # training cached the pooled features of both splits
    assert len(files) >= 2
    plain = evaluate(initial, node)
    assert not PERSONAL & set(plain)  # off by default

    first, second = evaluate(initial, node, **EPOCHS), evaluate(initial, node, **EPOCHS)
    assert PERSONAL <= set(first)
    assert first == second  # seeded per round: the same numbers every time
    for key in ("num-examples", "eval_loss", "eval_accuracy"):
        assert first[key] == plain[key], key
    assert first["num-examples"] == VAL_SIZE
    assert math.isfinite(first["personalized_loss"]) and first["personalized_loss"] > 0
    assert 0 <= first["personalized_accuracy"] <= 1
    # The copy trained: its loss is not the global head's.
    assert first["personalized_loss"] != pytest.approx(first["eval_loss"], rel=1e-4)

    # Nothing the global evaluation uses moved: the arrays, the global head, the cache.
    for key, array in initial.items():
        np.testing.assert_array_equal(array.numpy(), received[key], err_msg=key)
    head = node_models.head(RUN_CONFIG["backbone"], len(FASHION))
    for variable in head.weights:
        np.testing.assert_array_equal(variable.numpy(), received[variable.path])
    assert cache_files(node) == files
    assert evaluate(initial, node) == plain


def test_personalization_from_images_matches_the_cached_features(initial, node, cached):
    # Without the cache the node computes the pooled features from its images.
    on = evaluate(initial, node, **EPOCHS)
    off = evaluate(initial, node, **EPOCHS, **{"feature-cache": False})
    for key in PERSONAL:
        assert off[key] == pytest.approx(on[key], rel=1e-4, abs=1e-5), key


def test_personalization_after_fine_tuning_pools_the_cached_conv4_output(
    initial, node, tmp_path, monkeypatch
):
    fresh = {**node, "cache-dir": str(tmp_path)}
    msg = message(initial, round_config(server_round=2, phase=FINE_TUNE, learning_rate=1e-4))
    client_task.train(msg, context(fresh))
    files = cache_files(fresh)  # conv4's output for both splits
    from_images = evaluate(initial, fresh, **EPOCHS, **{"feature-cache": False})

    def no_images(shape):
        raise AssertionError("the cached conv4 output was there: no image pass needed")

    # conv5 and pooling turn the cached conv4 output into the head's inputs.
    monkeypatch.setattr(node_models, "extractor", no_images)
    from_conv4 = evaluate(initial, fresh, **EPOCHS)
    for key in PERSONAL:
        assert from_conv4[key] == pytest.approx(from_images[key], rel=1e-4, abs=1e-5), key
    assert cache_files(fresh) == files
