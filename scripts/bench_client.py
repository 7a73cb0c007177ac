#!/usr/bin/env python3
"""Our ClientApp against a quickstart-style one, every number from one invocation.

Every run is a real `flwr run` simulation on its own local SuperLink, on the same
Fashion-MNIST partitions, start weights and rounds (all rounds train the head on
the frozen backbone). Ratios compare runs of this one invocation:

1. time per train message after round 1 inside our client vs ``baseline_client.py``
   (Flower's quickstart-tensorflow style: a fresh model every message, every weight
   sent), and the whole round as the server sees it (the baseline's server, as the
   quickstart's, evaluates the full model on its test set every round);
2. bytes uploaded per client per round after round 1 for each compression (none,
   float16, int8) vs what the baseline uploads (the full float32 model), and each
   one's final server accuracy vs the uncompressed run's;
3. training throughput inside our ClientApp (its ``train_time``) vs a bare
   ``model.fit`` of the model it trains (the head on pooled features) on node 0's data;
4. peak RSS of the whole process tree (SuperLink, simulation process, Ray) of a
   simulation with ``--clients`` virtual clients, ``--fraction`` of them per round.

It prints a markdown table (value, baseline, ratio, target met) and writes JSON.

Usage: python scripts/bench_client.py [--rounds 3 --examples 600 --input-size 32 --clients 100]
       python scripts/bench_client.py --smallest     # CI size, ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarking import (
    GIB,
    REPO,
    baseline_app,
    machine,
    parse_with_smallest,
    run_app,
    save_start_weights,
    write_report,
)

from fl_app.backbones import BACKBONES
from fl_app.config import RunConfig
from fl_app.data.split import Split

if TYPE_CHECKING:
    import keras  # imported when needed: --help should not wait for TensorFlow

COMPRESSIONS = ("none", "float16", "int8")
QUICKSTART = "quickstart"
# The quickstart's server: every weight sent every round, the full model evaluated.
QUICKSTART_SERVER = {"exchange": "full", "feature-cache": False}
MEMORY = "memory"
# CI size. One client, sampled every round, for as many rounds: the memory run is then
# the same run as "none" and runs once.
SMALLEST = {
    "rounds": 2,
    "nodes": 1,
    "examples": 64,
    "test_examples": 100,
    "clients": 1,
    "fraction": 1.0,
    "memory_rounds": 2,
    "repeats": 3,
}


def after_round_1(run: Mapping[str, Any], key: str) -> float:
    """Mean of a round record's ``key`` over rounds 2.. of a run."""
    return statistics.mean(r[key] for r in run["rounds"][1:])


def upload_per_client(run: Mapping[str, Any]) -> float:
    """Bytes one client uploads per round after round 1 (the server counts all replies)."""
    return statistics.mean(r["bytes_received"] / r["train_replies"] for r in run["rounds"][1:])


def final_accuracy(run: Mapping[str, Any]) -> float:
    """The global model's accuracy on the server's test set after the last round."""
    return run["rounds"][-1]["server_accuracy"]


def bare_fit(
    model: keras.Model,
    data: Split,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    repeats: int,
) -> float:
    """Images per second of a plain ``model.fit`` of what our head-phase ClientApp trains.

    The ClientApp fits the head on the pooled features of its training split, with a
    compiled head it keeps across rounds and an optimizer reset every round: so here.
    """
    import keras

    from fl_app.model.classifier import (
        build_head,
        compile_model,
        feature_extractor,
        reset_optimizer,
    )

    features = feature_extractor(model).predict(data.x, batch_size=batch_size, verbose=0)
    head = build_head(int(data.y.max()) + 1, features.shape[-1])
    compile_model(head, learning_rate)
    times = []
    for i in range(repeats + 1):
        reset_optimizer(head, learning_rate)
        keras.utils.set_random_seed(i)
        start = time.perf_counter()
        head.fit(features, data.y, epochs=epochs, batch_size=batch_size, verbose=0)
        times.append(time.perf_counter() - start)
    # The first fit traces the train step, as the ClientApp's round 1 does.
    return len(data.y) * epochs / statistics.median(times[1:])


