"""End to end: client-level DP through `flwr run` on four simulated nodes.

Two runs of EfficientNet-Lite0 (its shipped ImageNet weights), head phase:
``dp=client`` with int8 compression and an ε target that ends the run after
round 2 of 3, and one round of ``dp=server`` with a clip so small that every
update is clipped.
"""

from __future__ import annotations

import json
import math

import pytest
from helpers import TINY, log_lines

from fl_app import privacy
from fl_app.backbones import EFFICIENTNET_LITE0
from fl_app.model.classifier import load_classifier

pytestmark = pytest.mark.e2e
NODES = 4
DELTA = 1e-5
BASE = {
    **TINY,
    "backbone": EFFICIENTNET_LITE0.name,
    "num-server-rounds": 3,
    "head-rounds": 3,
    "max-examples-per-node": 64,
    "min-train-nodes": NODES,
    "min-available-nodes": NODES,
    "fraction-evaluate": 0.0,
    "dp-delta": DELTA,
}
# Lite0's head: Dense 1280 -> 128 and 128 -> 10, the arrays that travel in the head phase.
HEAD_PARAMETERS = 1280 * 128 + 128 + 128 * 10 + 10


def _metrics(run) -> dict:
    assert run.status == "finished:completed", run.details + run.log[-3000:]
    return json.loads((run.run_dir / "metrics.json").read_text())


def test_dp_client_clips_on_the_nodes_and_stops_at_the_epsilon_target(superlink, tmp_path):
    z, clip = 1.0, 0.5
    # Between ε after 2 and after 3 rounds: round 3 would exceed it.
    target = (privacy.epsilon(z, 2, DELTA) + privacy.epsilon(z, 3, DELTA)) / 2
    config = {
        **BASE,
        "dp": "client",
        "dp-clip": clip,
        "dp-noise-multiplier": z,
        "dp-target-epsilon": target,
        "compression": "int8",
    }
    run = superlink.run(tmp_path, config, num_supernodes=NODES)

    metrics = _metrics(run)
    rounds = metrics["rounds"][1:]
    assert [r["round"] for r in rounds] == [1, 2]
    assert "privacy budget: round 3 would take epsilon" in metrics["stopped"]
    assert log_lines(run.log, r"Privacy budget: round 3 would take epsilon .* stops after round 2")
    for n, r in enumerate(rounds, start=1):
        assert r["train_replies"] == NODES and r["model_updated"]
        assert r["dp_epsilon"] == pytest.approx(privacy.epsilon(z, n, DELTA))
        assert r["dp_noise_std"] == pytest.approx(z * clip / NODES)
        # Clipped on the node before int8 quantisation: what arrives is within the bound
        # but for the quantisation error.
        assert r["update_norm_median"] <= clip * (1 + 2 * r["upload_error"])
        # The quantisation error per coordinate (relative RMS of an update of norm <= clip)
        # is far below the noise per coordinate.
        quantisation = r["upload_error"] * clip / math.sqrt(HEAD_PARAMETERS)
        assert quantisation < r["dp_noise_std"] / 100
        print(
            f"\n[dp client] round {n}: ε {r['dp_epsilon']:.3f}, noise std {r['dp_noise_std']:.3g}"
            f" vs int8 error {quantisation:.3g} per coordinate, server acc"
            f" {r['server_accuracy']:.3f}, {r['round_time']:.1f} s"
        )
    assert log_lines(run.log, r"Round 2 summary: .*ε [0-9.]+ \(δ 1e-05\)")
    # The run kept what it had: the models of round 2.
    load_classifier(run.run_dir / "final.keras")
    assert metrics["status"] == "completed"


def test_dp_server_clips_every_update_on_the_server(superlink, tmp_path):
    z, clip = 0.5, 1e-3
    config = {**BASE, "num-server-rounds": 1, "head-rounds": 1, "dp": "server"}
    config |= {"dp-clip": clip, "dp-noise-multiplier": z}
    run = superlink.run(tmp_path, config, num_supernodes=NODES)

    metrics = _metrics(run)
    assert "stopped" not in metrics
    (r,) = metrics["rounds"][1:]
    # The server sees the nodes' updates whole, and clips each.
    assert r["update_norm_median"] > clip
    assert r["dp_clipped"] == r["train_replies"] == NODES
    assert r["dp_epsilon"] == pytest.approx(privacy.epsilon(z, 1, DELTA))
    assert r["dp_noise_std"] == pytest.approx(z * clip / NODES)
