"""Summarise a Hydra multirun sweep: one CSV row per job and a server-accuracy plot.

A sweep folder holds one folder per job (``0/``, ``1/``, ...), each with Hydra's
``.hydra/overrides.yaml`` and, when the job got that far, our launcher's
``status.json`` and the ServerApp's ``metrics.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fl_app.run_folder import METRICS

COLUMNS = (
    "job",
    "overrides",
    "status",
    "rounds",
    "final_server_accuracy",
    "best_server_accuracy",
    "best_round",
    "wall_time_s",
    "bytes_sent",
    "bytes_received",
    "final_epsilon",
    "final_personalized_accuracy",
)
# Filled when a sweep is summarised with a target accuracy: it, and the first round there.
TARGET_COLUMNS = ("target_accuracy", "target_round")
COLUMNS += TARGET_COLUMNS
# Columns of the printed table that only some sweeps have: (CSV column, heading, digits).
OPTIONAL_COLUMNS = (
    ("final_epsilon", "ε", 2),
    ("final_personalized_accuracy", "personalised", 4),
)
# Printed for a sweep summarised with a target accuracy where a job never reached it.
NEVER = "never"
SUMMARY_CSV = "summary.csv"
ACCURACY_PNG = "accuracy.png"


@dataclass(frozen=True)
class JobSummary:
    """What one sweep job left behind; ``None`` where it wrote no such value."""

    job: int
    overrides: tuple[str, ...]
    status: str
    rounds: int | None
    final_server_accuracy: float | None
    best_server_accuracy: float | None
    best_round: int | None
    wall_time_s: float | None
    bytes_sent: int | None
    bytes_received: int | None
    # ε spent by the last round of a run with client-level DP.
    final_epsilon: float | None = None
    # (round, server_accuracy) pairs in round order, round 0 included.
    accuracy: tuple[tuple[int, float], ...] = ()
    # The nodes' personalised heads' accuracy, round by round (personalize-epochs).
    personalized_accuracy: tuple[float, ...] = ()

    @property
    def final_personalized_accuracy(self) -> float | None:
        """The personalised accuracy of the last round that reported one."""
        return self.personalized_accuracy[-1] if self.personalized_accuracy else None

    def first_round_reaching(self, target: float) -> int | None:
        """The first round whose server accuracy is at least ``target``, or ``None``."""
        return next((r for r, accuracy in self.accuracy if accuracy >= target), None)

    @property
    def label(self) -> str:
        """The job's overrides joined by spaces, or ``job N`` when it has none."""
        return " ".join(self.overrides) or f"job {self.job}"


def read_sweep(sweep_dir: str | os.PathLike[str]) -> list[JobSummary]:
    """Read every job folder of a sweep, in numeric job order.

    Parameters
    ----------
    sweep_dir
        A Hydra multirun folder, e.g. ``multirun/2026-11-25/12-00-00``.

    Returns
    -------
    list[JobSummary]
        One entry per direct subfolder whose name is an integer.

    Raises
    ------
    FileNotFoundError
        If ``sweep_dir`` does not exist.
    ValueError
        If ``sweep_dir`` is not a folder or holds no job folders.
    """
    root = Path(sweep_dir)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    if not root.is_dir():
        raise ValueError(f"{root} is a file, not a Hydra multirun sweep folder")
    jobs = sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdigit()),
        key=lambda p: int(p.name),
    )
    if not jobs:
        raise ValueError(
            f"{root} holds no Hydra job folders (0/, 1/, ...): is it a multirun sweep folder?"
        )
    return [_read_job(p) for p in jobs]


def summarize_sweep(
    sweep_dir: str | os.PathLike[str], target_accuracy: float = 0.0
) -> tuple[Path, Path]:
    """Write ``summary.csv`` and ``accuracy.png`` into a Hydra multirun sweep folder.

    Parameters
    ----------
    sweep_dir
        A Hydra multirun folder, e.g. ``multirun/2026-11-25/12-00-00``.
    target_accuracy
        When > 0, columns ``target_accuracy`` and ``target_round`` say which round first
        reached this server accuracy (empty: none did); 0 leaves both empty.

    Returns
    -------
    tuple[Path, Path]
        The paths of the CSV (one row per job, columns :data:`COLUMNS`) and of the plot
        (server accuracy per round, one line per job that has any).

    Raises
    ------
    FileNotFoundError
        If ``sweep_dir`` does not exist.
    ValueError
        If ``sweep_dir`` is not a folder or holds no job folders.
    """
    root = Path(sweep_dir)
    jobs = read_sweep(root)
    csv_path, png_path = root / SUMMARY_CSV, root / ACCURACY_PNG
    _write_csv(jobs, csv_path, target_accuracy)
    _plot_accuracy(jobs, png_path, title=f"Server accuracy per round ({root.resolve().name})")
    return csv_path, png_path


