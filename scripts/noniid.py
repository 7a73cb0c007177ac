"""Non-IID benchmark: FL algorithms against label skew, from a pretrained start.

One Hydra multirun of fl_app's launcher (``python -m fl_app.launch.experiment -m``, local
simulations): ``+experiment=noniid`` sets the budget (``conf/experiment/noniid.yaml``:
EfficientNet-Lite0 from its ImageNet weights, frozen, all of Fashion-MNIST over 10 nodes,
the full test set, personalised evaluation), and the sweep crosses every label split of
``conf/noniid/split`` with every algorithm of ``conf/noniid/algorithm``. The launcher's
sweep summary (``summary.csv``, with the first round at 85 % server accuracy) is the
table; this script also writes it grouped by split (``table.md``), a plot with one panel
per split (``noniid.png``) and the per-round numbers (``results.json``) into ``--out``.

Usage: python scripts/noniid.py [--out docs/noniid] [--jobs outputs/noniid] [override ...]
       python scripts/noniid.py --from outputs/noniid   (table and plot of a finished sweep)

Extra ``key=value`` arguments are Hydra overrides for every job, for a quicker look:
``python scripts/noniid.py --splits iid --algorithms fedavg num_server_rounds=3``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarking import REPO
from omegaconf import OmegaConf

from fl_app.launch.experiment import CONF_DIR
from fl_app.launch.sweep import JobSummary, read_sweep, summarize_sweep

# The options of conf/noniid/split and conf/noniid/algorithm, in table order.
SPLITS = ("dirichlet_0.1", "dirichlet_0.5", "iid")
ALGORITHMS = ("fedavg", "fedprox_mu0.01", "fedprox_mu1", "fedadam", "fedavgm")
SPLIT_GROUP, ALGORITHM_GROUP = "noniid/split", "noniid/algorithm"
EXPERIMENT = CONF_DIR / "experiment" / "noniid.yaml"
SPLIT_TITLES = {"dirichlet_0.1": "Dirichlet α = 0.1", "dirichlet_0.5": "Dirichlet α = 0.5"}
ALGORITHM_TITLES = {
    "fedavg": "FedAvg",
    "fedprox_mu0.01": "FedProx μ = 0.01",
    "fedprox_mu1": "FedProx μ = 1",
    "fedadam": "FedAdam",
    "fedavgm": "FedAvgM",
}
# Flower's baselines/niid_bench README (a 2-conv CNN from scratch, 10 nodes, 50 rounds x
# 10 local epochs, SGD): Fashion-MNIST server accuracy in %, by split, FedAvg and FedProx.
REFERENCE = {"iid": (89.0, 89.5), "dirichlet_0.5": (88.4, 88.6)}
NONE = "-"


def sweep_command(
    jobs: Path, splits: list[str], algorithms: list[str], overrides: list[str]
) -> list[str]:
    """The launcher's command line of the benchmark's multirun into ``jobs``."""
    return [
        sys.executable,
        "-m",
        "fl_app.launch.experiment",
        "-m",
        "+experiment=noniid",
        f"+{SPLIT_GROUP}={','.join(splits)}",
        f"+{ALGORITHM_GROUP}={','.join(algorithms)}",
        *overrides,
        f"hydra.sweep.dir={jobs}",
    ]


def choice(job: JobSummary, group: str) -> str:
    """The option of ``group`` a job ran with, from its Hydra overrides."""
    for override in job.overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+") == group:
            return value
    raise ValueError(f"job {job.job} has no +{group}=... override: not a noniid sweep job")


def target_accuracy() -> float:
    """The server accuracy whose first round the sweep summary reports (the experiment's)."""
    return float(OmegaConf.load(EXPERIMENT).hydra.callbacks.sweep_summary.target_accuracy)


def results(sweep: Path, target: float) -> dict:
    """Per job: split, algorithm, status, server accuracy per round, summary numbers."""
    rows = []
    for job in read_sweep(sweep):
        rows.append(
            {
                "job": job.job,
                "split": choice(job, SPLIT_GROUP),
                "algorithm": choice(job, ALGORITHM_GROUP),
                "overrides": list(job.overrides),
                "status": job.status,
                "rounds": job.rounds,
                "accuracy": [a for _, a in job.accuracy],
                "final": job.final_server_accuracy,
                "best": job.best_server_accuracy,
                "best_round": job.best_round,
                "target_round": job.first_round_reaching(target),
                "personalized_accuracy": list(job.personalized_accuracy),
                "wall_s": job.wall_time_s,
            }
        )
    return {"target_accuracy": target, "jobs": rows}


def _pct(value: float | None) -> str:
    return NONE if value is None else f"{100 * value:.1f}"


def table(res: dict) -> str:
    """Markdown: one row per job, grouped by split, with the reference beside its split."""
    target = f"{100 * res['target_accuracy']:g} %"
    lines = [
        f"| labels | algorithm | final | best (round) | first round ≥ {target} "
        "| personalised | wall |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate(SPLITS + ALGORITHMS)}
    for row in sorted(
        res["jobs"], key=lambda r: (order.get(r["split"], 99), order.get(r["algorithm"], 99))
    ):
        best = _pct(row["best"])
        if row["best_round"] is not None:
            best += f" (r{row['best_round']})"
        reached = row["target_round"]
        if reached is None:
            reached = "never" if row["rounds"] else NONE
        personal = row["personalized_accuracy"]
        cells = [
            SPLIT_TITLES.get(row["split"], row["split"].upper()),
            ALGORITHM_TITLES.get(row["algorithm"], row["algorithm"]),
            _pct(row["final"]) if row["status"] == "completed" else row["status"],
            best,
            f"r{reached}" if isinstance(reached, int) else reached,
            _pct(personal[-1] if personal else None),
            NONE if row["wall_s"] is None else f"{row['wall_s']:.0f} s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for split, (fedavg, fedprox) in REFERENCE.items():
        title = SPLIT_TITLES.get(split, split.upper())
        lines.append(
            f"| {title} | niid_bench CNN: FedAvg / FedProx | {fedavg} / {fedprox} | | | | |"
        )
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    """Server accuracy per round, one panel per split, one line per algorithm."""
    from matplotlib.figure import Figure

    splits = [s for s in SPLITS if any(r["split"] == s for r in res["jobs"])]
    splits += sorted({r["split"] for r in res["jobs"]} - set(splits))
    fig = Figure(figsize=(4.2 * len(splits), 4), layout="constrained")
    axes = fig.subplots(1, len(splits), sharey=True, squeeze=False)[0]
    for ax, split in zip(axes, splits, strict=True):
        for row in res["jobs"]:
            # From round 1: round 0 is the untrained head, at chance on every split.
            if row["split"] == split and row["accuracy"][1:]:
                algorithm = row["algorithm"]
                # One colour per algorithm on every panel.
                known = ALGORITHMS.index(algorithm) if algorithm in ALGORITHMS else -1
                ax.plot(
                    range(1, len(row["accuracy"])),
                    row["accuracy"][1:],
                    marker="o",
                    ms=2,
                    color=f"C{known}" if known >= 0 else None,
                    label=ALGORITHM_TITLES.get(algorithm, algorithm),
                )
        ax.axhline(res["target_accuracy"], color="grey", lw=0.8, ls=":")
        ax.set_title(SPLIT_TITLES.get(split, split.upper()))
        ax.set_xlabel("round")
        ax.set_ylim(0.5, 0.95)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("server test accuracy (dotted: the target)")
    axes[0].legend(fontsize="small", loc="lower right")
    fig.savefig(path, dpi=100)


def report(sweep: Path, out: Path) -> str:
    """Summarise a finished sweep into ``out``; return the table."""
    target = target_accuracy()
    summary, _ = summarize_sweep(sweep, target)
    res = results(sweep, target)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.csv").write_text(summary.read_text())
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    text = table(res)
    (out / "table.md").write_text(text + "\n")
    plot(res, out / "noniid.png")
    return text


def main() -> int:
    """Run the sweep (or take a finished one) and write the table and plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "noniid")
    parser.add_argument("--jobs", type=Path, default=REPO / "outputs" / "noniid")
    parser.add_argument("--from", dest="sweep", type=Path, help="a finished sweep: no new runs")
    parser.add_argument("--splits", default=",".join(SPLITS), help="options of noniid/split")
    parser.add_argument(
        "--algorithms", default=",".join(ALGORITHMS), help="options of noniid/algorithm"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every job")
    args = parser.parse_args()
    sweep, code = args.sweep, 0
    if sweep is None:
        sweep = args.jobs.resolve()
        command = sweep_command(
            sweep, args.splits.split(","), args.algorithms.split(","), args.overrides
        )
        print(" ".join(command[1:]), flush=True)
        start = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, check=False)
        code = done.returncode
        print(f"sweep: {time.perf_counter() - start:.0f} s, exit code {code}")
        if not (sweep / "0").is_dir():
            return code or 1
    # A sweep with failed jobs is still reported (they show as failed), and still exits 1.
    print(report(sweep, args.out.resolve()))
    return code


if __name__ == "__main__":
    sys.exit(main())
