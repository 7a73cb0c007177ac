"""The Hydra launcher end to end: real `flwr run` simulations, sweeps, Ctrl-C, a dead ServerApp."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from fl_app.launch import processes
from fl_app.launch.experiment import mark_metrics

TINY = [
    "num_server_rounds=2",
    "head_rounds=1",
    "dataset.max_examples_per_node=64",
    "dataset.max_test_examples=100",
]


def started_under(marker: Path) -> set[int]:
    """PIDs of live processes whose environment mentions ``marker`` (read-only).

    The launcher's private FLWR_HOME lives in TMPDIR, which the tests point into
    their own folder; every process the launcher starts inherits it.
    """
    found = set()
    needle = str(marker)
    for proc in psutil.process_iter():
        try:
            if processes.alive(proc) and any(needle in v for v in proc.environ().values()):
                found.add(proc.pid)
        except psutil.Error:
            continue  # ended meanwhile, or not ours to read
    return found - {os.getpid()}


def left_behind(marker: Path, timeout: float = 30) -> set[int]:
    """Processes the launcher started (see ``started_under``) that are still running."""
    deadline = time.monotonic() + timeout
    while (alive := started_under(marker)) and time.monotonic() < deadline:
        time.sleep(1)
    return alive


@pytest.fixture(autouse=True)
def nothing_left(tmp_path):
    """After the test (and its own checks): stop what a failed launcher test left, by PID.

    A test that fails before its launcher stopped kills the launcher, whose private
    SuperLink would outlive it; the processes are found by the TMPDIR they inherited.
    """
    yield
    found = []
    for pid in started_under(tmp_path / "tmp"):
        with contextlib.suppress(psutil.Error):
            found.append(psutil.Process(pid))
    processes.stop(found, timeout=10)


def launcher_env(tmp_path: Path) -> dict[str, str]:
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    # Ray would follow TMPDIR too, into socket paths longer than Unix allows.
    return {**os.environ, "TMPDIR": str(tmp), "RAY_TMPDIR": "/tmp"}


def launch(tmp_path: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fl_app.launch.experiment", *args],
        cwd=tmp_path,
        env=launcher_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.e2e
def test_single_simulation_run_writes_into_the_hydra_folder(tmp_path):
    out = tmp_path / "job"
    done = launch(tmp_path, *TINY, f"hydra.run.dir={out}")

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "completed" and status["flower_status"] == "finished:completed"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    for name in (
        "final.keras",
        "best.keras",
        "config.resolved.yaml",
        "flower.log",
        "run_config.toml",
    ):
        assert (out / name).is_file(), name
    # Progress was streamed, and TensorBoard got every round's numbers.
    assert "Round 2 summary" in done.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = out.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    steps = [e.step for e in accumulator.Tensors("server_accuracy")]
    assert steps == [0, 1, 2]
    assert left_behind(tmp_path / "tmp") == set()


def moments(run_dir: Path) -> list[str]:
    """The kinds of server-optimiser moments in a run folder's checkpoint (none: [])."""
    files = list(run_dir.glob("state-r*.npz"))
    if not files:
        return []
    with np.load(files[0]) as state:
        return sorted({str(key).split("/")[0] for key in state["keys"]})


