"""Real Flower processes for end-to-end tests: a SuperLink on a free loopback port."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLWR = str(Path(sys.executable).with_name("flwr"))
SUPERLINK = str(Path(sys.executable).with_name("flower-superlink"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a process we started, by its PID: TERM, then KILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


@dataclass
class FinishedRun:
    """What a test needs from one `flwr run`: status, log and the run folder."""

    run_id: int
    status: str
    details: str
    log: str
    run_dir: Path | None


@dataclass
class LocalSuperLink:
    """A simulation SuperLink this test session started, and how to use it."""

    port: int
    flwr_home: Path
    env: dict[str, str]

    def flwr(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [FLWR, *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def run(
        self,
        results_dir: Path,
        run_config: dict[str, object],
        federation_config: str = "num-supernodes=2",
    ) -> FinishedRun:
        """`flwr run .` against this SuperLink; wait for the end and read the outcome."""
        overrides = {"results-dir": str(results_dir), **run_config}
        config = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
        started = self.flwr(
            "run",
            ".",
            "test",
            "--format",
            "json",
            "--run-config",
            config,
            "--federation-config",
            federation_config,
        )
        assert started.returncode == 0, started.stdout + started.stderr
        run_id = int(json.loads(started.stdout)["run-id"])
        # `flwr log` streams until the run ends.
        log = self.flwr("log", str(run_id), "test")
        status = {}
        for _ in range(60):
            listed = self.flwr("ls", "test", "--run-id", str(run_id), "--format", "json")
            status = json.loads(listed.stdout)["runs"][0]
            if status["status"].startswith("finished"):
                break
            time.sleep(1)
        run_dirs = sorted(results_dir.glob(f"*-run{run_id}"))
        return FinishedRun(
            run_id=run_id,
            status=status["status"],
            details=status.get("status-details", ""),
            log=log.stdout + log.stderr,
            run_dir=run_dirs[0] if run_dirs else None,
        )


@pytest.fixture(scope="session")
def superlink(tmp_path_factory) -> LocalSuperLink:
    """Start `flower-superlink --simulation` on a free port; stop it by PID after."""
    port = free_port()
    home = tmp_path_factory.mktemp("flwr_home")
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n'
        f'[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "RAY_TMPDIR": str(tmp_path_factory.mktemp("ray")),
    }
    log = (home / "superlink.out").open("w")
    proc = subprocess.Popen(
        [
            SUPERLINK,
            "--insecure",
            "--simulation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ],
        cwd=home,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, (home / "superlink.out").read_text()
                assert time.monotonic() < deadline, "SuperLink did not become healthy"
                time.sleep(0.3)
        link = LocalSuperLink(port=port, flwr_home=home, env=env)
        yield link
        # A test that failed mid-run leaves its run going: stop it before the SuperLink,
        # or its simulation and Ray processes outlive the SuperLink.
        listed = link.flwr("ls", "test", "--format", "json", timeout=60)
        for run in json.loads(listed.stdout or "{}").get("runs", []):
            if not run["status"].startswith("finished"):
                link.flwr("stop", str(run["run-id"]), "test", timeout=60)
    finally:
        stop_process(proc)
        log.close()


def log_lines(text: str, pattern: str) -> list[str]:
    """Lines of a Flower log that match a regular expression (ANSI colours removed)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return [line for line in plain.splitlines() if re.search(pattern, line)]