def main(argv: list[str] | None = None) -> int:
    """Command line: summarise a sweep folder and print a markdown table of its jobs.

    Parameters
    ----------
    argv
        Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns
    -------
    int
        0 on success, 2 if the folder is missing or is not a sweep folder.
    """
    parser = argparse.ArgumentParser(
        prog="summarize_sweep",
        description=(
            "Summarise a Hydra multirun sweep of fl_app: writes <sweep_dir>/summary.csv "
            "(one row per job: overrides, status, rounds, final and best server accuracy, "
            "wall time, bytes sent/received, final DP epsilon, final personalised accuracy, "
            "first round at the target accuracy) and <sweep_dir>/accuracy.png (server "
            "accuracy per round, one line per job), then prints a markdown table of the jobs."
        ),
    )
    parser.add_argument("sweep_dir", help="the sweep folder, e.g. multirun/2026-11-25/12-00-00")
    parser.add_argument(
        "--target-accuracy",
        type=_target_accuracy,
        default=0.0,
        help="also report the first round whose server accuracy reached this (0 < a <= 1; "
        "0: no target)",
    )
    args = parser.parse_args(argv)
    try:
        csv_path, png_path = summarize_sweep(args.sweep_dir, args.target_accuracy)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(csv_path)
    print(png_path)
    print()
    print(summary_table(csv_path))
    return 0


def summary_table(csv_path: Path) -> str:
    """The markdown table of a ``summary.csv``: what the file holds, so the two cannot disagree."""
    with csv_path.open(newline="") as f:
        return markdown_table(list(csv.DictReader(f)))


def _target_accuracy(text: str) -> float:
    try:
        value = float(text)
        check_target_accuracy(value)
    except ValueError as err:
        # argparse prints an ArgumentTypeError's own message, a ValueError's not.
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def check_target_accuracy(value: float) -> None:
    """Raise ``ValueError`` unless ``value`` is 0 (no target) or an accuracy in (0, 1]."""
    if not 0 <= value <= 1:
        raise ValueError(f"target accuracy {value} is not allowed: expected 0 (none) or 0 < a <= 1")