@dataclass
class Row:
    """One line of the result table."""

    metric: str
    unit: str
    value: float
    baseline: float
    ratio: float
    ratio_unit: str = "x"
    target: str = ""
    met: bool | None = None

    def markdown(self) -> str:
        """The row as a line of a markdown table."""
        unit = f" {self.unit}" if self.unit else ""
        ratio = f"{self.ratio:+.2f}" if self.ratio_unit == "pt" else f"{self.ratio:.3g}"
        met = "-" if self.met is None else "yes" if self.met else "no"
        return (
            f"| {self.metric} | {self.value:.4g}{unit} | {self.baseline:.4g}{unit} | "
            f"{ratio} {self.ratio_unit} | {self.target or '-'} | {met} |"
        )


def table_rows(
    runs: Mapping[str, dict], bare: float, train_examples: float, memory_label: str
) -> list[Row]:
    """The table's rows from the runs."""
    quick, none = runs[QUICKSTART], runs["none"]
    client = after_round_1(quick, "client_time") / after_round_1(none, "client_time")
    server = after_round_1(quick, "round_time") / after_round_1(none, "round_time")
    rows = [
        Row(
            "head-phase client time per train message after round 1, ours vs quickstart",
            "s",
            after_round_1(none, "client_time"),
            after_round_1(quick, "client_time"),
            client,
            "x faster",
            ">= 20x",
            client >= 20,
        ),
        # The whole round as the server sees it: messaging and averaging are the same for
        # both and bound the ratio; the server's test-set evaluation is ours (cached
        # features) against the quickstart's (the full model every round).
        Row(
            "head-phase round time after round 1 (server), ours vs quickstart",
            "s",
            after_round_1(none, "round_time"),
            after_round_1(quick, "round_time"),
            server,
            "x faster",
        ),
    ]
    full_model = upload_per_client(quick) / 1e6
    for compression in COMPRESSIONS:
        upload = upload_per_client(runs[compression]) / 1e6
        share = 100 * upload / full_model
        target = "<= 1.2 %" if compression == "float16" else ""
        rows.append(
            Row(
                f"upload per client per round, compression={compression}",
                "MB",
                upload,
                full_model,
                share,
                "%",
                target,
                share <= 1.2 if target else None,
            )
        )
    for compression in COMPRESSIONS:
        reference = QUICKSTART if compression == "none" else "none"
        accuracy, baseline = final_accuracy(runs[compression]), final_accuracy(runs[reference])
        rows.append(
            Row(
                f"final server accuracy, compression={compression} vs {reference}",
                "",
                accuracy,
                baseline,
                100 * (accuracy - baseline),
                "pt",
                "within 0.5 pt",
                abs(accuracy - baseline) <= 0.005,
            )
        )
    inside = train_examples / after_round_1(none, "train_time")
    rows.append(
        Row(
            "training throughput, ClientApp vs bare model.fit (head on features)",
            "img/s",
            inside,
            bare,
            inside / bare,
            "x",
            ">= 0.9x",
            inside / bare >= 0.9,
        )
    )
    peak, base = runs[MEMORY]["peak_rss"] / GIB, none["peak_rss"] / GIB
    rows.append(
        Row(
            f"peak RSS of the process tree, {memory_label}",
            "GiB",
            peak,
            base,
            peak / base,
            "x",
            "<= 6 GiB",
            peak <= 6,
        )
    )
    return rows


def markdown(rows: list[Row]) -> str:
    """The rows as a markdown table."""
    header = ["| metric | value | baseline | ratio | target | met |", "|---|---|---|---|---|---|"]
    return "\n".join(header + [row.markdown() for row in rows])


