"""Start, wait for and stop the processes of a local federation, each recorded in its state.

`FederationProcesses` knows how the SuperLink, the Fleet gateway and the
SuperNodes of a `LocalFederation` start (their ports, logs, database and
environment) and in which order they stop; the federation's lifecycle decides when.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from fl_app.deploy import DeploymentError
from fl_app.deploy.federation_state import FLEET_GATEWAY, SUPERLINK, FederationState, NodeProcess
from fl_app.deploy.pki import Certificates
from fl_app.deploy.start import start_fleet_gateway, start_superlink, start_supernode
from fl_app.launch import processes
from fl_app.launch.flower_cli import superlink_healthy
from fl_app.launch.processes import ProcessRecord, describe


@dataclass
class FederationProcesses:
    """The processes of a local federation: each recorded in its state as it starts.

    A start and its record, and every stop, happen with Ctrl-C held back, so
    that no process runs that the state file does not name.

    Parameters
    ----------
    certs : Certificates
        The federation's CA and SuperLink certificates.
    directory : Path
        The federation's folder: the SuperLink's working directory.
    logs : Path
        Where each process's log goes.
    state : FederationState
        Where each process is recorded (and its ports and database are read).
    env : Mapping, optional
        Base environment of every process.
    timeout : float
        Seconds to wait for a process to answer.
    """

    certs: Certificates
    directory: Path
    logs: Path
    state: FederationState
    env: Mapping[str, str] | None = None
    timeout: float = 120

    def process_env(self) -> dict[str, str]:
        """The environment of every process: ``env`` with our ``FLWR_HOME``."""
        return {**processes.process_env(self.env), "FLWR_HOME": str(self.state.flwr_home)}

    def start_superlink(self) -> None:
        """Start the SuperLink on our port and database; wait until it answers."""
        state = self.state
        with processes.interrupts_deferred():  # started is recorded
            proc = start_superlink(
                self.certs,
                state.port,
                "127.0.0.1",
                log=self.logs / "superlink.log",
                cwd=self.directory,
                env=self.process_env(),
                database=state.database,
            )
            state.superlink, state.superlink_record = proc, ProcessRecord.of(proc)
            state.started(state.superlink_record, SUPERLINK)
        self.wait(
            lambda: superlink_healthy(state.address, self.certs.ca_cert),
            [proc],
            f"the SuperLink at {state.address} to answer",
        )

    def start_gateway(self) -> None:
        """Start the Fleet gateway in front of our SuperLink; wait until it answers.

        It stays up while the SuperLink restarts: a SuperNode's call in between
        gets a 502, which Flower's SuperNode retries like a refused connection.
        """
        state = self.state
        with processes.interrupts_deferred():  # started is recorded
            proc = start_fleet_gateway(
                self.certs,
                state.address,
                state.fleet_port,
                log=self.logs / "fleet-gateway.log",
                env=self.process_env(),
            )
            state.gateway, state.gateway_record = proc, ProcessRecord.of(proc)
            state.started(state.gateway_record, FLEET_GATEWAY)
        self.wait(
            lambda: superlink_healthy(state.fleet_address, self.certs.ca_cert),
            [proc],
            f"the Fleet gateway at {state.fleet_address} to answer",
        )

    def start_node(self, node: NodeProcess) -> None:
        """Start a SuperNode on the Fleet gateway, with its key, data, cache and port."""
        with processes.interrupts_deferred():  # started is recorded
            node.proc = start_supernode(
                self.state.fleet_address,
                self.certs.ca_cert,
                node.key.private,
                node.data_dir,
                node.port,
                log=node.log,
                env=self.process_env(),
                cache_dir=node.cache_dir,
                warm_worker=node.warm_worker,
            )
            node.record = ProcessRecord.of(node.proc)
            self.state.started(node.record, node.name)

    def wait(
        self,
        predicate: Callable[[], Any],
        procs: Sequence[psutil.Process],
        what: str,
        timeout: float | None = None,
        interval: float = 0.5,
    ) -> None:
        """Wait until ``predicate`` is true while ``procs`` run (see `processes.wait_until`).

        Raises
        ------
        DeploymentError
            If one of ``procs`` exits first, or the time (default ``timeout``)
            runs out: the line points to the logs.
        """
        try:
            processes.wait_until(predicate, timeout or self.timeout, procs, what, interval)
        except (processes.ProcessExitedError, processes.WaitTimeoutError) as err:
            raise DeploymentError(f"{err} (logs in {self.logs})") from None

    def stop_node(self, node: NodeProcess) -> list[psutil.Process]:
        """Stop one SuperNode and its process group (SIGTERM first: it leaves the SuperLink).

        Returns
        -------
        list of psutil.Process
            Those of its group still running (none, unless they are not ours to kill).
        """
        if node.record is None:
            return []
        with processes.interrupts_deferred():
            left = processes.stop_group(node.record)
        if node.proc is not None:
            processes.alive(node.proc)  # reaps our own child
        return left

    def stop_superlink(self) -> None:
        """Stop the SuperLink, its process group and all earlier SuperLinks started.

        Raises
        ------
        DeploymentError
            If any of them still runs after SIGKILL.
        """
        state = self.state
        state.below.look()  # its SuperExec and ServerApps, if it still runs
        with processes.interrupts_deferred():
            left = processes.stop_group(state.superlink_record) if state.superlink_record else []
            left += processes.stop(state.superlink_leftovers())
        if left:
            raise DeploymentError(f"the SuperLink's {describe(left)} still running after SIGKILL")

    def stop_all(self, superlink: ProcessRecord | None) -> list[psutil.Process]:
        """Stop every recorded process, SuperNodes first; return those still running.

        SuperNodes go all at once: they leave the SuperLink (through the gateway,
        so it stays until they are gone). Then ``superlink`` and the gateways,
        then what is left of their groups and below them.
        """
        state = self.state
        links = (SUPERLINK, FLEET_GATEWAY)
        nodes = [r for r, name in state.leaders.items() if name not in links]
        processes.stop(p for p in map(_live, nodes) if p is not None)
        gateways = [r for r, name in state.leaders.items() if name == FLEET_GATEWAY]
        processes.stop(p for p in map(_live, [superlink, *gateways]) if p is not None)
        processes.stop(state.left_running())
        return state.left_running()


def _live(record: ProcessRecord | None) -> psutil.Process | None:
    return record.process() if record is not None else None