@pytest.mark.e2e
def test_multirun_runs_every_job_and_summarises_the_sweep(tmp_path):
    # One job per strategy family through Hydra's strategy= group: a server optimiser with
    # momentum, an adaptive one, and FedProx on the nodes; on Dirichlet partitions, with
    # personalised evaluation.
    sweep = tmp_path / "sweep"
    done = launch(
        tmp_path,
        "-m",
        *TINY,
        "num_server_rounds=1",
        "partitioner=dirichlet",
        "personalize_epochs=1",
        "strategy=fedavgm,fedadam,fedprox",
        f"hydra.sweep.dir={sweep}",
    )

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["overrides"].split()[-1] for r in rows] == [
        "strategy=fedavgm",
        "strategy=fedadam",
        "strategy=fedprox",
    ]
    for row in rows:
        assert row["status"] == "completed" and row["rounds"] == "1"
        assert 0 <= float(row["final_server_accuracy"]) <= 1
        assert 0 <= float(row["final_personalized_accuracy"]) <= 1
        assert float(row["bytes_sent"]) > 0 and float(row["wall_time_s"]) > 0
    png = (sweep / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5_000
    # Each job's server logged its rule, and kept the moments it has in its checkpoint.
    for job, rule in enumerate(("fedavgm", "fedadam", "fedprox")):
        assert f"Strategy {rule}" in (sweep / str(job) / "flower.log").read_text()
    assert "proximal mu 0.01 on the nodes" in (sweep / "2" / "flower.log").read_text()
    assert [moments(sweep / str(job)) for job in range(3)] == [["first"], ["first", "second"], []]
    assert left_behind(tmp_path / "tmp") == set()


@pytest.mark.e2e
def test_ctrl_c_stops_the_run_and_everything_the_launcher_started(tmp_path):
    out = tmp_path / "job"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fl_app.launch.experiment",
            *TINY,
            "num_server_rounds=50",
            f"hydra.run.dir={out}",
        ],
        cwd=tmp_path,
        env=launcher_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # wait until training has really started
            if "Round 1:" in line:
                break
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, rest[-3000:]
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "interrupted"
    metrics = json.loads((out / "metrics.json").read_text())  # what was written so far stays
    assert metrics["status"] == "interrupted" and metrics["rounds"][0]["round"] == 0
    assert left_behind(tmp_path / "tmp") == set()


@pytest.mark.parametrize("argv", [["federation=deployment", "federation.address=127.0.0.1:1"]])
def test_unreachable_superlink_fails_cleanly(tmp_path, argv):
    out = tmp_path / "job"
    done = launch(tmp_path, *argv, f"hydra.run.dir={out}", timeout=300)
    assert done.returncode == 1
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and status["run_id"] is None


def test_mark_metrics_keeps_what_the_serverapp_wrote(tmp_path):
    written = {"status": "running", "num_rounds": 5, "rounds": [{"round": 0}, {"round": 1}]}
    (tmp_path / "metrics.json").write_text(json.dumps(written))
    mark_metrics(tmp_path, "failed", "finished:failed: No heartbeat received from the task")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == {
        **written,
        "status": "failed",
        "failure": "finished:failed: No heartbeat received from the task",
    }
    assert list(metrics)[:2] == ["status", "failure"]  # read first
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left


def test_mark_metrics_without_a_metrics_file_writes_one_with_no_rounds(tmp_path):
    mark_metrics(tmp_path, "failed", "finished:failed: the ServerApp raised")
    assert json.loads((tmp_path / "metrics.json").read_text()) == {
        "status": "failed",
        "failure": "finished:failed: the ServerApp raised",
        "rounds": [],
    }


def rounds_recorded(run_dir: Path) -> list[int]:
    """Rounds in the run folder's metrics.json so far (none while it is not there)."""
    try:
        return [r["round"] for r in json.loads((run_dir / "metrics.json").read_text())["rounds"]]
    except (OSError, ValueError, KeyError):
        return []


def runs_a_serverapp(proc: psutil.Process) -> bool:
    """Whether ``proc`` runs a ServerApp: `flwr-serverapp`, or in a simulation `flwr-simulation`."""
    try:
        return any(
            Path(arg).name in ("flwr-simulation", "flwr-serverapp") for arg in proc.cmdline()
        )
    except psutil.Error:
        return False


