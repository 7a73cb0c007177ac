#!/usr/bin/env python3
"""Many virtual clients on one machine: peak memory and round time by number of clients.

One real `flwr run` simulation per ``--clients`` value (``benchmarking.run_app``),
each on its own local SuperLink with a fresh machine cache: all 60,000 Fashion-MNIST
training images split IID over the clients, ``--per-round`` of them sampled for training
and for evaluation each round (all of them when there are fewer), every round training
the head for one local epoch. The Ray actors serve the nodes one message at a time each
(``--client-cpus`` per actor). The numbers of each run:

* peak memory of the whole process tree (SuperLink, simulation process, ServerApp, Ray
  and its actors), as the sum of each process's PSS: a page several processes share
  (TensorFlow's libraries, a memory-mapped dataset) counts once in the sum, where a sum
  of RSS counts it in every process. Sampled every 0.5 s.
* the server's ``round_time`` of round 1 (every sampled node computes its activations)
  and the mean of the later rounds; and the wall time of the run.

It prints a markdown table and writes JSON.

Usage: python scripts/scale.py [--clients 10 100 1000 --per-round 100 --rounds 3]
       python scripts/scale.py --smallest     # CI size, ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarking import GIB, REPO, machine, parse_with_smallest, run_app, write_report

from fl_app.cache import CACHE_ENV

# The bound for 1,000 clients, 100 per round, on a 2-core 24 GiB machine.
MEMORY_TARGET_GIB = 6.0
SMALLEST = {
    "clients": [4],
    "per_round": 2,
    "rounds": 2,
    "test_examples": 100,
    "examples": 32,
}


def run_config(args: argparse.Namespace, clients: int) -> dict[str, Any]:
    """The run config of the run with ``clients`` virtual clients."""
    sampled = min(clients, args.per_round)
    return {
        "num-server-rounds": args.rounds,
        "head-rounds": args.rounds,
        "backbone": args.backbone,
        "weights": args.weights,
        "input-size": args.input_size,
        "max-examples-per-node": args.examples,
        "max-test-examples": args.test_examples,
        "fraction-train": sampled / clients,
        "fraction-evaluate": sampled / clients,
        "min-train-nodes": sampled,
        "min-evaluate-nodes": sampled,
        "min-available-nodes": clients,
    }


def summary(clients: int, sampled: int, run: dict[str, Any]) -> dict[str, Any]:
    """One table row: memory and round times of a run."""
    rounds = run["rounds"]
    return {
        "clients": clients,
        "sampled": sampled,
        "peak_pss_gib": run["peak_pss"] / GIB,
        "peak_by_process_gib": {k: v / GIB for k, v in run["peak_pss_by_process"].items()},
        "round_1_s": rounds[0]["round_time"],
        "later_rounds_s": statistics.mean(r["round_time"] for r in rounds[1:]),
        "wall_time_s": run["wall_time"],
        "final_accuracy": rounds[-1]["server_accuracy"],
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| clients | sampled per round | peak memory (PSS, GiB) | round 1 (s) | "
        "later rounds (s) | run wall time (s) | final accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['clients']} | {row['sampled']} | {row['peak_pss_gib']:.2f} | "
            f"{row['round_1_s']:.1f} | {row['later_rounds_s']:.1f} | {row['wall_time_s']:.0f} | "
            f"{100 * row['final_accuracy']:.1f} % |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--per-round", type=int, default=100, help="clients sampled per round")
    parser.add_argument("--rounds", type=int, default=3, help="head rounds (>= 2)")
    parser.add_argument("--backbone", default="resnet50", help="resnet50 or efficientnet_lite0")
    parser.add_argument("--weights", default="none", help="none (random), imagenet or a file")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--examples", type=int, default=0, help="per client (0 = its share)")
    parser.add_argument("--test-examples", type=int, default=1000, help="server test set")
    parser.add_argument("--client-cpus", type=float, default=1, help="CPUs per Ray actor")
    parser.add_argument("--json", type=Path, default=Path("outputs/scale.json"))
    args = parse_with_smallest(parser, SMALLEST)
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: later rounds are those after round 1")
    if min(args.clients) < 1 or args.per_round < 1:
        parser.error("--clients and --per-round must be >= 1")
    return args


def main() -> int:
    args = parse_args()
    # A SIGTERM unwinds like Ctrl-C, so every SuperLink we started is stopped by PID.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started_on = machine()
    rows, runs = [], {}
    for clients in args.clients:
        with tempfile.TemporaryDirectory(prefix="fl_app-scale-") as tmp:
            root = Path(tmp)
            # An empty machine cache per run: round 1 computes every activation.
            env = {**os.environ, CACHE_ENV: str(root / "cache")}
            federation = {"client-resources-num-cpus": args.client_cpus}
            config = run_config(args, clients)
            run = run_app(root / "run", REPO, config, clients, env, federation, pss=True)
        run["run_config"] = config
        runs[str(clients)] = run
        rows.append(summary(clients, config["min-train-nodes"], run))
        print(f"{clients} clients: {run['wall_time']:.0f} s", file=sys.stderr)
    print(
        f"\n{args.backbone} ({args.weights} start), input {args.input_size} px, Fashion-MNIST "
        f"IID, {args.rounds} head rounds; {args.client_cpus:g} CPU per Ray actor; "
        f"{os.cpu_count()} CPUs, {started_on['memory_gib']:.0f} GiB. Target: <= "
        f"{MEMORY_TARGET_GIB:g} GiB at 1,000 clients, 100 per round.\n"
    )
    print(markdown(rows))
    write_report(args, started_on, rows=rows, runs=runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
