"""Drive Flower from Python: a local SuperLink process and runs through the `flwr` CLI.

Used by the experiment launcher and the end-to-end tests. Every process started
here is stopped by the PID it got; runs are stopped through the SuperLink.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import tomli_w

# The console scripts of the interpreter running us, not whatever PATH finds first.
BIN = Path(sys.executable).parent
FLWR = str(BIN / "flwr")
FLOWER_SUPERLINK = str(BIN / "flower-superlink")
CONNECTION = "fl-app"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a process we started, by its PID: SIGTERM, then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid`` (Linux ``/proc``), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may contain spaces and parentheses.
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        found += kids
        todo += kids
    return found


def stop_pids(pids: list[int], timeout: float = 15) -> None:
    """SIGTERM processes by PID, then SIGKILL those still there after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [pid for pid in alive if _running(pid)]
        pids = alive
        if not pids:
            return


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def write_connection(
    flwr_home: Path,
    address: str,
    insecure: bool = True,
    root_certificates: str | None = None,
) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one default connection named ``fl-app``."""
    connection: dict[str, Any] = {"address": address, "insecure": insecure}
    if root_certificates:
        connection["root-certificates"] = str(Path(root_certificates).expanduser().resolve())
    flwr_home.mkdir(parents=True, exist_ok=True)
    config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config))


@dataclass
class RunStatus:
    """A run's state as the SuperLink reports it."""

    run_id: int
    status: str
    details: str

    @property
    def finished(self) -> bool:
        """Whether the run has ended, successfully or not."""
        return self.status.startswith("finished")

    @property
    def completed(self) -> bool:
        """Whether the run ended successfully."""
        return self.status == "finished:completed"


class FlowerCLI:
    """The `flwr` CLI against the ``fl-app`` connection of one FLWR_HOME."""

    def __init__(self, flwr_home: Path, env: Mapping[str, str] | None = None) -> None:
        self.flwr_home = Path(flwr_home)
        self.env = {**(env or os.environ), "FLWR_HOME": str(self.flwr_home)}

    def _flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [FLWR, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def submit(
        self,
        app_dir: Path,
        run_config: Mapping[str, Any],
        federation_config: Mapping[str, Any] | None = None,
        config_file: Path | None = None,
    ) -> int:
        """Start a run of the app in ``app_dir``; return its run id.

        The run config goes through a TOML file (``config_file``, default: in
        FLWR_HOME), which keeps every value's type and needs no shell quoting.
        """
        config_file = config_file or self.flwr_home / "run_config.toml"
        config_file.write_text(tomli_w.dumps(dict(run_config)))
        args = ["run", str(app_dir), CONNECTION, "--format", "json"]
        args += ["--run-config", str(config_file)]
        if federation_config:
            args += [
                "--federation-config",
                " ".join(f"{k}={json.dumps(v)}" for k, v in federation_config.items()),
            ]
        done = self._flwr(*args)
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            reply = {}
        if done.returncode != 0 or not reply.get("success"):
            message = reply.get("error-message") or (done.stdout + done.stderr).strip()
            raise RuntimeError(f"flwr run failed: {' '.join(message.split())}")
        return int(reply["run-id"])

    def follow(self, run_id: int, *outs: TextIO) -> None:
        """Copy the run's log to every stream in ``outs``, line by line, until it ends."""
        with subprocess.Popen(
            [FLWR, "log", str(run_id), CONNECTION],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as proc:
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    for out in outs:
                        out.write(line)
                        out.flush()
            finally:
                stop_process(proc)

    def status(self, run_id: int) -> RunStatus:
        """Ask the SuperLink for the run's status."""
        done = self._flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        run = (json.loads(done.stdout or "{}").get("runs") or [{}])[0]
        return RunStatus(run_id, run.get("status", "unknown"), run.get("status-details", ""))

    def wait(self, run_id: int, timeout: float = 60) -> RunStatus:
        """Poll until the run has finished (its log ends slightly before)."""
        deadline = time.monotonic() + timeout
        status = self.status(run_id)
        while not status.finished and time.monotonic() < deadline:
            time.sleep(1)
            status = self.status(run_id)
        return status

    def stop(self, run_id: int) -> None:
        """Ask the SuperLink to stop a run (its ServerApp and ClientApps)."""
        self._flwr("stop", str(run_id), CONNECTION)

    def unfinished_runs(self) -> list[int]:
        """Ids of the runs on this SuperLink that have not finished."""
        done = self._flwr("ls", CONNECTION, "--format", "json")
        runs = json.loads(done.stdout or "{}").get("runs", [])
        return [int(r["run-id"]) for r in runs if not r["status"].startswith("finished")]


class LocalSuperLink:
    """A ``flower-superlink --simulation`` on a free loopback port, as a context manager.

    It runs ClientApps in this interpreter's environment (no per-run dependency
    install). On exit it stops unfinished runs, then the SuperLink by its PID,
    then whatever the SuperLink started that is still there (a stopped run's
    simulation and Ray processes outlive it otherwise), by their PIDs.
    """

    def __init__(self, flwr_home: Path, env: Mapping[str, str] | None = None) -> None:
        self.flwr_home = Path(flwr_home)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.cli = FlowerCLI(self.flwr_home, env)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LocalSuperLink:
        write_connection(self.flwr_home, self.address, insecure=True)
        log = (self.flwr_home / "superlink.log").open("w")
        self.proc = subprocess.Popen(
            [
                FLOWER_SUPERLINK,
                "--insecure",
                "--simulation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
            ],
            cwd=self.flwr_home,
            env=self.cli.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        try:
            self._wait_healthy()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://{self.address}/health", timeout=1):
                    return
            except OSError:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    log = (self.flwr_home / "superlink.log").read_text()[-2000:]
                    raise RuntimeError(f"flower-superlink exited early:\n{log}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"flower-superlink not healthy after {timeout} s") from None
                time.sleep(0.3)

    def __exit__(self, *exc_info: object) -> None:
        if self.proc is None:
            return
        started: list[int] = []
        try:
            if self.proc.poll() is None:
                for run_id in self.cli.unfinished_runs():
                    self.cli.stop(run_id)
                    self.cli.wait(run_id, timeout=30)
                started = descendants(self.proc.pid)
        finally:
            stop_process(self.proc)
            self.proc = None
            stop_pids(started)
