"""fl_app.launch.sweep on real sweep folders written to disk, and its command line."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from matplotlib.image import imread

from fl_app.launch.sweep import COLUMNS, main, markdown_table, read_sweep, summarize_sweep

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_job(
    sweep: Path,
    job: int,
    overrides: list[str] | None = None,
    metrics: dict | None = None,
    status: dict | None = None,
) -> None:
    job_dir = sweep / str(job)
    (job_dir / ".hydra").mkdir(parents=True)
    if overrides is not None:
        (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (job_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if status is not None:
        (job_dir / "status.json").write_text(json.dumps(status))


def training_round(n: int, server_accuracy: float | None, sent: int, received: int) -> dict:
    record = {
        "round": n,
        "phase": "head",
        "learning_rate": 0.001,
        "bytes_sent": sent,
        "bytes_received": received,
        "train_replies": 2,
        "rejected_replies": 0,
        "model_updated": True,
        "train_loss": 5.6,
        "train_accuracy": 0.156,
        "eval_loss": 2.8,
        "eval_accuracy": 0.133,
        "round_time": 20.1,
        "server_loss": 3.06,
    }
    if server_accuracy is not None:
        record["server_accuracy"] = server_accuracy
    return record


def metrics_file(status: str, accuracies: list[float | None], num_rounds: int = 3) -> dict:
    """metrics.json for round 0 (accuracy 0.1) then one round per accuracy given."""
    rounds = [{"round": 0, "server_loss": 5.87, "server_accuracy": 0.1}]
    rounds += [
        training_round(i, acc, sent=1000 * i, received=100 * i)
        for i, acc in enumerate(accuracies, start=1)
    ]
    return {"status": status, "init": "random", "num_rounds": num_rounds, "rounds": rounds}


def status_file(status: str, wall_time: float | None) -> dict:
    return {
        "status": status,
        "run_id": 123 if status == "completed" else None,
        "wall_time": wall_time,
        "flower_status": f"finished:{status}",
        "details": "",
    }


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Jobs 0..10: 0 = known completed run, 1 = failed early, 2 = failed after 1 round,
    3 = no overrides and no server accuracy, 4..10 = completed runs."""
    root = tmp_path / "12-00-00"
    (root / ".hydra").mkdir(parents=True)  # Not a job folder; must be skipped.
    (root / "multirun.yaml").write_text("hydra: {}\n")
    (root / "notes").mkdir()
    write_job(
        root,
        0,
        ["partitioner=iid", "strategy.fraction_train=0.5"],
        # Best (0.4) is round 2; final is round 3's 0.35.
        metrics_file("completed", [0.3, 0.4, 0.35]),
        status_file("completed", 81.2),
    )
    write_job(root, 1, ["partitioner=dirichlet"], None, status_file("failed", 4.5))
    write_job(root, 2, ["input_size=64"], metrics_file("failed", [0.25]), None)
    no_server_eval = metrics_file("completed", [None, None])
    del no_server_eval["rounds"][0]["server_accuracy"]
    write_job(root, 3, [], no_server_eval, status_file("interrupted", None))
    for job in range(4, 11):
        write_job(
            root,
            job,
            [f"seed={job}"],
            metrics_file("completed", [0.2, 0.2 + job / 100]),
            status_file("completed", 60.0 + job),
        )
    return root


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        return list(reader)


def test_summary_csv_has_one_row_per_job_in_numeric_order(sweep: Path) -> None:
    csv_path, png_path = summarize_sweep(sweep)

    assert csv_path == sweep / "summary.csv"
    assert png_path == sweep / "accuracy.png"
    rows = read_rows(csv_path)
    assert [row["job"] for row in rows] == [str(i) for i in range(11)]
    assert list(rows[0]) == [
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
        "target_accuracy",
        "target_round",
    ]


