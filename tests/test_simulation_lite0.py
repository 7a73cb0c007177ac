"""End to end: `flwr run .` with backbone=efficientnet_lite0, from its shipped weights."""

from __future__ import annotations

import json
import warnings

import keras
import numpy as np
import pytest
from helpers import TINY, log_lines

from fl_app.backbones import EFFICIENTNET_LITE0
from fl_app.data.builtin import load_builtin
from fl_app.model.classifier import backbone_of
from fl_app.schedule import FINE_TUNE, HEAD

pytestmark = pytest.mark.e2e
LITE0 = {**TINY, "backbone": EFFICIENTNET_LITE0.name}


def test_two_rounds_of_lite0_from_its_shipped_imagenet_weights(superlink, tmp_path):
    # Round 1 trains the head on cached pooled features (1280 wide); round 2 fine-tunes
    # the last 32 backbone layers on the full model (conv4 caching is ResNet50's).
    run = superlink.run(tmp_path, LITE0)

    assert run.status == "finished:completed", run.details + run.log[-3000:]
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    # The weights ship in a package: no download, no fallback, no warning.
    assert metrics["init"] == "imagenet"
    assert log_lines(run.log, r"ImageNet weights are unavailable") == []
    rounds = metrics["rounds"]
    assert [r.get("phase") for r in rounds] == [None, HEAD, FINE_TUNE]
    for r in rounds[1:]:
        assert r["train_replies"] == 2 and r["rejected_replies"] == 0 and r["model_updated"]
        assert r["eval_replies"] == 2
        for key in ("train_loss", "eval_loss", "server_loss", "server_accuracy"):
            assert np.isfinite(r[key]), key
    # Each node gets Lite0 + head whole once (~14.3 MB of float32; ResNet50's: ~95 MB),
    # then only what trains: the head (0.66 MB), then the last 32 layers and the head.
    head, fine_tune = rounds[1:]
    assert head["bases_sent"] == 2 and fine_tune["bases_sent"] == 0
    assert 2 * 14e6 < head["bytes_sent"] < 2 * 14.5e6 + 4 * 0.7e6
    assert 2 * 0.6e6 < head["bytes_received"] < 2 * 0.7e6
    assert fine_tune["bytes_sent"] == 2 * fine_tune["bytes_received"]
    assert head["bytes_received"] < fine_tune["bytes_received"] < 2 * 14e6

    config = json.loads((run.run_dir / "config.json").read_text())
    assert config["run_config"]["backbone"] == EFFICIENTNET_LITE0.name

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = keras.saving.load_model(run.run_dir / "final.keras")
    assert backbone_of(model).name == EFFICIENTNET_LITE0.name
    test = load_builtin("fashion_mnist").test
    _, accuracy = model.evaluate(test.x[:200], test.y[:200], verbose=0)
    assert accuracy == pytest.approx(rounds[-1]["server_accuracy"], abs=1e-6)
