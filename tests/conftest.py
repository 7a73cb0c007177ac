"""Real Flower processes for end-to-end tests: a SuperLink on a free loopback port."""

from __future__ import annotations

import io
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from flwr.app import MessageType, Metadata

from fl_app.launch.flower_cli import FlowerCLI
from fl_app.launch.local_superlink import LocalSuperLink

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

    def run(self, results_dir: Path, run_config: dict[str, object], num_supernodes: int = 2):
        results_dir.mkdir(parents=True, exist_ok=True)
        run_dir = results_dir / "run"
        run_id = self.cli.submit(
            REPO,
            {"results-dir": str(run_dir), **run_config},
            {"num-supernodes": num_supernodes},
            config_file=results_dir / "run_config.toml",
        )
        log = io.StringIO()
        self.cli.follow(run_id, log)
        status = self.cli.wait(run_id)
        return FinishedRun(run_id, status.status, status.details, log.getvalue(), run_dir)


@pytest.fixture(scope="session")
def superlink(tmp_path_factory) -> SimulationRunner:
    """A `flower-superlink --simulation` for the session, stopped by PID at the end."""
    with LocalSuperLink(tmp_path_factory.mktemp("flwr_home")) as link:
        yield SimulationRunner(link.cli, link)


def log_lines(text: str, pattern: str) -> list[str]:
    """Lines of a Flower log that match a regular expression (ANSI colours removed)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return [line for line in plain.splitlines() if re.search(pattern, line)]


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


@pytest.fixture
def flwr_warnings():
    """Flower's warning lines, as log records (its logger does not propagate to caplog)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