def test_summary_csv_values(sweep: Path) -> None:
    rows = read_rows(summarize_sweep(sweep)[0])

    assert rows[0] == {
        "job": "0",
        "overrides": "partitioner=iid strategy.fraction_train=0.5",
        "status": "completed",
        "rounds": "3",
        "final_server_accuracy": "0.35",
        "best_server_accuracy": "0.4",
        "best_round": "2",
        "wall_time_s": "81.2",
        "bytes_sent": str(1000 + 2000 + 3000),
        "bytes_received": str(100 + 200 + 300),
        "final_epsilon": "",
        "final_personalized_accuracy": "",
        "target_accuracy": "",
        "target_round": "",
    }
    # Failed before writing metrics.json: status and wall time only.
    assert rows[1] == {
        "job": "1",
        "overrides": "partitioner=dirichlet",
        "status": "failed",
        "rounds": "",
        "final_server_accuracy": "",
        "best_server_accuracy": "",
        "best_round": "",
        "wall_time_s": "4.5",
        "bytes_sent": "",
        "bytes_received": "",
        "final_epsilon": "",
        "final_personalized_accuracy": "",
        "target_accuracy": "",
        "target_round": "",
    }
    # No status.json: the status comes from metrics.json.
    assert rows[2] == {
        "job": "2",
        "overrides": "input_size=64",
        "status": "failed",
        "rounds": "1",
        "final_server_accuracy": "0.25",
        "best_server_accuracy": "0.25",
        "best_round": "1",
        "wall_time_s": "",
        "bytes_sent": "1000",
        "bytes_received": "100",
        "final_epsilon": "",
        "final_personalized_accuracy": "",
        "target_accuracy": "",
        "target_round": "",
    }
    # Rounds but no server accuracy anywhere; null wall time.
    assert rows[3] == {
        "job": "3",
        "overrides": "",
        "status": "interrupted",
        "rounds": "2",
        "final_server_accuracy": "",
        "best_server_accuracy": "",
        "best_round": "",
        "wall_time_s": "",
        "bytes_sent": "3000",
        "bytes_received": "300",
        "final_epsilon": "",
        "final_personalized_accuracy": "",
        "target_accuracy": "",
        "target_round": "",
    }
    assert rows[10]["overrides"] == "seed=10"
    assert float(rows[10]["final_server_accuracy"]) == pytest.approx(0.3)
    assert rows[10]["best_round"] == "2"
    assert rows[10]["wall_time_s"] == "70.0"


def test_status_unknown_without_status_or_metrics(tmp_path: Path) -> None:
    write_job(tmp_path, 0)

    rows = read_rows(summarize_sweep(tmp_path)[0])

    assert rows == [
        {"job": "0", "overrides": "", "status": "unknown"} | {c: "" for c in COLUMNS[3:]}
    ]


def test_best_round_ties_go_to_the_earliest_round(tmp_path: Path) -> None:
    write_job(tmp_path, 0, ["a=1"], metrics_file("completed", [0.5, 0.5, 0.2]))

    (job,) = read_sweep(tmp_path)

    assert (job.best_server_accuracy, job.best_round, job.final_server_accuracy) == (0.5, 1, 0.2)
    assert job.accuracy == ((0, 0.1), (1, 0.5), (2, 0.5), (3, 0.2))


def test_accuracy_png_is_a_readable_png(sweep: Path) -> None:
    png_path = summarize_sweep(sweep)[1]

    assert png_path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(png_path)
    # 8 x 5 inches at 100 dpi, RGBA.
    assert image.shape == (500, 800, 4)
    # Not a blank canvas: lines and text leave many non-white pixels.
    assert (image[..., :3] < 0.9).any(axis=-1).sum() > 1000


def test_accuracy_png_is_written_when_no_job_has_accuracy(tmp_path: Path) -> None:
    write_job(tmp_path, 0, ["a=1"], None, status_file("failed", 1.0))

    png_path = summarize_sweep(tmp_path)[1]

    assert png_path.read_bytes()[:8] == PNG_SIGNATURE
    assert imread(png_path).shape == (500, 800, 4)


def test_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        summarize_sweep(tmp_path / "nowhere")


def test_folder_without_jobs_raises(tmp_path: Path) -> None:
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    (tmp_path / "not-a-job").mkdir()

    with pytest.raises(ValueError, match=r"holds no Hydra job folders \(0/, 1/, \.\.\.\)"):
        summarize_sweep(tmp_path)
    assert not (tmp_path / "summary.csv").exists()


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fl_app.cli", "sweep", "summarize", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_prints_paths_and_table(sweep: Path) -> None:
    done = run_script(str(sweep))

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == str(sweep / "summary.csv")
    assert lines[1] == str(sweep / "accuracy.png")
    assert "| job | overrides | status | final | best | wall time |" in lines
    assert (
        "| 0 | partitioner=iid strategy.fraction_train=0.5 | completed | 0.3500 | 0.4000 (r2) "
        "| 81.2 s |"
    ) in lines
    assert "| 1 | partitioner=dirichlet | failed |  |  | 4.5 s |" in lines
    table = [line for line in lines if line.startswith("| ")]
    assert len(table) == 1 + 11
    assert (sweep / "summary.csv").is_file()


@pytest.mark.parametrize("make_jobless", [False, True])
def test_cli_error_is_one_line_and_exit_code_2(tmp_path: Path, make_jobless: bool) -> None:
    target = tmp_path / "sweep"
    if make_jobless:
        target.mkdir()

    done = run_script(str(target))

    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith(f"error: {target} ")


