"""Shared test helpers: a SimulationRunner for `flwr run`, real Flower Messages, log lines.

Fixtures live in conftest.py; what tests import lives here.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)

from fl_app.data.builtin import fashion_mnist_dirs
from fl_app.launch.flower_cli import FlowerCLI
from fl_app.launch.local_superlink import LocalSuperLink
from fl_app.run_folder import RunFolder
from fl_app.schedule import TransferSchedule
from fl_app.strategy import TransferFedAvg
from fl_app.wire.exchange import ServerExchange

REPO = Path(__file__).resolve().parents[1]
# A run small enough for tests: one head round, one fine-tune round, 32 px, few examples.
TINY = {
    "num-server-rounds": 2,
    "head-rounds": 1,
    "input-size": 32,
    "max-examples-per-node": 96,
    "max-test-examples": 200,
    "batch-size": 32,
}


@dataclass
class FinishedRun:
    """What a test needs from one `flwr run`: status, log and the run folder."""

    run_id: int
    status: str
    details: str
    log: str
    run_dir: Path


class SimulationRunner:
    """Runs the app with `flwr run` on the test session's SuperLink."""

    def __init__(self, cli: FlowerCLI, link: LocalSuperLink | None = None) -> None:
        self.cli = cli
        self.link = link

    def run(
        self,
        results_dir: Path,
        run_config: dict[str, object],
        num_supernodes: int = 2,
        app_dir: Path = REPO,
    ):
        results_dir.mkdir(parents=True, exist_ok=True)
        run_dir = results_dir / "run"
        run_id = self.cli.submit(
            app_dir,
            {"results-dir": str(run_dir), **run_config},
            {"num-supernodes": num_supernodes},
            config_file=results_dir / "run_config.toml",
        )
        log = io.StringIO()
        self.cli.follow(run_id, log)
        status = self.cli.wait(run_id)
        return FinishedRun(run_id, status.status, status.details, log.getvalue(), run_dir)


def log_lines(text: str, pattern: str) -> list[str]:
    """Lines of a Flower log that match a regular expression (ANSI colours removed)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return [line for line in plain.splitlines() if re.search(pattern, line)]


def run_script(name: str, cwd: Path, *args: str) -> str:
    """Run ``python scripts/NAME.py ARGS`` in ``cwd`` to its end (at most 15 min); its output.

    Fails the test when it runs over or exits non-zero. A benchmark stops every
    SuperLink it started, by PID, when terminated.
    """
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / f"{name}.py"), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        log, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.terminate()
        log, _ = proc.communicate(timeout=120)
        pytest.fail(f"scripts/{name}.py {' '.join(args)} ran over 15 min:\n{log[-3000:]}")
    assert proc.returncode == 0, log[-3000:]
    return log


def message_metadata(src: int, dst: int, message_type: str = MessageType.TRAIN) -> Metadata:
    """Metadata of a message from node ``src`` to ``dst`` (0 is the server)."""
    return Metadata(
        run_id=1,
        message_id=f"{src}-{dst}",
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=message_type,
    )


def require_fashion_mnist() -> None:
    """Skip the test unless Fashion-MNIST's files are installed (nodes' data is cut from them)."""
    if not any((d / "train-labels-idx1-ubyte.gz").is_file() for d in fashion_mnist_dirs()):
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def train_metrics(num_examples: float) -> dict[str, float]:
    """The metrics a node's train reply carries, for ``num_examples`` examples."""
    metrics = {"num-examples": num_examples, "train_loss": 1.0, "train_accuracy": 0.5}
    return metrics | {"train_time": 0.1, "client_time": 0.2}


def train_reply(node: int, arrays: dict[str, np.ndarray], num_examples: float) -> Message:
    """Node ``node``'s train reply (float32 ``arrays``) to the server's message ``0-<node>``."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v.astype(np.float32)) for k, v in arrays.items()}),
            "metrics": MetricRecord(train_metrics(num_examples)),
        }
    )
    reply = Message(content, metadata=message_metadata(node, 0))
    reply.metadata.__dict__["_reply_to_message_id"] = f"0-{node}"
    return reply


def strategy_in_round(
    tmp_path: Path, sent: dict[str, np.ndarray], nodes: Iterable[int], **options: Any
) -> TransferFedAvg:
    """A TransferFedAvg that has sent ``sent`` (whole, uncompressed) to ``nodes`` this round."""
    strategy = TransferFedAvg(
        schedule=TransferSchedule(2, 1e-3, 1e-4, 32),
        folder=RunFolder(tmp_path, lambda arrays, path: path.write_bytes(b"model")),
        wire=ServerExchange("full", "none", {}),
        min_train_nodes=2,
        **options,
    )
    strategy.global_arrays = ArrayRecord({k: Array(v) for k, v in sent.items()})
    strategy.wire.start_round()
    strategy.wire.sent = strategy.global_arrays
    strategy._sent = [Message(RecordDict(), metadata=message_metadata(0, n)) for n in nodes]
    return strategy