def variants(args: argparse.Namespace, sampled: int) -> dict[str, tuple[bool, dict[str, Any], int]]:
    """Each run by name: whether it runs the baseline ClientApp, its overrides, its clients."""
    base = {
        "num-server-rounds": args.rounds,
        "head-rounds": args.rounds,
        "backbone": args.backbone,
        "input-size": args.input_size,
        "max-examples-per-node": args.examples,
        "max-test-examples": args.test_examples,
        "min-train-nodes": args.nodes,
        "min-evaluate-nodes": args.nodes,
        "min-available-nodes": args.nodes,
    }
    memory = {
        **base,
        "num-server-rounds": args.memory_rounds,
        "head-rounds": args.memory_rounds,
        "fraction-train": args.fraction,
        "fraction-evaluate": args.fraction,
        "min-train-nodes": sampled,
        "min-evaluate-nodes": sampled,
        "min-available-nodes": args.clients,
    }
    return {
        QUICKSTART: (True, {**base, **QUICKSTART_SERVER}, args.nodes),
        **{c: (False, {**base, "compression": c}, args.nodes) for c in COMPRESSIONS},
        MEMORY: (False, memory, args.clients),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds, all head phase (>= 2)")
    parser.add_argument("--nodes", type=int, default=2, help="nodes of the comparison runs")
    parser.add_argument("--examples", type=int, default=600, help="examples per node")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--backbone", default="resnet50", help="resnet50 or efficientnet_lite0")
    parser.add_argument(
        "--weights",
        default="none",
        help="start weights: none (random, the same file for every run) or imagenet",
    )
    parser.add_argument("--test-examples", type=int, default=500, help="server test set")
    parser.add_argument("--clients", type=int, default=100, help="virtual clients, memory run")
    parser.add_argument("--fraction", type=float, default=0.1, help="sampled per round")
    parser.add_argument("--memory-rounds", type=int, default=2, help="rounds of the memory run")
    parser.add_argument("--repeats", type=int, default=5, help="timed bare fits")
    parser.add_argument("--json", type=Path, default=Path("outputs/bench.json"))
    args = parse_with_smallest(parser, SMALLEST)
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: round times and uploads are taken after round 1")
    if args.backbone not in BACKBONES:
        parser.error(f"--backbone {args.backbone!r} is not one of {', '.join(BACKBONES)}")
    if args.weights not in ("none", "imagenet"):
        parser.error(f"--weights {args.weights!r} is not one of none, imagenet")
    return args


def main() -> int:
    args = parse_args()
    # A SIGTERM unwinds like Ctrl-C, so every SuperLink we started is stopped by PID.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from fl_app.data import load_node_data, run_classes

    config = replace(
        RunConfig(),
        input_size=args.input_size,
        weights=args.weights,
        strict_weights=True,
        backbone=args.backbone,
    )
    config = replace(config, max_examples_per_node=args.examples)
    classes = run_classes(config)
    nodes = [load_node_data(config, classes, i, args.nodes) for i in range(args.nodes)]
    sampled = max(1, int(args.clients * args.fraction))
    started_on = machine()
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fl_app-bench-") as tmp:
        root = Path(tmp)
        start_weights = root / "start.weights.h5"
        model = save_start_weights(config, nodes[0].train.image_shape, len(classes), start_weights)
        apps = {False: REPO, True: baseline_app(root)}
        done: dict[str, str] = {}  # what a run was, as JSON: the name it ran under
        for name, (is_baseline, overrides, clients) in variants(args, sampled).items():
            run_config = {**overrides, "weights": str(start_weights)}
            same = json.dumps(
                [is_baseline, {**config.to_flower(), **run_config}, clients], sort_keys=True
            )
            if same in done:
                runs[name] = runs[done[same]]
                print(f"{name}: the same run as {done[same]}", file=sys.stderr)
                continue
            done[same] = name
            runs[name] = run_app(root / name, apps[is_baseline], run_config, clients)
            print(
                f"{name}: {runs[name]['wall_time']:.0f} s, "
                f"peak RSS {runs[name]['peak_rss'] / GIB:.2f} GiB",
                file=sys.stderr,
            )
            if name == "none":
                # Right after the run it is compared with: other processes' load drifts
                # over minutes on a shared machine.
                bare = bare_fit(
                    model,
                    nodes[0].train,
                    config.local_epochs,
                    config.batch_size,
                    config.learning_rate,
                    args.repeats,
                )
                print(f"bare model.fit: {bare:.0f} img/s", file=sys.stderr)

    train_examples = statistics.mean(len(n.train.y) for n in nodes) * config.local_epochs
    memory_label = f"{args.clients} clients ({sampled} per round) vs {args.nodes} nodes"
    rows = table_rows(runs, bare, train_examples, memory_label)
    print(
        f"\n{args.backbone} ({args.weights} start), "
        f"{args.nodes} nodes x {args.examples} examples, {args.rounds} head rounds, "
        f"input {args.input_size} px; memory run: {args.clients} clients, {sampled} per round, "
        f"{args.memory_rounds} rounds; {os.cpu_count()} CPUs\n"
    )
    print(markdown(rows))
    write_report(
        args,
        started_on,
        bare_fit_images_per_second=bare,
        runs=runs,
        rows=[asdict(row) for row in rows],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