@pytest.mark.e2e
def test_a_killed_serverapp_fails_the_run_and_the_launcher(tmp_path):
    out = tmp_path / "job"
    with (tmp_path / "launcher.log").open("w") as launcher_log:
        launcher = psutil.Popen(
            [
                sys.executable,
                "-m",
                "fl_app.launch.experiment",
                *TINY,
                "num_server_rounds=5",
                "head_rounds=5",
                f"hydra.run.dir={out}",
            ],
            cwd=tmp_path,
            env=launcher_env(tmp_path),
            stdout=launcher_log,
            stderr=subprocess.STDOUT,
        )
    started: list[processes.ProcessRecord | None] = []
    try:
        processes.wait_until(
            lambda: max(rounds_recorded(out), default=-1) >= 1,
            300,
            proc=launcher,
            what="round 1 in metrics.json",
        )
        tree = launcher.children(recursive=True)
        started = [processes.ProcessRecord.of(p) for p in tree]
        (serverapp,) = [p for p in tree if runs_a_serverapp(p)]
        before = json.loads((out / "metrics.json").read_text())
        serverapp.kill()  # SIGKILL: it writes nothing more
        killed = time.monotonic()
        returncode = launcher.wait(180)
        took = time.monotonic() - killed
    finally:
        if processes.alive(launcher):  # the test failed: Ctrl-C stops what it started
            launcher.send_signal(signal.SIGINT)
            with contextlib.suppress(psutil.TimeoutExpired):
                launcher.wait(60)
        processes.stop([launcher, *(p for r in started if r and (p := r.process()))])
    log = (tmp_path / "launcher.log").read_text()
    print(f"the launcher ended {took:.0f} s after the ServerApp was killed")

    assert returncode == 1, log[-3000:]
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and status["flower_status"] == "finished:failed"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "failed"
    assert status["details"] and metrics["failure"] == f"finished:failed: {status['details']}"
    # What the ServerApp wrote stays: every round recorded before the kill, its run info.
    assert metrics["rounds"][: len(before["rounds"])] == before["rounds"]
    assert set(before) <= set(metrics)
    alive = [record for record in started if record is not None and record.process()]
    assert alive == [], "processes the launcher started are still running"
    assert left_behind(tmp_path / "tmp") == set()


def _actor_cpu_seconds(raylet: psutil.Process) -> float:
    """CPU time of the ClientApp actors among a Ray node's workers (0 when none ran)."""
    seconds = 0.0
    for proc in raylet.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a worker may end between the two calls
            if proc.cmdline()[:1] == ["ray::ClientAppActor"]:
                times = proc.cpu_times()
                seconds += times.user + times.system
    return seconds


@pytest.mark.e2e
def test_a_ray_cluster_federation_runs_client_actors_on_both_ray_nodes(tmp_path):
    from ray.cluster_utils import Cluster

    # Two Ray nodes of one CPU each on this machine: one ClientApp actor fits on each.
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Unix socket paths stay short
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    try:
        cluster.add_node(num_cpus=1)
        raylets = [
            psutil.Process(node.all_processes["raylet"][0].process.pid)
            for node in cluster.list_all_nodes()
        ]
        out = tmp_path / "job"
        log_path = tmp_path / "launcher.log"
        with log_path.open("w") as log_file:
            launcher = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fl_app.launch.experiment",
                    *TINY,
                    "federation=ray-cluster",
                    f"federation.ray_address={cluster.address}",
                    "federation.num_supernodes=2",
                    f"hydra.run.dir={out}",
                ],
                cwd=tmp_path,
                # A Ray temp dir of its own hides the cluster from Ray's search of this
                # machine: only federation.ray_address can lead the run to it.
                env={**launcher_env(tmp_path), "RAY_TMPDIR": ray_tmp},
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            actor_seconds = [0.0, 0.0]
            while launcher.poll() is None:
                # Actors end with the run: keep the most CPU time seen on each node.
                seen = [_actor_cpu_seconds(raylet) for raylet in raylets]
                actor_seconds = [max(a, b) for a, b in zip(actor_seconds, seen, strict=True)]
                time.sleep(1)
        finally:
            if launcher.poll() is None:
                processes.stop([psutil.Process(launcher.pid)], timeout=30)
        assert launcher.returncode == 0, log_path.read_text()[-3000:]
        assert json.loads((out / "status.json").read_text())["status"] == "completed"
        assert all(seconds > 0 for seconds in actor_seconds), actor_seconds
    finally:
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert left_behind(tmp_path / "tmp") == set()
