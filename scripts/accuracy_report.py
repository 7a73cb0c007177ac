#!/usr/bin/env python3
"""Does the transfer part work? Server test accuracy per round on Fashion-MNIST.

Runs, with the same rounds, nodes, examples and schedule:

* four federated runs through the Hydra launcher (``python -m fl_app.launch.experiment``, a
  local simulation): EfficientNet-Lite0 from its ImageNet weights (IID), Lite0 from
  random weights (IID), ResNet50 from random weights (IID; no ImageNet ResNet50 weights
  are reachable offline), and Lite0 ImageNet on Dirichlet(alpha) partitions;
* centralised training of the same model (Lite0 ImageNet) in this process on the union
  of the IID nodes' training examples, one epoch per round with the same phases and
  learning rates, evaluated on the same server test set after every epoch.

Writes ``results.json``, ``accuracy.png`` and ``table.md`` into ``--out`` (the runs'
own folders, models included, go to ``--jobs``), and prints the table.
``--plot-only`` rebuilds the table and plot from an existing results.json.

Usage: python scripts/accuracy_report.py [--out docs/accuracy] [--rounds 5] ...
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarking import REPO, run_launcher

LITE0, RESNET50 = "efficientnet_lite0", "resnet50"


def variants(alpha: float) -> dict[str, list[str]]:
    """Name -> launcher overrides of each federated run."""
    return {
        "Lite0 ImageNet, FL IID": [f"model={LITE0}", "model.weights=imagenet"],
        "Lite0 random init, FL IID": [f"model={LITE0}", "model.weights=none"],
        "ResNet50 random init, FL IID": [f"model={RESNET50}", "model.weights=none"],
        f"Lite0 ImageNet, FL Dirichlet a={alpha}": [
            f"model={LITE0}",
            "model.weights=imagenet",
            "partitioner=dirichlet",
            f"partitioner.dirichlet_alpha={alpha}",
        ],
    }


def common(args: argparse.Namespace) -> list[str]:
    """Overrides every federated run shares."""
    return [
        f"num_server_rounds={args.rounds}",
        f"head_rounds={args.head_rounds}",
        f"model.input_size={args.input_size}",
        f"dataset.max_examples_per_node={args.examples}",
        f"dataset.max_test_examples={args.test_examples}",
        f"federation.num_supernodes={args.nodes}",
        f"seed={args.seed}",
    ]


def run_federated(name: str, overrides: list[str], job_dir: Path) -> dict:
    """One launcher run; its per-round server accuracy from the job's metrics.json."""
    wall = run_launcher(name, overrides, job_dir)
    metrics = json.loads((job_dir / "metrics.json").read_text())
    rounds = [r for r in metrics["rounds"] if r["round"] > 0]
    return {
        "kind": "federated",
        "overrides": overrides,
        "init": metrics["init"],
        "accuracy": [r["server_accuracy"] for r in rounds],
        "round0_accuracy": metrics["rounds"][0].get("server_accuracy"),
        "wall_s": wall,
    }


def run_centralised(args: argparse.Namespace) -> dict:
    """Lite0 ImageNet trained on all IID nodes' training examples, one epoch a round."""
    import keras
    import numpy as np

    from fl_app.config import RunConfig
    from fl_app.data import load_node_data, load_test_set, run_classes
    from fl_app.model.classifier import (
        build_model,
        compile_model,
        reset_optimizer,
        set_phase,
    )
    from fl_app.schedule import FINE_TUNE, HEAD

    config = RunConfig(
        seed=args.seed,
        max_examples_per_node=args.examples,
        max_test_examples=args.test_examples,
        val_fraction=0.1,
    )
    classes = run_classes(config)
    nodes = [load_node_data(config, classes, i, args.nodes).train for i in range(args.nodes)]
    x = np.concatenate([n.x for n in nodes])
    y = np.concatenate([n.y for n in nodes])
    test, _ = load_test_set(config, classes)
    keras.utils.set_random_seed(args.seed)
    start = time.perf_counter()
    model = build_model(len(classes), x.shape[1:], args.input_size, "imagenet", LITE0)
    accuracy = []
    for epoch in range(1, args.rounds + 1):
        phase = HEAD if epoch <= args.head_rounds else FINE_TUNE
        rate = 1e-3 if phase == HEAD else 1e-4
        if set_phase(model, phase, 32) or not model.compiled:
            compile_model(model, rate)
            reset_optimizer(model, rate)  # fresh moments at each phase, like a new round
        model.fit(x, y, epochs=1, batch_size=32, shuffle=True, verbose=0)
        accuracy.append(float(model.evaluate(test.x, test.y, batch_size=32, verbose=0)[1]))
    return {
        "kind": "centralised",
        "examples": len(y),
        "init": "imagenet",
        "accuracy": accuracy,
        "wall_s": time.perf_counter() - start,
    }


def report(results: dict, out: Path) -> str:
    """Write table.md and accuracy.png from the results; return the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = max(len(r["accuracy"]) for r in results["runs"].values())
    head = "| run | init | " + " | ".join(f"r{i}" for i in range(1, rounds + 1)) + " | wall |"
    lines = [head, "|---|---|" + "---|" * rounds + "---|"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in results["runs"].items():
        cells = " | ".join(f"{a:.3f}" for a in r["accuracy"])
        lines.append(f"| {name} | {r['init']} | {cells} | {r['wall_s']:.0f} s |")
        style = "--" if r["kind"] == "centralised" else "-"
        ax.plot(range(1, len(r["accuracy"]) + 1), r["accuracy"], style, marker="o", label=name)
    settings = results["settings"]
    ax.axvline(settings["head_rounds"] + 0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("round (centralised: epoch); dotted line: fine-tuning starts")
    ax.set_ylabel("server test accuracy")
    ax.set_title(
        f"Fashion-MNIST, {settings['nodes']} nodes x {settings['examples']} examples, "
        f"{settings['input_size']} px"
    )
    ax.set_xticks(range(1, rounds + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "accuracy")
    parser.add_argument(
        "--jobs", type=Path, default=REPO / "outputs" / "accuracy-report", help="run folders"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--head-rounds", type=int, default=3)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--examples", type=int, default=300, help="per node, before val split")
    parser.add_argument("--test-examples", type=int, default=2000)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--only", nargs="*", help="run only these variants (names as printed)")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    if args.plot_only:
        print(report(json.loads(path.read_text()), out))
        return 0
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    results = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    results["settings"] = {
        k: getattr(args, k)
        for k in ("rounds", "head_rounds", "input_size", "examples", "test_examples")
    } | {"nodes": args.nodes, "alpha": args.alpha, "seed": args.seed, "batch_size": 32}
    todo = {**variants(args.alpha), "Lite0 ImageNet, centralised": None}
    for name, overrides in todo.items():
        if args.only and name not in args.only:
            continue
        print(f"running: {name}", flush=True)
        if overrides is None:
            results["runs"][name] = run_centralised(args)
        else:
            slug = name.lower().replace(" ", "-").replace(",", "").replace("=", "")
            job = args.jobs.resolve() / slug
            results["runs"][name] = run_federated(name, common(args) + overrides, job)
        print(f"  {results['runs'][name]['accuracy']}", flush=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
