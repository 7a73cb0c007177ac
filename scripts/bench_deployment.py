#!/usr/bin/env python3
"""Per-round time of a deployment (TLS SuperLink + SuperNodes) against a simulation.

Runs the same federated training four times on this machine, on the same
examples per node (a Fashion-MNIST IID partition capped at --examples), and
reads each round's time from metrics.json:

1. simulation, feature cache off      (the baseline)
2. deployment, feature cache off      (a fresh ClientApp process per message,
                                       handing it to the node's warm worker)
3. deployment, feature cache on       (head rounds train on cached features)
4. simulation, feature cache on

and, with ``--cold``, a deployment whose nodes run every message in its own
process (node config ``warm-worker=false``), as before the warm worker. It
prints a markdown table with ratios against the baseline, the start-up cost of
a fresh ClientApp process (what a deployed message pays before any work), and
writes JSON.

Usage: python scripts/bench_deployment.py [--rounds 4 --head-rounds 2 --examples 600]
"""

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarking import REPO

from fl_app.data import prepare_node_dirs
from fl_app.deploy.local_federation import LocalFederation
from fl_app.launch.flower_cli import FlowerCLI
from fl_app.launch.local_superlink import LocalSuperLink

# What a fresh process imports before it can work, cumulatively: Python, Flower's
# ClientApp process, our ClientApp (the hand-over), the work itself (TensorFlow, Keras).
FLOWER = "import flwr.supernode.cli.flwr_clientapp"
STARTUP = {
    "interpreter": "pass",
    "+ Flower's flwr-clientapp": FLOWER,
    "+ fl_app.client_app (hands over)": f"{FLOWER}, fl_app.client_app",
    "+ fl_app.client_task (TensorFlow)": f"{FLOWER}, fl_app.client_task",
}


def startup_profile(repeats: int) -> dict[str, float]:
    """Median wall seconds of a fresh ``python -c`` for each of `STARTUP`'s imports."""
    times = {}
    for name, code in STARTUP.items():
        walls = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
            walls.append(time.perf_counter() - started)
        times[name] = statistics.median(walls)
    return times


def run(cli: FlowerCLI, run_config: dict, federation_config: dict | None, out: Path) -> dict:
    """One run to completion; its per-round times by phase."""
    run_id = cli.submit(REPO, {**run_config, "results-dir": str(out)}, federation_config)
    cli.follow(run_id, io.StringIO())
    status = cli.wait(run_id)
    if not status.completed:
        raise RuntimeError(f"run {run_id} {status.status}: {status.details}")
    rounds = json.loads((out / "metrics.json").read_text())["rounds"][1:]
    by_phase = {
        phase: [r["round_time"] for r in rounds if r["phase"] == phase]
        for phase in ("head", "fine-tune")
    }
    return {
        "round_times": [r["round_time"] for r in rounds],
        "mean_round": statistics.mean(r["round_time"] for r in rounds),
        **{f"mean_{p}": statistics.mean(t) for p, t in by_phase.items() if t},
        # The train message's own time on a node (data, model, training), mean per round.
        "client_times": [r.get("client_time") for r in rounds],
        "final_server_accuracy": rounds[-1].get("server_accuracy"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--head-rounds", type=int, default=2)
    parser.add_argument("--examples", type=int, default=600, help="examples per node")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--cold", action="store_true", help="also a deployment without warm worker")
    parser.add_argument("--repeats", type=int, default=3, help="of each start-up measurement")
    parser.add_argument("--json", type=Path, default=Path("bench_deployment.json"))
    args = parser.parse_args()

    base = {
        "num-server-rounds": args.rounds,
        "head-rounds": args.head_rounds,
        "input-size": args.input_size,
        "max-examples-per-node": args.examples,
        "min-train-nodes": args.nodes,
        "min-evaluate-nodes": args.nodes,
        "min-available-nodes": args.nodes,
        "max-test-examples": 1000,
    }
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fl_app-bench-") as tmp:
        root = Path(tmp)
        data = prepare_node_dirs(root / "data", args.nodes, max_examples=args.examples)
        cases = [
            ("simulation, cache off", "simulation", False, True),
            ("deployment, cache off", "deployment", False, True),
            ("deployment, cache on", "deployment", True, True),
            ("simulation, cache on", "simulation", True, True),
        ]
        if args.cold:
            cases.append(("deployment, cache on, no warm worker", "deployment", True, False))
        for name, kind, cache, warm in cases:
            config = {**base, "feature-cache": cache}
            out = root / name.replace(", ", "-").replace(" ", "-")
            started = time.monotonic()
            if kind == "simulation":
                with LocalSuperLink(root / f"home-{len(results)}") as link:
                    results[name] = run(link.cli, config, {"num-supernodes": args.nodes}, out)
            else:
                fed = LocalFederation(
                    root / f"federation-{len(results)}",
                    num_nodes=args.nodes,
                    data_dirs=data,
                    warm_worker=warm,
                )
                with fed:
                    results[name] = run(fed.cli, config, None, out)
            results[name]["wall_time"] = time.monotonic() - started
            print(f"{name}: mean round {results[name]['mean_round']:.1f} s", file=sys.stderr)

    startup = startup_profile(args.repeats)
    baseline = results["simulation, cache off"]
    print(
        f"\n{args.nodes} nodes x {args.examples} examples, {args.rounds} rounds "
        f"({args.head_rounds} head), input {args.input_size} px; seconds per round\n"
    )
    print(
        "| run | mean round | head rounds | fine-tune rounds | vs baseline | final acc "
        "| each round | train message on a node |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        each = " / ".join(f"{t:.1f}" for t in r["round_times"])
        client = " / ".join(f"{t:.1f}" if t is not None else "-" for t in r["client_times"])
        print(
            f"| {name} | {r['mean_round']:.1f} | {r.get('mean_head', float('nan')):.1f} | "
            f"{r.get('mean_fine-tune', float('nan')):.1f} | "
            f"{r['mean_round'] / baseline['mean_round']:.2f}x | "
            f"{r['final_server_accuracy']:.4f} | {each} | {client} |"
        )
    print(f"\nStart-up of a fresh process, median of {args.repeats} (s, cumulative)\n")
    print("| imports | seconds |\n|---|---|")
    for name, seconds in startup.items():
        print(f"| {name} | {seconds:.2f} |")
    args.json.write_text(
        json.dumps(
            {"args": vars(args) | {"json": str(args.json)}, "results": results, "startup": startup},
            indent=2,
        )
    )
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
