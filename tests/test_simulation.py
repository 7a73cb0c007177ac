"""End to end: `flwr run .` on Flower's simulation engine, real Keras, real files."""

from __future__ import annotations

import json
import warnings

import keras
import numpy as np
import pytest
from helpers import TINY, log_lines

from fl_app.data.builtin import load_builtin
from fl_app.model.classifier import build_model
from fl_app.schedule import FINE_TUNE, HEAD

pytestmark = pytest.mark.e2e


def test_two_rounds_on_two_supernodes_write_metrics_and_a_loadable_model(superlink, tmp_path):
    run = superlink.run(tmp_path, TINY)

    assert run.status == "finished:completed", run.details + run.log[-3000:]
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    # No ImageNet weights can be fetched here: the run says so and records it.
    assert metrics["init"] in ("random", "imagenet")
    if metrics["init"] == "random":
        assert len(log_lines(run.log, r"WARNING.*ImageNet weights are unavailable")) == 1
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r.get("phase") for r in rounds] == [None, HEAD, FINE_TUNE]
    for r in rounds[1:]:
        assert r["train_replies"] == 2 and r["rejected_replies"] == 0 and r["model_updated"]
        assert r["eval_replies"] == 2
        for key in (
            "train_loss",
            "train_accuracy",
            "eval_loss",
            "eval_accuracy",
            "server_loss",
            "server_accuracy",
            "round_time",
            "train_time",
        ):
            assert np.isfinite(r[key]), key
        assert 0 <= r["server_accuracy"] <= 1
    # Each node gets the full model once (its base), then only what trains: the head
    # (1.05 MB) in round 1, conv5 and the head in round 2; replies carry the same keys.
    head, fine_tune = rounds[1:]
    assert head["bases_sent"] == 2 and fine_tune["bases_sent"] == 0
    assert 2 * 95e6 < head["bytes_sent"] < 2 * 95.6e6 + 4 * 1.1e6
    assert 2e6 < head["bytes_received"] < 2.2e6
    assert fine_tune["bytes_sent"] == 2 * fine_tune["bytes_received"]
    assert 2.2e6 < fine_tune["bytes_received"] < 2 * 0.7 * 95.4e6
    assert log_lines(run.log, r"Round 2 summary: train acc")

    config = json.loads((run.run_dir / "config.json").read_text())
    assert config["run_config"]["input-size"] == 32 and config["init"] == metrics["init"]

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = keras.saving.load_model(run.run_dir / "final.keras")
    assert (run.run_dir / "best.keras").is_file()
    test = load_builtin("fashion_mnist").test
    _, accuracy = model.evaluate(test.x[:200], test.y[:200], verbose=0)
    # The saved model is the final global model the server evaluated.
    assert accuracy == pytest.approx(rounds[-1]["server_accuracy"], abs=1e-6)


# Two 3-round runs (~90 s): in make test-faults, to keep make test within CI's budget.
@pytest.mark.slow
def test_the_activation_cache_changes_no_result(superlink, tmp_path):
    # Round 2 trains the head on cached features, round 3 conv5 on cached conv4 output.
    # Both runs start from one weights file, so the cache is all that differs.
    start = tmp_path / "start.weights.h5"
    keras.utils.set_random_seed(0)
    build_model(10, (28, 28, 1), 32).save_weights(start)
    config = {**TINY, "num-server-rounds": 3, "head-rounds": 2, "weights": str(start)}
    cached = superlink.run(tmp_path / "cached", {**config, "feature-cache": True})
    full = superlink.run(tmp_path / "full", {**config, "feature-cache": False})

    assert cached.status == full.status == "finished:completed", cached.details + full.details
    rounds = [
        json.loads((r.run_dir / "metrics.json").read_text())["rounds"] for r in (cached, full)
    ]
    assert [r.get("phase") for r in rounds[0]] == [None, HEAD, HEAD, FINE_TUNE]
    for with_cache, without in zip(*rounds, strict=True):
        for key in ("train_loss", "eval_loss", "server_loss"):
            if key in without:
                assert with_cache[key] == pytest.approx(without[key], rel=1e-3), key
        # Accuracies on 200 test images: at most one prediction may flip.
        assert with_cache["server_accuracy"] == pytest.approx(without["server_accuracy"], abs=0.006)


def test_a_bad_value_fails_the_run_with_one_clear_line(superlink, tmp_path):
    run = superlink.run(tmp_path, {**TINY, "input-size": 16})

    assert run.status == "finished:failed"
    lines = log_lines(run.log, r"Invalid run config")
    assert (
        lines == [lines[0]]
        and "input-size=16 is not allowed: expected an integer >= 32" in lines[0]
    )
    assert not run.run_dir.exists()  # nothing was started, nothing written


def test_too_few_nodes_fail_the_run_in_one_line_after_the_wait(superlink, tmp_path):
    config = {**TINY, "min-available-nodes": 3, "wait-for-nodes-timeout": 5}
    run = superlink.run(tmp_path, config, num_supernodes=2)

    assert run.status == "finished:failed", run.details + run.log[-3000:]
    assert log_lines(
        run.log,
        r"only 2 of the 3 nodes needed \(min-available-nodes\) are connected after "
        r"wait-for-nodes-timeout=5 s",
    ), run.log[-3000:]
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    # What the run had done is kept: the start, evaluated and checkpointed.
    assert metrics["status"] == "failed" and [r["round"] for r in metrics["rounds"]] == [0]
    assert (run.run_dir / "checkpoint.json").is_file()
