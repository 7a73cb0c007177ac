#!/usr/bin/env python3
"""What SecAgg+ costs a round: seconds and bytes, in the head and the fine-tune phase.

Two real `flwr run` simulations from one start-weights file (``benchmarking.run_app``),
one plain and one with ``secure-aggregation=secagg+``: ``--head-rounds`` head rounds, then
fine-tune rounds to ``--rounds``, every node sampled. Per phase it reports the server's
round time (rounds after the first of the phase, which also pays for tracing and the
activation cache), and the bytes the nodes uploaded and were sent. (The error of the
secure mean against the plain one, a single round apart from training, is
tests/test_secagg.py's: later rounds train on and amplify it.)

Usage: python scripts/secagg_cost.py [--nodes 4 --rounds 4 --head-rounds 2] [--dp-clip 1.0]
       python scripts/secagg_cost.py --smallest     # CI size
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarking import (
    REPO,
    machine,
    parse_with_smallest,
    run_app,
    save_start_weights,
    write_report,
)

from fl_app.config import RunConfig, defaults
from fl_app.data.builtin import CLASS_NAMES

MODES = {"plain": {}, "secagg+": {"secure-aggregation": "secagg+"}}
SMALLEST = {"nodes": 3, "rounds": 2, "head_rounds": 1, "examples": 32}
# --dp-clip: both runs clip on the nodes and noise the mean (the fl-dp-sa pattern).
DP_CLIENT = {"dp": "client", "dp-noise-multiplier": 1.0}


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run config both runs share."""
    return {
        "num-server-rounds": args.rounds,
        "head-rounds": args.head_rounds,
        "backbone": args.backbone,
        "input-size": args.input_size,
        "max-examples-per-node": args.examples,
        "max-test-examples": args.test_examples,
        "fraction-evaluate": 0.0,
        "min-train-nodes": args.nodes,
        "min-available-nodes": args.nodes,
        # A max weight near the nodes' examples keeps the weights precise.
        "secagg-max-weight": float(args.examples),
        **(DP_CLIENT | {"dp-clip": args.dp_clip} if args.dp_clip else {}),
    }


def phase_costs(rounds: list[dict[str, Any]], head_rounds: int) -> dict[str, dict[str, float]]:
    """Per phase: mean round time after its first round, mean bytes up and down."""
    costs = {}
    for phase, chosen in (
        ("head", rounds[:head_rounds]),
        ("fine-tune", rounds[head_rounds:]),
    ):
        if not chosen:
            continue
        later = chosen[1:] or chosen
        costs[phase] = {
            "round_s": statistics.mean(r["round_time"] for r in later),
            "bytes_up": statistics.mean(r["bytes_received"] for r in chosen),
            "bytes_down": statistics.mean(r["bytes_sent"] for r in chosen),
        }
    return costs


def markdown(costs: dict[str, dict[str, dict[str, float]]]) -> str:
    """Seconds and MB per round, per phase, plain against SecAgg+."""
    lines = [
        "| phase | round, plain (s) | round, SecAgg+ (s) | up, plain (MB) | up, SecAgg+ (MB) "
        "| down, plain (MB) | down, SecAgg+ (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for phase in costs["plain"]:
        plain, secure = costs["plain"][phase], costs["secagg+"][phase]
        lines.append(
            f"| {phase} | {plain['round_s']:.1f} | {secure['round_s']:.1f} | "
            f"{plain['bytes_up'] / 1e6:.2f} | {secure['bytes_up'] / 1e6:.2f} | "
            f"{plain['bytes_down'] / 1e6:.2f} | {secure['bytes_down'] / 1e6:.2f} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--head-rounds", type=int, default=2)
    parser.add_argument("--backbone", default="resnet50", help="resnet50 or efficientnet_lite0")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--examples", type=int, default=500, help="per node")
    parser.add_argument("--test-examples", type=int, default=500, help="server test set")
    parser.add_argument(
        "--dp-clip",
        type=float,
        default=0.0,
        help="both runs under dp=client with this clip, noise multiplier 1 (0: no DP)",
    )
    parser.add_argument("--json", type=Path, default=Path("outputs/secagg_cost.json"))
    args = parse_with_smallest(parser, SMALLEST)
    if not 1 <= args.head_rounds < args.rounds:
        parser.error("expected 1 <= --head-rounds < --rounds: both phases are measured")
    if args.nodes < 3:
        parser.error("--nodes must be >= 3: SecAgg+ needs a threshold of at least 2 of them")
    return args


def main() -> int:
    args = parse_args()
    started_on = machine()
    config = run_config(args)
    costs, runs = {}, {}
    with tempfile.TemporaryDirectory(prefix="fl_app-secagg-") as tmp:
        # A random start drawn in each ServerApp may differ: both runs load one file.
        start = Path(tmp) / "start.weights.h5"
        parsed = RunConfig.parse({**defaults(), **config, "weights": "none"}, check_files=False)
        save_start_weights(parsed, (28, 28, 1), len(CLASS_NAMES["fashion_mnist"]), start)
        config["weights"] = str(start)
        for mode, extra in MODES.items():
            out = Path(tmp) / mode.replace("+", "plus")
            run = run_app(out, REPO, {**config, **extra}, args.nodes, dict(os.environ))
            runs[mode] = run
            costs[mode] = phase_costs(run["rounds"], args.head_rounds)
            print(f"{mode}: {run['wall_time']:.0f} s", file=sys.stderr)
    print(
        f"\n{args.backbone} (random start), {args.input_size} px, {args.nodes} nodes of "
        f"{args.examples} Fashion-MNIST images, {args.head_rounds} head and "
        f"{args.rounds - args.head_rounds} fine-tune rounds"
        + (f", dp=client with clip {args.dp_clip:g}" if args.dp_clip else "")
        + f"; {os.cpu_count()} CPUs.\n"
    )
    print(markdown(costs))
    write_report(args, started_on, costs=costs, runs=runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
