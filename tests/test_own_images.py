"""End to end: a federation over the user's own image folder, then predictions from its model.

One `flwr run` on Flower's simulation engine: three virtual nodes share a class-folder
tree of PNG/JPEG files (grey and RGB, two sizes, class names with a space and a
non-ASCII letter, one corrupt file); the Dirichlet split leaves a node without a
class. The tree has no test/ folder, so the server has no test set and best.keras
follows federated evaluation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import log_lines
from image_trees import CORRUPT_NAME, DEMO_CLASSES, write_tree

from fl_app.config import RunConfig, defaults
from fl_app.data import load_node_data, run_classes
from fl_app.model.classifier import load_classifier
from fl_app.predict import predict

pytestmark = pytest.mark.e2e

NODES = 3
RUN = {
    "num-server-rounds": 3,
    "head-rounds": 3,
    "local-epochs": 3,
    "backbone": "efficientnet_lite0",  # its ImageNet weights ship with a package: real transfer
    "input-size": 32,
    "batch-size": 16,
    "max-examples-per-node": 0,
    "val-fraction": 0.2,
    "partitioner": "dirichlet",
    "dirichlet-alpha": 0.5,
    "seed": 3,
    "min-train-nodes": 2,
    "min-evaluate-nodes": 2,
    "min-available-nodes": NODES,
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    write_tree(root / "tree", 50, corrupt=True)
    write_tree(root / "held-out", 20, offset=0, split="test")
    return root


def test_a_federation_over_an_image_folder_with_a_node_lacking_a_class(superlink, photos, tmp_path):
    tree = photos / "tree"
    config = {**RUN, "dataset": str(tree)}
    # The precondition, checked rather than assumed: one node holds no image of some class.
    parsed = RunConfig.parse({**defaults(), **config})
    classes = run_classes(parsed)
    assert classes == tuple(sorted(DEMO_CLASSES))
    held = [
        set(np.concatenate([part.train.y, part.val.y]).tolist())
        for part in (load_node_data(parsed, classes, i, NODES) for i in range(NODES))
    ]
    assert any(len(labels) < len(classes) for labels in held), held

    run = superlink.run(tmp_path, config, num_supernodes=NODES)

    assert run.status == "finished:completed", run.details + run.log[-3000:]
    assert log_lines(run.log, r"No server test set .*best\.keras follows the federated")
    assert log_lines(run.log, r"3 classes: ankle boot, sac à main, trouser")
    corrupt = log_lines(run.log, rf"Skipped unreadable image .*{CORRUPT_NAME}")
    assert corrupt, run.log[-3000:]
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert metrics["best_by"] == "eval_accuracy" and metrics["classes"] == list(classes)
    rounds = metrics["rounds"]
    assert all("server_accuracy" not in r for r in rounds)
    for r in rounds[1:]:
        assert r["train_replies"] == NODES and r["rejected_replies"] == 0 and r["model_updated"]
        assert np.isfinite(r["eval_accuracy"])
    # The node holding the corrupt file left it out of training, every round, and said so.
    assert all(r["skipped_images"] <= 1 for r in rounds[1:])
    assert sum(r["skipped_images"] for r in rounds[1:]) >= 1
    best = metrics["best"]
    assert best["eval_accuracy"] == max(r["eval_accuracy"] for r in rounds[1:])
    assert (run.run_dir / "best.keras").is_file()
    assert json.loads((run.run_dir / "config.json").read_text())["classes"] == list(classes)

    # The saved model knows its classes; its predictions name them, above chance.
    model, names = load_classifier(run.run_dir / "final.keras")
    assert names == classes and model.output_shape == (None, len(classes))
    rows = list(predict(run.run_dir / "final.keras", [photos / "held-out"], top_k=1))
    assert len(rows) == 3 * 20
    right = [top[0][0] == path.parent.name for path, top in rows]
    assert np.mean(right) > 0.6, np.mean(right)
