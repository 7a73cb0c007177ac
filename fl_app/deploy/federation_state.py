"""The saved state of a `LocalFederation`: its processes, ports and nodes, in ``federation.json``.

The state file records every SuperLink, Fleet gateway and SuperNode ever started
(the leaders of process groups, also those another process started) and what was
seen below them, each as PID and start time, so that another process (``fl-app
local down``, ``restart``) finds exactly them and never signals a reused PID.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from fl_app.deploy.pki import NodeKey
from fl_app.launch import processes
from fl_app.launch.flower_cli import CONNECTION
from fl_app.launch.processes import ProcessRecord

STATE_FILE = "federation.json"
SUPERLINK = "superlink"
FLEET_GATEWAY = "fleet-gateway"
# The SuperLink's SQLite file: registered keys and runs outlive a restart of the SuperLink.
DATABASE = "superlink.db"
# Seconds between looks for processes started below ours (ServerApps, ClientApps).
WATCH_INTERVAL = 2


@dataclass
class NodeProcess:
    """A SuperNode of a `LocalFederation`: what it needs to start, and its process."""

    name: str
    key: NodeKey
    data_dir: Path
    port: int
    log: Path
    cache_dir: Path | None = None
    warm_worker: bool = True
    proc: psutil.Process | None = None
    record: ProcessRecord | None = None
    node_id: int | None = None
    registered: bool = True

    def state(self) -> dict[str, Any]:
        """What the state file records about it."""
        return {
            "name": self.name,
            **(self.record.to_json() if self.record else {"pid": None, "create_time": None}),
            "node_id": self.node_id,
            "registered": self.registered,
            "port": self.port,
            "key": str(self.key.private),
            "data_dir": str(self.data_dir),
            "cache_dir": str(self.cache_dir) if self.cache_dir else None,
            "warm_worker": self.warm_worker,
            "log": str(self.log),
        }

    @classmethod
    def from_state(cls, data: Mapping[str, Any]) -> NodeProcess:
        """The node a state file records, with its process if that still runs."""
        private = Path(data["key"])
        record = ProcessRecord.from_json(data)
        return cls(
            name=data["name"],
            key=NodeKey(private, private.with_name(f"{private.name}.pub")),
            data_dir=Path(data["data_dir"]),
            port=int(data["port"]),
            log=Path(data["log"]),
            cache_dir=Path(data["cache_dir"]) if data.get("cache_dir") else None,
            warm_worker=bool(data.get("warm_worker", True)),
            proc=record.process() if record else None,
            record=record,
            node_id=data.get("node_id"),
            registered=bool(data.get("registered", True)),
        )

    def running(self) -> bool:
        """Whether its SuperNode process runs."""
        return self.proc is not None and processes.alive(self.proc)


class FederationState:
    """What a `LocalFederation` started, and the state file of its folder that keeps it.

    Parameters
    ----------
    directory : Path
        The federation's folder (absolute): the state file ``federation.json``,
        ``flwr_home/`` and the database ``superlink.db`` are there.
    ca_cert : Path
        The CA certificate, named in the state file.
    logs : Path
        The folder of the SuperLink's and the gateway's logs, named in the state file.

    Attributes
    ----------
    file : Path
        The state file.
    flwr_home, database : Path
        The ``FLWR_HOME`` of the ``fl-app`` connection, and the SuperLink's database.
    port, fleet_port : int
        The SuperLink's and the Fleet gateway's ports (0 until `LocalFederation.up`).
    address, fleet_address : str
        Their ``127.0.0.1:PORT``.
    superlink, gateway : psutil.Process or None
        Their processes while they are up; ``superlink_record`` and
        ``gateway_record`` are the same as records.
    nodes : list of NodeProcess
        The SuperNodes started, in order.
    leaders : dict of ProcessRecord to str
        Every SuperLink, gateway and SuperNode ever started (the leaders of
        process groups), by name.
    below : processes.Descendants
        SuperExecs, ServerApps and ClientApps, also once their parent has gone.
    """

    def __init__(self, directory: Path, ca_cert: Path, logs: Path) -> None:
        self.directory = directory
        self.ca_cert = ca_cert
        self.logs = logs
        self.file = directory / STATE_FILE
        self.flwr_home = directory / "flwr_home"
        self.database = directory / DATABASE
        self.port = 0
        self.address = ""
        self.fleet_port = 0
        self.fleet_address = ""
        self.superlink: psutil.Process | None = None
        self.superlink_record: ProcessRecord | None = None
        self.gateway: psutil.Process | None = None
        self.gateway_record: ProcessRecord | None = None
        self.nodes: list[NodeProcess] = []
        self.leaders: dict[ProcessRecord, str] = {}
        self.below = processes.Descendants(self._tops, WATCH_INTERVAL)

    def read(self) -> dict[str, Any] | None:
        """The state file's content; ``None`` if it is missing or not JSON."""
        try:
            return json.loads(self.file.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def reload(self) -> None:
        """Take the processes, ports and nodes from the state file (another process's changes)."""
        saved = self.read() or {}
        self.flwr_home = Path(saved.get("flwr_home", self.flwr_home))
        self.address = saved.get("address", self.address)
        self.database = Path(saved.get("database", self.database))
        superlink = saved.get("superlink") or {}
        self.port = int(superlink.get("port", self.port))
        self.superlink_record = ProcessRecord.from_json(superlink)
        self.superlink = self.superlink_record.process() if self.superlink_record else None
        gateway = saved.get("fleet_gateway") or {}
        self.fleet_port = int(gateway.get("port", self.fleet_port))
        self.fleet_address = saved.get("fleet_address", self.fleet_address)
        self.gateway_record = ProcessRecord.from_json(gateway)
        self.gateway = self.gateway_record.process() if self.gateway_record else None
        self.nodes = [NodeProcess.from_state(n) for n in saved.get("supernodes", [])]
        self.remember(saved)

    def remember(self, saved: Mapping[str, Any]) -> None:
        """Add the process records of a state file's content to ours (none is ever dropped)."""
        for record, name in _leaders(saved):
            self.leaders.setdefault(record, name)
        self.below.add(ProcessRecord.from_json(r) for r in saved.get("descendants", []))

    def any_up(self) -> bool:
        """Whether a process group the state file records still runs."""
        return any(processes.group(r) for r, _ in _leaders(self.read() or {}))

    def started(self, record: ProcessRecord | None, name: str) -> None:
        """Record a SuperLink, gateway or SuperNode just started, and write the state file."""
        if record is not None:
            self.leaders[record] = name
        self.write()

    def write(self) -> None:
        """Write the state file: processes, ports, FLWR_HOME, connection, database, logs.

        Process records another process wrote meanwhile (a `restart` from the
        command line) are kept, so that `LocalFederation.down` still finds them.
        """
        self.below.look()
        self.remember(self.read() or {})
        superlink = None
        if self.superlink_record is not None:
            superlink = {
                **self.superlink_record.to_json(),
                "port": self.port,
                "log": str(self.logs / "superlink.log"),
            }
        gateway = None
        if self.gateway_record is not None:
            gateway = {
                **self.gateway_record.to_json(),
                "port": self.fleet_port,
                "log": str(self.logs / "fleet-gateway.log"),
            }
        self._write(
            {
                "directory": str(self.directory),
                "address": self.address,
                "fleet_address": self.fleet_address,
                "connection": CONNECTION,
                "flwr_home": str(self.flwr_home),
                "ca_cert": str(self.ca_cert),
                "database": str(self.database),
                "superlink": superlink,
                "fleet_gateway": gateway,
                "supernodes": [n.state() for n in self.nodes],
                "groups": [{"name": n, **r.to_json()} for r, n in self.leaders.items()],
                "descendants": [r.to_json() for r in self.below.records()],
            }
        )

    def mark_down(self) -> None:
        """Mark the state file ``"stopped"``, and forget the processes."""
        saved = self.read()
        if saved is not None:
            with contextlib.suppress(OSError):
                self._write({**saved, "stopped": True})
        self.superlink = None
        self.gateway = None
        for node in self.nodes:
            node.proc = None

    def _write(self, saved: Mapping[str, Any]) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(saved, indent=2) + "\n")
        tmp.replace(self.file)

    def left_running(self) -> list[psutil.Process]:
        """Every process this federation started that still runs, by its records.

        That is every recorded process, and the rest of the process group of
        each: Flower's SuperLink starts its SuperExec in a session of its own,
        whose ServerApps join that SuperExec's group.
        """
        return processes.in_groups([*self.leaders, *self.below.records()])

    def superlink_leftovers(self) -> list[psutil.Process]:
        """What earlier SuperLinks started that still runs: all that is no SuperNode's or gateway's.

        A SuperNode's SuperExec and ClientApps stay in its process group; the
        SuperLink's SuperExec leads a group of its own, and its ServerApps, also
        orphaned ones (a ServerApp whose SuperLink was killed may hang on its way
        out), are in that group.
        """
        nodes = [r for r, name in self.leaders.items() if name != SUPERLINK]
        theirs = {p.pid for p in processes.in_groups(nodes)}
        return [p for p in self.left_running() if p.pid not in theirs]

    def _tops(self) -> list[psutil.Process]:
        procs = [n.proc for n in self.nodes if n.proc is not None]
        return procs + ([self.superlink] if self.superlink is not None else [])


def _leaders(saved: Mapping[str, Any]) -> list[tuple[ProcessRecord, str]]:
    """The SuperLinks and SuperNodes a state file records (leaders of process groups), named."""
    named = [
        ({**(saved.get("superlink") or {}), "name": SUPERLINK}),
        *saved.get("supernodes", []),
        *saved.get("groups", []),
    ]
    leaders = [(ProcessRecord.from_json(entry), entry.get("name", "")) for entry in named]
    return [(record, name) for record, name in leaders if record is not None]
