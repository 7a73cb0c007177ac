"""scripts/noniid.py: its sweep command, and its table and plot from a sweep folder on disk.

The sweep itself is `python scripts/noniid.py` (see docs/noniid.md); the slow test runs a
two-job version of it end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import noniid
import pytest
import yaml
from matplotlib.image import imread

from fl_app.launch.sweep import read_sweep

REPO = Path(__file__).resolve().parents[1]


def write_job(sweep: Path, job: int, split: str, algorithm: str, accuracy: list[float]) -> None:
    """A job folder as the launcher leaves it: Hydra's overrides, status.json, metrics.json."""
    folder = sweep / str(job)
    (folder / ".hydra").mkdir(parents=True)
    overrides = ["+experiment=noniid", f"+noniid/split={split}", f"+noniid/algorithm={algorithm}"]
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    rounds = [{"round": 0, "server_accuracy": 0.05}]
    rounds += [
        {"round": n, "server_accuracy": a, "personalized_accuracy": 0.9 + n / 100}
        for n, a in enumerate(accuracy, start=1)
    ]
    (folder / "metrics.json").write_text(json.dumps({"status": "completed", "rounds": rounds}))
    status = {"status": "completed", "wall_time": 100.0 + job}
    (folder / "status.json").write_text(json.dumps(status))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    write_job(root, 0, "iid", "fedavg", [0.84, 0.86, 0.87])
    write_job(root, 1, "iid", "fedadam", [0.7, 0.8, 0.79])
    write_job(root, 2, "dirichlet_0.1", "fedavg", [0.6, 0.83, 0.851])
    return root


def test_the_sweep_command_crosses_splits_and_algorithms_in_one_multirun(tmp_path: Path) -> None:
    command = noniid.sweep_command(tmp_path, ["iid", "dirichlet_0.5"], ["fedavg"], ["seed=1"])
    assert command[1:] == [
        "-m",
        "fl_app.launch.experiment",
        "-m",
        "+experiment=noniid",
        "+noniid/split=iid,dirichlet_0.5",
        "+noniid/algorithm=fedavg",
        "seed=1",
        f"hydra.sweep.dir={tmp_path}",
    ]


def test_the_target_is_the_experiments_sweep_summary_target() -> None:
    assert noniid.target_accuracy() == 0.85


def test_report_groups_jobs_by_split_and_says_when_85_percent_came(
    sweep: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    text = noniid.report(sweep, out)

    lines = text.splitlines()
    assert lines[0] == (
        "| labels | algorithm | final | best (round) | first round ≥ 85 % | personalised | wall |"
    )
    # Most skewed split first; within a split, the benchmark's algorithm order.
    assert lines[2] == "| Dirichlet α = 0.1 | FedAvg | 85.1 | 85.1 (r3) | r3 | 93.0 | 102 s |"
    assert lines[3] == "| IID | FedAvg | 87.0 | 87.0 (r3) | r2 | 93.0 | 100 s |"
    assert lines[4] == "| IID | FedAdam | 79.0 | 80.0 (r2) | never | 93.0 | 101 s |"
    assert lines[5].startswith("| IID | niid_bench CNN: FedAvg / FedProx | 89.0 / 89.5 |")
    assert (out / "table.md").read_text() == text + "\n"

    # The sweep summary itself carries the same first rounds.
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0].endswith(",target_accuracy,target_round")
    assert [line.rsplit(",", 1)[1] for line in summary[1:]] == ["2", "", "3"]

    results = json.loads((out / "results.json").read_text())
    assert [(j["split"], j["algorithm"]) for j in results["jobs"]] == [
        ("iid", "fedavg"),
        ("iid", "fedadam"),
        ("dirichlet_0.1", "fedavg"),
    ]
    assert results["jobs"][1]["accuracy"] == [0.05, 0.7, 0.8, 0.79]
    image = imread(out / "noniid.png")
    # Two panels side by side: wider than high.
    assert image.shape[1] > 1.5 * image.shape[0]


def test_a_job_without_the_groups_is_refused(sweep: Path) -> None:
    (sweep / "3" / ".hydra").mkdir(parents=True)
    (sweep / "3" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["seed=3"]))
    job = read_sweep(sweep)[-1]
    with pytest.raises(ValueError, match=r"job 3 has no \+noniid/split"):
        noniid.choice(job, noniid.SPLIT_GROUP)


@pytest.mark.e2e
@pytest.mark.slow
def test_bench_noniid_runs_a_small_sweep_end_to_end(tmp_path: Path) -> None:
    """Two tiny jobs (IID and α = 0.5, FedAvg) through `python scripts/noniid.py`."""
    jobs, out = tmp_path / "jobs", tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            REPO / "scripts" / "noniid.py",
            "--jobs",
            str(jobs),
            "--out",
            str(out),
            "--splits",
            "iid,dirichlet_0.5",
            "--algorithms",
            "fedavg",
            "num_server_rounds=2",
            "model.input_size=32",
            "dataset.max_examples_per_node=100",
            "dataset.max_test_examples=200",
            "federation.num_supernodes=3",
            "strategy.min_available_nodes=3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [(j["split"], j["status"], j["rounds"]) for j in results["jobs"]] == [
        ("iid", "completed", 2),
        ("dirichlet_0.5", "completed", 2),
    ]
    # The launcher's own sweep summary, written at the end of the multirun, has the target.
    assert "target_round" in (jobs / "summary.csv").read_text().splitlines()[0]
    assert all(len(j["personalized_accuracy"]) == 2 for j in results["jobs"])
    assert "| IID | FedAvg |" in done.stdout