def markdown_table(rows: list[dict[str, str]]) -> str:
    """Format ``summary.csv`` rows as a compact markdown table.

    Parameters
    ----------
    rows
        Rows as :class:`csv.DictReader` reads them from ``summary.csv``.

    Returns
    -------
    str
        Columns job, overrides, status, final, best (with its round) and wall time, ε when
        a job ran with client-level DP, the final personalised accuracy when a job
        personalised, and the first round at the target accuracy when the summary had one.
    """
    optional = [column for column in OPTIONAL_COLUMNS if any(row.get(column[0]) for row in rows)]
    header = ["job", "overrides", "status", "final", "best", "wall time"]
    header += [heading for _, heading, _ in optional]
    target = next((row["target_accuracy"] for row in rows if row.get("target_accuracy")), "")
    if target:
        header.append(f"first round ≥ {float(target):g}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        best = _fixed(row["best_server_accuracy"], 4)
        if best and row["best_round"]:
            best += f" (r{row['best_round']})"
        wall = _fixed(row["wall_time_s"], 1)
        cells = (
            row["job"],
            row["overrides"].replace("|", r"\|"),
            row["status"],
            _fixed(row["final_server_accuracy"], 4),
            best,
            f"{wall} s" if wall else "",
        )
        cells += tuple(_fixed(row.get(name, ""), digits) for name, _, digits in optional)
        if target:
            reached = row.get("target_round", "")
            cells += (f"r{reached}" if reached else NEVER if row["rounds"] else "",)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fixed(text: str, digits: int) -> str:
    return f"{float(text):.{digits}f}" if text else ""


def _read_job(job_dir: Path) -> JobSummary:
    overrides = _load(job_dir / ".hydra" / "overrides.yaml", yaml.safe_load)
    status = _load(job_dir / "status.json", json.loads)
    metrics = _load(job_dir / METRICS, json.loads)
    if not isinstance(status, dict):
        status = {}
    if not isinstance(metrics, dict):
        metrics = None

    rounds: list[dict[str, Any]] = []
    if metrics is not None:
        rounds = sorted(
            (
                r
                for r in metrics.get("rounds") or []
                if isinstance(r, dict) and _is_int(r.get("round"))
            ),
            key=lambda r: r["round"],
        )
    accuracy = tuple(
        (r["round"], float(r["server_accuracy"]))
        for r in rounds
        if r["round"] >= 0 and _is_number(r.get("server_accuracy"))
    )
    # max() keeps the first maximum: ties go to the earliest round, as the strategy's "best".
    best = max(accuracy, key=lambda pair: pair[1]) if accuracy else None
    wall_time = status.get("wall_time")
    return JobSummary(
        job=int(job_dir.name),
        overrides=tuple(str(o) for o in overrides) if isinstance(overrides, list) else (),
        status=str(status.get("status") or (metrics or {}).get("status") or "unknown"),
        rounds=sum(r["round"] >= 1 for r in rounds) if metrics is not None else None,
        final_server_accuracy=accuracy[-1][1] if accuracy else None,
        best_server_accuracy=best[1] if best else None,
        best_round=best[0] if best else None,
        wall_time_s=float(wall_time) if _is_number(wall_time) else None,
        bytes_sent=_sum_bytes(rounds, "bytes_sent"),
        bytes_received=_sum_bytes(rounds, "bytes_received"),
        final_epsilon=_last_number(rounds, "dp_epsilon"),
        accuracy=accuracy,
        personalized_accuracy=tuple(
            float(r["personalized_accuracy"])
            for r in rounds
            if _is_number(r.get("personalized_accuracy"))
        ),
    )


def _load(path: Path, parse: Callable[[str], Any]) -> Any:
    # A missing file is normal (the job failed early); an unreadable one is warned about
    # but must not hide the rest of the sweep.
    try:
        return parse(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, yaml.YAMLError) as err:
        warnings.warn(f"ignoring {path}: {err}", stacklevel=2)
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    # JSON from Python may hold NaN/Infinity; they are no accuracy or time to report.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _last_number(rounds: list[dict[str, Any]], key: str) -> float | None:
    """The last round's ``key``, among the rounds that have it as a number."""
    values = [r[key] for r in rounds if _is_number(r.get(key))]
    return float(values[-1]) if values else None


def _sum_bytes(rounds: list[dict[str, Any]], key: str) -> int | None:
    values = [r[key] for r in rounds if _is_number(r.get(key))]
    return int(sum(values)) if values else None


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _write_csv(jobs: list[JobSummary], path: Path, target_accuracy: float) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for job in jobs:
            values = {name: getattr(job, name) for name in COLUMNS if name not in TARGET_COLUMNS}
            values["overrides"] = " ".join(job.overrides)
            if target_accuracy > 0:
                values["target_accuracy"] = target_accuracy
                values["target_round"] = job.first_round_reaching(target_accuracy)
            writer.writerow(_cell(values.get(name)) for name in COLUMNS)


def _plot_accuracy(jobs: list[JobSummary], path: Path, title: str) -> None:
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    plotted = [job for job in jobs if job.accuracy]
    # Label lines by what tells them apart; overrides shared by every job are noise.
    shared = (
        set.intersection(*(set(job.overrides) for job in plotted)) if len(plotted) > 1 else set()
    )
    for i, job in enumerate(plotted):
        rounds, accuracy = zip(*job.accuracy, strict=True)
        # The default colour cycle has 10 colours: change the dash pattern after that.
        style = ("-", "--", ":", "-.")[i // 10 % 4]
        label = " ".join(o for o in job.overrides if o not in shared) or job.label
        ax.plot(rounds, accuracy, style, marker="o", markersize=3, label=label)
    if plotted:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no job has server accuracy", ha="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel("server accuracy")
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
