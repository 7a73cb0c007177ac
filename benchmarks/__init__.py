"""Benchmarks and reports of fl_app; not part of the installed package."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_launcher(name: str, overrides: list[str], job_dir: Path, keep_log: bool = False) -> float:
    """Run one job of fl_app's Hydra launcher into ``job_dir``; its wall time in seconds.

    A fresh process per job, as a user's would be. With ``keep_log`` its output
    goes to ``job_dir/launcher.log``. Raises ``RuntimeError`` naming ``name`` when
    the job fails.
    """
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "fl_app.launch.experiment", *overrides, f"hydra.run.dir={job_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if keep_log:
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "launcher.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall


def parse_with_smallest(
    parser: argparse.ArgumentParser, smallest: Mapping[str, Any]
) -> argparse.Namespace:
    """Parse argv with a ``--smallest`` flag that sets every option of ``smallest`` (CI size)."""
    parser.add_argument(
        "--smallest",
        action="store_true",
        help="CI size: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in smallest.items()),
    )
    args = parser.parse_args()
    if args.smallest:
        for key, value in smallest.items():
            setattr(args, key, value)
    return args


def write_report(args: argparse.Namespace, machine: Mapping[str, Any], **parts: Any) -> None:
    """Write ``args.json``: the machine, the arguments (paths as text), then ``parts``."""
    args.json.parent.mkdir(parents=True, exist_ok=True)
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.json.write_text(json.dumps({"machine": machine, "args": arguments, **parts}, indent=2))
    print(f"\nwrote {args.json}")
