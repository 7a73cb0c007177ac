#!/usr/bin/env python3
"""Split a dataset into one data folder per SuperNode, for deployment demos.

Each folder gets partition.npz (uint8 images x, labels y); start a SuperNode on it
with --node-config 'data-dir="/abs/path/node-0"'.

Usage: python scripts/prepare_node_data.py --out node-data --nodes 2 [--partitioner dirichlet]
"""

import argparse
import sys
from pathlib import Path

# Runnable from a checkout without installing fl_app.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_app.data import DATASETS, PARTITION_FILE, PARTITIONERS, prepare_node_dirs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for node-<i>/ folders")
    parser.add_argument("--nodes", required=True, type=int, help="number of SuperNodes")
    parser.add_argument("--dataset", default="fashion_mnist", choices=DATASETS)
    parser.add_argument("--partitioner", default="iid", choices=PARTITIONERS)
    parser.add_argument("--alpha", default=0.5, type=float, help="Dirichlet concentration")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--max-examples", default=0, type=int, help="cap per node (0 = none)")
    args = parser.parse_args()
    existing = [p for p in args.out.glob(f"node-*/{PARTITION_FILE}")]
    if existing:
        print(f"error: {existing[0]} exists; refusing to overwrite node data", file=sys.stderr)
        return 2
    try:
        folders = prepare_node_dirs(
            args.out,
            args.nodes,
            args.dataset,
            args.partitioner,
            args.alpha,
            args.seed,
            args.max_examples,
        )
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for folder in folders:
        print(f"--node-config 'data-dir=\"{folder.resolve()}\"'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
