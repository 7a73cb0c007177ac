#!/usr/bin/env python3
"""Per-round time of a deployment (TLS SuperLink + SuperNodes) against a simulation.

Runs the same federated training four times on this machine, on the same
examples per node (a Fashion-MNIST IID partition capped at --examples), and
reads each round's time from metrics.json:

1. simulation, feature cache off      (the baseline)
2. deployment, feature cache off      (a fresh ClientApp process per message)
3. deployment, feature cache on       (head rounds train on cached features)
4. simulation, feature cache on

It prints a markdown table with ratios against the baseline and writes JSON.

Usage: fl-app bench deployment [--rounds 4 --head-rounds 2 --examples 600]
"""

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Runnable from a checkout without installing fl_app.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_app.data import prepare_node_dirs
from fl_app.deploy.local_federation import LocalFederation
from fl_app.launch.flower_cli import FlowerCLI
from fl_app.launch.local_superlink import LocalSuperLink

REPO = Path(__file__).resolve().parents[1]


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
        "final_server_accuracy": rounds[-1].get("server_accuracy"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--head-rounds", type=int, default=2)
    parser.add_argument("--examples", type=int, default=600, help="examples per node")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--input-size", type=int, default=32)
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
            ("simulation, cache off", "simulation", False),
            ("deployment, cache off", "deployment", False),
            ("deployment, cache on", "deployment", True),
            ("simulation, cache on", "simulation", True),
        ]
        for name, kind, cache in cases:
            config = {**base, "feature-cache": cache}
            out = root / name.replace(", ", "-").replace(" ", "-")
            started = time.monotonic()
            if kind == "simulation":
                with LocalSuperLink(root / f"home-{len(results)}") as link:
                    results[name] = run(link.cli, config, {"num-supernodes": args.nodes}, out)
            else:
                fed = LocalFederation(
                    root / f"federation-{len(results)}", num_nodes=args.nodes, data_dirs=data
                )
                with fed:
                    results[name] = run(fed.cli, config, None, out)
            results[name]["wall_time"] = time.monotonic() - started
            print(f"{name}: mean round {results[name]['mean_round']:.1f} s", file=sys.stderr)

    baseline = results["simulation, cache off"]
    print(
        f"\n{args.nodes} nodes x {args.examples} examples, {args.rounds} rounds "
        f"({args.head_rounds} head), input {args.input_size} px; seconds per round\n"
    )
    print("| run | mean round | head rounds | fine-tune rounds | vs baseline | final acc |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['mean_round']:.1f} | {r.get('mean_head', float('nan')):.1f} | "
            f"{r.get('mean_fine-tune', float('nan')):.1f} | "
            f"{r['mean_round'] / baseline['mean_round']:.2f}x | "
            f"{r['final_server_accuracy']:.4f} |"
        )
    args.json.write_text(
        json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2)
    )
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
