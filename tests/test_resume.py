"""End to end: the ServerApp is killed mid-run, and `resume` finishes the run from its checkpoint.

Three `flwr run`s on the session's simulation SuperLink: an uninterrupted 4-round run,
one whose ServerApp process is SIGKILLed (by PID) during round 3, and its resume. With
one start weights file, every node sampled every round and seeded local training, the
resumed run's final model is the uninterrupted run's. In a simulation the ServerApp
runs inside `flwr-simulation`, with the Ray processes of the ClientApps below it.
"""

from __future__ import annotations

import io
import json
import signal
import threading

import keras
import numpy as np
import psutil
import pytest
from helpers import REPO, TINY

from fl_app.launch import processes
from fl_app.model.classifier import build_model, to_arrayrecord
from fl_app.run_folder import load_checkpoint

pytestmark = pytest.mark.e2e


def serverapp(superlink) -> psutil.Process:
    """The `flwr-simulation` process of the run in flight, found below the SuperLink by PID."""
    root = psutil.Process(superlink.link.proc.pid)
    found = []

    def command(proc: psutil.Process) -> str:
        try:  # an earlier run's ServerApp may linger as an unreaped zombie
            return " ".join(proc.cmdline())
        except psutil.Error:
            return ""

    def running() -> bool:
        found[:] = [p for p in root.children(recursive=True) if "flwr-simulation" in command(p)]
        return bool(found)

    processes.wait_until(running, 60, what="the ServerApp to start", interval=0.5)
    return found[0]


def final_arrays(run_dir):
    model = keras.saving.load_model(run_dir / "final.keras")
    return to_arrayrecord(model)


def test_a_killed_serverapp_resumes_to_the_model_of_an_uninterrupted_run(superlink, tmp_path):
    start = tmp_path / "start.weights.h5"
    keras.utils.set_random_seed(0)
    build_model(10, (28, 28, 1), 32).save_weights(start)
    config = {**TINY, "num-server-rounds": 4, "head-rounds": 2, "weights": str(start)}

    whole = superlink.run(tmp_path / "whole", config)
    assert whole.status == "finished:completed", whole.details + whole.log[-3000:]

    # The same run, its ServerApp killed once round 2 is recorded (so during round 3).
    killed_dir = tmp_path / "killed" / "run"
    killed_dir.parent.mkdir()
    cli = superlink.cli
    run_id = cli.submit(
        REPO,
        {**config, "results-dir": str(killed_dir)},
        {"num-supernodes": 2},
        config_file=tmp_path / "killed" / "run_config.toml",
    )
    log = io.StringIO()
    follower = threading.Thread(target=cli.follow, args=(run_id, log), daemon=True)
    follower.start()
    app = serverapp(superlink)

    def round_2_recorded() -> bool:
        try:
            rounds = json.loads((killed_dir / "metrics.json").read_text())["rounds"]
        except (OSError, ValueError):
            return False
        return any(r["round"] == 2 for r in rounds)

    processes.wait_until(round_2_recorded, 300, what="round 2 of the run to be killed")
    ray = processes.descendants(app)
    app.send_signal(signal.SIGKILL)
    processes.wait_until(lambda: not processes.alive(app), 10, what="the killed process to end")
    assert not processes.stop(ray)  # the killed process's Ray cluster, orphaned: by PID
    cli.stop(run_id)
    status = cli.wait(run_id, timeout=120)
    assert status.status != "finished:completed", status
    metrics = json.loads((killed_dir / "metrics.json").read_text())
    assert metrics["status"] != "completed"
    done = load_checkpoint(killed_dir).round
    assert 2 <= done < 4

    resumed = superlink.run(tmp_path / "resumed", {**config, "resume": str(killed_dir)})
    assert resumed.status == "finished:completed", resumed.details + resumed.log[-3000:]
    assert f"Resuming {killed_dir} after round {done} of 4" in resumed.log
    metrics = json.loads((killed_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2, 3, 4]
    assert metrics["resumed"][-1]["after_round"] == done
    # Nodes' rounds are seeded by the round number: the schedule went on where it stopped.
    assert [r.get("phase") for r in metrics["rounds"][1:]] == [
        "head",
        "head",
        "fine-tune",
        "fine-tune",
    ]

    expected, got = final_arrays(whole.run_dir), final_arrays(killed_dir)
    assert list(got.keys()) == list(expected.keys())
    for key in expected:
        np.testing.assert_allclose(
            got[key].numpy(), expected[key].numpy(), rtol=1e-4, atol=1e-5, err_msg=key
        )
