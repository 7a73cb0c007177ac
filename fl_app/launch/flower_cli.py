"""Flower's `flwr` CLI from Python: runs, their logs, SuperNode keys, and the connection.

Every `flwr` call of fl_app goes through `FlowerCLI`, against the ``fl-app``
connection of one FLWR_HOME (`write_connection` writes it). Replies are read as
``--format json``; a failure is one `FlowerCLIError` line.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import subprocess
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import tomli_w

from fl_app.launch import processes

FLWR = str(processes.BIN / "flwr")
CONNECTION = "fl-app"


class FlowerCLIError(RuntimeError):
    """A `flwr` command failed; the message is one line."""


def split_host_port(address: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as host and port; ``None`` if it is not that."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in address:
        return None
    return host.strip("[]"), int(port)


def write_connection(
    flwr_home: str | os.PathLike,
    address: str,
    insecure: bool = True,
    root_certificates: str | os.PathLike | None = None,
) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one default connection named ``fl-app``.

    Parameters
    ----------
    flwr_home : str or os.PathLike
        The FLWR_HOME folder (created if needed).
    address : str
        The SuperLink's ``HOST:PORT`` (its Control API).
    insecure : bool
        Plain text instead of TLS.
    root_certificates : str or os.PathLike, optional
        The CA certificate that signed the SuperLink's certificate (TLS).
    """
    connection: dict[str, Any] = {"address": address, "insecure": insecure}
    if root_certificates:
        connection["root-certificates"] = str(Path(root_certificates).expanduser().resolve())
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
    (home / "config.toml").write_text(tomli_w.dumps(config))


def superlink_healthy(address: str, ca_cert: str | os.PathLike | None = None) -> bool:
    """Whether the SuperLink at ``address`` answers ``GET /health`` (over TLS if ``ca_cert``)."""
    if ca_cert is None:
        url, context = f"http://{address}/health", None
    else:
        url, context = f"https://{address}/health", ssl.create_default_context(cafile=str(ca_cert))
    try:
        with urllib.request.urlopen(url, timeout=2, context=context):
            return True
    except OSError:
        return False


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
    """The `flwr` CLI against the ``fl-app`` connection of one FLWR_HOME.

    Parameters
    ----------
    flwr_home : str or os.PathLike
        The FLWR_HOME whose ``config.toml`` holds the connection.
    env : Mapping, optional
        Base environment of the `flwr` commands (default: this process's).
    """

    def __init__(self, flwr_home: str | os.PathLike, env: Mapping[str, str] | None = None) -> None:
        self.flwr_home = Path(flwr_home)
        self.env = {**processes.process_env(env), "FLWR_HOME": str(self.flwr_home)}

    def call(
        self, command: str, *args: str, options: Sequence[str] = (), timeout: float = 120
    ) -> dict[str, Any]:
        """Run ``flwr <command> <args> fl-app <options> --format json``; return its reply.

        Parameters
        ----------
        command : str
            The subcommand, e.g. ``"ls"`` or ``"supernode register"``.
        args : str
            Its arguments before the connection name.
        options : sequence of str
            Its options.
        timeout : float
            Seconds before it is killed.

        Raises
        ------
        FlowerCLIError
            If it fails, says so, or answers no JSON (one line, with Flower's message).
        """
        cmd = [FLWR, *command.split(), *args, CONNECTION, *options, "--format", "json"]
        try:
            done = processes.run(cmd, self.env, timeout)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise FlowerCLIError(f"flwr {command} failed: {' '.join(str(err).split())}") from None
        # Flower prints its JSON with rich: it may follow a line of other output.
        try:
            reply = json.loads(done.stdout[done.stdout.find("{") :])
        except json.JSONDecodeError:
            reply = {}
        if done.returncode != 0 or not reply.get("success"):
            message = reply.get("error-message") or (done.stdout + done.stderr).strip()
            raise FlowerCLIError(f"flwr {command} failed: {' '.join(str(message).split())}")
        return reply

    # -- runs

    def submit(
        self,
        app_dir: str | os.PathLike,
        run_config: Mapping[str, Any],
        federation_config: Mapping[str, Any] | None = None,
        config_file: str | os.PathLike | None = None,
    ) -> int:
        """Start a run of the app in ``app_dir``; return its run id.

        The run config goes through a TOML file (``config_file``, default: in
        FLWR_HOME), which keeps every value's type and needs no shell quoting.
        """
        path = Path(config_file or self.flwr_home / "run_config.toml")
        path.write_text(tomli_w.dumps(dict(run_config)))
        options = ["--run-config", str(path)]
        if federation_config:
            pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in federation_config.items())
            options += ["--federation-config", pairs]
        return int(self.call("run", str(app_dir), options=options)["run-id"])

    def follow(self, run_id: int, *outs: TextIO) -> None:
        """Copy the run's log to every stream in ``outs``, line by line, until it ends."""
        cmd = [FLWR, "log", str(run_id), CONNECTION]
        with processes.interrupts_deferred():
            proc = processes.start(cmd, env=self.env, own_session=False, capture=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                for out in outs:
                    out.write(line)
                    out.flush()
        finally:
            processes.stop([proc])
            proc.stdout.close()

    def status(self, run_id: int) -> RunStatus:
        """Ask the SuperLink for the run's status."""
        reply = self.call("ls", options=["--run-id", str(run_id)])
        run = (reply.get("runs") or [{}])[0]
        return RunStatus(run_id, run.get("status", "unknown"), run.get("status-details", ""))

    def wait(self, run_id: int, timeout: float = 60) -> RunStatus:
        """Poll until the run has finished (its log ends slightly before); its last status."""
        statuses: list[RunStatus] = []

        def finished() -> bool:
            statuses.append(self.status(run_id))
            return statuses[-1].finished

        with contextlib.suppress(processes.WaitTimeoutError):
            processes.wait_until(finished, timeout, what=f"run {run_id} to finish", interval=1)
        return statuses[-1]

    def stop(self, run_id: int) -> None:
        """Ask the SuperLink to stop a run (its ServerApp and ClientApps)."""
        self.call("stop", str(run_id))

    def unfinished_runs(self) -> list[int]:
        """Ids of the runs on this SuperLink that have not finished."""
        runs = self.call("ls").get("runs", [])
        return [int(r["run-id"]) for r in runs if not r["status"].startswith("finished")]

    def stop_unfinished_runs(self, timeout: float = 30) -> list[int]:
        """Stop every unfinished run and wait (up to ``timeout`` each) until it has ended."""
        run_ids = self.unfinished_runs()
        for run_id in run_ids:
            self.stop(run_id)
            self.wait(run_id, timeout)
        return run_ids

    # -- SuperNodes (node authentication)

    def register_supernode(self, public_key: str | os.PathLike) -> int:
        """Register a SuperNode's OpenSSH public key; return the node id it got."""
        reply = self.call("supernode register", str(public_key))
        return int(reply["node-id"])

    def supernodes(self) -> dict[int, str]:
        """The SuperLink's nodes: node id to status (``registered``, ``online``, ...)."""
        reply = self.call("supernode list")
        return {int(node["node-id"]): node["status"] for node in reply.get("nodes", [])}
