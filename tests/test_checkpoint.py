"""Checkpoints in the run folder: written every round, atomically, and what `resume` reads."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord

from fl_app.config import RunConfig, defaults
from fl_app.resume import check_resumable
from fl_app.run_folder import CHECKPOINT, RunFolder, load_checkpoint
from fl_app.schedule import TransferSchedule
from fl_app.strategy import TransferFedAvg
from fl_app.wire.exchange import ServerExchange

KEYS = ("conv/kernel", "dense/kernel", "dense/bias")


def arrays(value: float) -> ArrayRecord:
    return ArrayRecord({key: Array(np.full((3, 2), value, np.float32)) for key in KEYS})


def strategy(folder, rounds_done: int = 0) -> TransferFedAvg:
    run = RunFolder(folder, lambda arrays, path: path.write_bytes(b"model"))
    return TransferFedAvg(
        schedule=TransferSchedule(2, 1e-3, 1e-4, 32),
        folder=run,
        wire=ServerExchange("trainable", "none", {}),
        rounds_done=rounds_done,
    )


def test_every_round_leaves_a_checkpoint_that_loads_with_its_records(tmp_path):
    run = strategy(tmp_path)
    run.wire.bases, run.wire._holders = {"b1": arrays(0.0)}, {5: "b1", 6: "b1"}
    for server_round, accuracy in ((0, 0.1), (1, 0.6), (2, 0.4)):
        run._end_round(server_round, arrays(server_round), MetricRecord({"accuracy": accuracy}))

    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.round == 2
    assert list(checkpoint.arrays.keys()) == list(KEYS)
    np.testing.assert_array_equal(checkpoint.arrays["dense/bias"].numpy(), np.full((3, 2), 2.0))
    assert [r["round"] for r in checkpoint.rounds] == [0, 1, 2]
    assert checkpoint.run_info["best"] == {"round": 1, "server_accuracy": 0.6}
    assert checkpoint.holders == {5: "b1", 6: "b1"} and list(checkpoint.bases) == ["b1"]
    # One arrays file: the older rounds' are gone; one base file, written once.
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["base-b1.npz", "checkpoint-r0002.npz"]

    # A resumed run continues the records and the best accuracy.
    resumed = strategy(tmp_path, rounds_done=2)
    resumed.folder.continue_from(checkpoint)
    resumed._end_round(3, arrays(3.0), MetricRecord({"accuracy": 0.5}))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == [0, 1, 2, 3]
    assert saved["best"] == {"round": 1, "server_accuracy": 0.6}  # 0.5 is no new best


def test_a_crash_while_checkpointing_leaves_the_previous_checkpoint(tmp_path):
    run = strategy(tmp_path)
    run._end_round(0, arrays(0.0), MetricRecord({"accuracy": 0.1}))
    # Killed after the next arrays file was written, before checkpoint.json was renamed:
    (tmp_path / ".checkpoint-r0001.partial.npz").write_bytes(b"half")
    (tmp_path / f".{CHECKPOINT}.partial").write_text("{")
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.round == 0
    np.testing.assert_array_equal(checkpoint.arrays["conv/kernel"].numpy(), np.zeros((3, 2)))


def test_a_folder_without_checkpoint_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"resume=.* is not allowed: expected a run folder") as err:
        load_checkpoint(tmp_path)
    assert "\n" not in str(err.value)
    # The launcher and the server refuse it before anything starts.
    with pytest.raises(ValueError, match=r"resume=.* is not allowed: .* holding checkpoint.json"):
        RunConfig.parse({**defaults(), "resume": str(tmp_path)})


def test_resuming_with_another_model_or_data_is_refused_naming_the_key(tmp_path):
    (tmp_path / "checkpoint.json").write_text("{}")
    config = RunConfig.parse({**defaults(), "resume": str(tmp_path)})
    (tmp_path / "config.json").write_text(
        json.dumps({"run_config": defaults(), "classes": ["a", "b"]})
    )
    check_resumable(config, ("a", "b"), tmp_path)  # the same: fine
    with pytest.raises(ValueError, match=r"input-size=64 is not allowed|with input-size=64"):
        check_resumable(
            RunConfig.parse({**defaults(), "resume": str(tmp_path), "input-size": 64}),
            ("a", "b"),
            tmp_path,
        )
    with pytest.raises(ValueError, match=r"with classes=.*that run had classes=") as err:
        check_resumable(config, ("a", "c"), tmp_path)
    assert "\n" not in str(err.value)


CRASH = """
import os, sys
import numpy as np
from flwr.app import Array, ArrayRecord
from fl_app.run_folder import RunFolder

folder, value, stage, keys = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
arrays = ArrayRecord({k: Array(np.full((3, 2), value, np.float32)) for k in keys.split(",")})
run = RunFolder(folder, lambda arrays, path: path.write_bytes(f"model {value:g}".encode()))
real_replace = os.replace

def crash_before(src, dst):
    # The process dies right after the temporary file is written, before its rename.
    if os.path.basename(dst) == stage:
        os._exit(9)
    real_replace(src, dst)

os.replace = crash_before
run.save(arrays, "best.keras")
run.checkpoint(int(value), arrays, {}, {})
"""


@pytest.mark.parametrize("stage", ["best.keras", "checkpoint-r0002.npz", "checkpoint.json"])
def test_a_process_killed_while_saving_leaves_the_previous_files_whole(tmp_path, stage):
    def run(value: float, crash_at: str) -> int:
        return subprocess.run(
            [sys.executable, "-c", CRASH, str(tmp_path), str(value), crash_at, ",".join(KEYS)],
            check=False,
        ).returncode

    assert run(1.0, "none") == 0
    assert run(2.0, stage) == 9  # killed mid-save
    # What the first process saved is whole; the second one's half is never read.
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.round == 1
    np.testing.assert_array_equal(checkpoint.arrays["conv/kernel"].numpy(), np.ones((3, 2)))
    expected = b"model 2" if stage != "best.keras" else b"model 1"
    assert (tmp_path / "best.keras").read_bytes() == expected