def test_main_help_explains_outputs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])

    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "summary.csv" in out
    assert "accuracy.png" in out


def test_unreadable_file_is_warned_about_and_the_job_kept(tmp_path: Path) -> None:
    write_job(tmp_path, 0, ["a=1"], metrics_file("completed", [0.5]))
    (tmp_path / "0" / "status.json").write_text('{"status": "compl')

    with pytest.warns(UserWarning, match="status.json"):
        rows = read_rows(summarize_sweep(tmp_path)[0])

    assert [(r["job"], r["status"], r["final_server_accuracy"]) for r in rows] == [
        ("0", "completed", "0.5")
    ]


def test_a_dp_sweep_reports_the_epsilon_each_job_spent(tmp_path: Path) -> None:
    root = tmp_path / "dp-sweep"
    for job, noise in enumerate((0.5, 2.0)):
        metrics = metrics_file("completed", [0.3, 0.35])
        for n, record in enumerate(metrics["rounds"][1:], start=1):
            record |= {"dp_epsilon": n * 4.0 / noise, "dp_delta": 1e-5}
        write_job(root, job, [f"dp=server dp.noise_multiplier={noise}"], metrics)

    rows = read_rows(summarize_sweep(root)[0])
    assert [row["final_epsilon"] for row in rows] == ["16.0", "4.0"]
    table = markdown_table(rows).splitlines()
    assert table[0] == "| job | overrides | status | final | best | wall time | ε |"
    assert table[3].endswith("| 4.00 |")


def test_a_personalising_sweep_reports_the_last_rounds_personalized_accuracy(
    tmp_path: Path,
) -> None:
    root = tmp_path / "personal-sweep"
    for job, epochs in enumerate((0, 5)):
        metrics = metrics_file("completed", [0.3, 0.35, 0.4])
        for n, record in enumerate(metrics["rounds"][1:], start=1):
            if epochs:
                record |= {"personalized_accuracy": 0.5 + n / 10, "personalized_loss": 1.0}
        write_job(root, job, [f"personalize_epochs={epochs}"], metrics)

    jobs = read_sweep(root)
    assert [job.final_personalized_accuracy for job in jobs] == [None, 0.8]
    rows = read_rows(summarize_sweep(root)[0])
    assert [row["final_personalized_accuracy"] for row in rows] == ["", "0.8"]
    table = markdown_table(rows).splitlines()
    assert table[0] == "| job | overrides | status | final | best | wall time | personalised |"
    assert table[2].endswith("|  |") and table[3].endswith("| 0.8000 |")


def test_a_target_accuracy_adds_the_first_round_that_reached_it(tmp_path: Path) -> None:
    root = tmp_path / "target-sweep"
    write_job(root, 0, ["strategy=fedavg"], metrics_file("completed", [0.7, 0.86, 0.84, 0.9]))
    write_job(root, 1, ["strategy=fedadam"], metrics_file("completed", [0.5, 0.6]))
    write_job(root, 2, ["strategy=fedprox"], None, status_file("failed", 3.0))

    assert [job.first_round_reaching(0.85) for job in read_sweep(root)] == [2, None, None]
    rows = read_rows(summarize_sweep(root, target_accuracy=0.85)[0])
    assert [(row["target_accuracy"], row["target_round"]) for row in rows] == [
        ("0.85", "2"),
        ("0.85", ""),
        ("0.85", ""),
    ]
    table = markdown_table(rows).splitlines()
    assert table[0].endswith("| first round ≥ 0.85 |")
    # Ran and never got there, against never ran.
    assert [line.rsplit("|", 2)[1].strip() for line in table[2:]] == ["r2", "never", ""]


def test_without_a_target_the_target_columns_stay_empty(sweep: Path) -> None:
    rows = read_rows(summarize_sweep(sweep)[0])
    assert {(row["target_accuracy"], row["target_round"]) for row in rows} == {("", "")}
    assert "first round" not in markdown_table(rows)


@pytest.mark.parametrize("value", ["1.5", "-0.1", "most"])
def test_cli_refuses_a_target_that_is_no_accuracy(sweep: Path, value: str) -> None:
    done = run_script(str(sweep), "--target-accuracy", value)

    assert done.returncode == 2
    assert value in done.stderr.splitlines()[-1]
    if value != "most":
        assert "0 < a <= 1" in done.stderr.splitlines()[-1]


def test_cli_target_accuracy(sweep: Path) -> None:
    done = run_script(str(sweep), "--target-accuracy", "0.25")

    assert done.returncode == 0, done.stderr
    assert (
        "| 0 | partitioner=iid strategy.fraction_train=0.5 | completed | 0.3500 | 0.4000 (r2) "
        "| 81.2 s | r1 |" in done.stdout.splitlines()
    )
