"""A whole TLS + authenticated federation on loopback, for demos, tests and benches."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from fl_app.deploy import DeploymentError
from fl_app.deploy.commands import (
    check_supernode_inputs,
    connect,
    require_dir,
    start_superlink,
    start_supernode,
)
from fl_app.deploy.pki import (
    Certificates,
    NodeKey,
    reuse_or_make_certificates,
    reuse_or_make_node_key,
)
from fl_app.launch import processes
from fl_app.launch.flower_cli import CONNECTION, FlowerCLI, FlowerCLIError, superlink_healthy
from fl_app.launch.processes import ProcessRecord

STATE_FILE = "federation.json"
# Seconds between looks for processes started below ours (ServerApps, ClientApps).
WATCH_INTERVAL = 2


@dataclass
class NodeProcess:
    """A SuperNode started by a `LocalFederation`."""

    name: str
    key: NodeKey
    data_dir: Path
    port: int
    log: Path
    proc: psutil.Popen | None = None
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
            "log": str(self.log),
        }


@dataclass
class LocalFederation:
    """A TLS + authenticated federation on loopback: one SuperLink, N SuperNodes.

    Use it as a context manager (`up` on entry, `down` on exit), or call `up`
    and later `down` (also from another process: ``LocalFederation(dir).down()``
    reads the state file). Everything lives in ``directory``: ``certs/``,
    ``keys/``, ``data/node-<i>/`` (unless ``data_dirs``/``data_root`` are
    given), ``flwr_home/`` (the ``fl-app`` connection), ``logs/``, ``cache/``
    (each node's feature cache), the state file ``federation.json`` (every
    process as PID and start time, so a later `down` never signals a reused
    PID), and the SuperLink's working directory (relative ``results-dir``
    values land here). Certificates, keys and data already there are reused.
    Ports are free loopback ports picked at `up`.

    Parameters
    ----------
    directory : str or os.PathLike
        The federation's folder.
    num_nodes : int
        SuperNodes to start (keys ``node-0`` ... ``node-<N-1>``).
    data_dirs : sequence of path, optional
        One data folder per node; default: prepared with
        `fl_app.data.prepare_node_dirs` into ``data_root``.
    data_root : str or os.PathLike, optional
        Where prepared data folders go (default ``directory/data``); folders
        already holding ``partition.npz`` are reused.
    dataset, partitioner, seed, max_examples
        Passed to `fl_app.data.prepare_node_dirs`.
    env : Mapping, optional
        Base environment of every process.
    timeout : float
        Seconds to wait for the SuperLink, and for the nodes, to come up.

    Attributes
    ----------
    cli : FlowerCLI
        The ``fl-app`` connection, for ``submit``, ``follow``, ``wait``.
    address : str
        The SuperLink's ``127.0.0.1:PORT`` (Fleet, Control and Runtime APIs).
    superlink : psutil.Popen or None
        The SuperLink's process while it is up.
    nodes : list of NodeProcess
        The SuperNodes started, in order.
    """

    directory: Path | str
    num_nodes: int = 2
    data_dirs: Sequence[str | os.PathLike] | None = None
    data_root: str | os.PathLike | None = None
    dataset: str = "fashion_mnist"
    partitioner: str = "iid"
    seed: int = 0
    max_examples: int = 0
    env: Mapping[str, str] | None = None
    timeout: float = 120
    nodes: list[NodeProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).expanduser().resolve()
        self.certs = Certificates.in_dir(self.directory / "certs")
        self.keys_dir = self.directory / "keys"
        self.flwr_home = self.directory / "flwr_home"
        self.logs = self.directory / "logs"
        self.state_file = self.directory / STATE_FILE
        self.port = 0
        self.address = ""
        self.superlink: psutil.Popen | None = None
        self._superlink_record: ProcessRecord | None = None
        self.cli = FlowerCLI(self.flwr_home, self.env)
        # SuperExecs, ServerApps and ClientApps, also once their parent has gone.
        self.below = processes.Descendants(self._tops, WATCH_INTERVAL)

    def __enter__(self) -> LocalFederation:
        return self.up()

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    # -- inputs

    def _data_dirs(self) -> list[Path]:
        if self.data_dirs is not None:
            if len(self.data_dirs) != self.num_nodes:
                raise DeploymentError(
                    f"{len(self.data_dirs)} data folders given for {self.num_nodes} nodes"
                )
            return [Path(d).expanduser().resolve() for d in self.data_dirs]
        root = Path(self.data_root or self.directory / "data").expanduser().resolve()
        dirs = [root / f"node-{i}" for i in range(self.num_nodes)]
        if all((d / "partition.npz").is_file() for d in dirs):
            return dirs
        from fl_app.data import prepare_node_dirs  # deferred: loads the dataset

        prepared = prepare_node_dirs(
            root,
            self.num_nodes,
            dataset=self.dataset,
            partitioner=self.partitioner,
            seed=self.seed,
            max_examples=self.max_examples,
        )
        return [Path(d).resolve() for d in prepared]

    def _env(self) -> dict[str, str]:
        return {**processes.process_env(self.env), "FLWR_HOME": str(self.flwr_home)}

    # -- state

    def _read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def _recorded(self) -> tuple[dict[str, Any], psutil.Process | None, list[psutil.Process]]:
        """The state file, and those of its SuperLink and SuperNodes that still run."""
        state = self._read_state() or {}
        superlink = _live(ProcessRecord.from_json(state.get("superlink")))
        nodes = [_live(ProcessRecord.from_json(r)) for r in state.get("supernodes", [])]
        return state, superlink, [p for p in nodes if p is not None]

    def write_state(self) -> None:
        """Write the state file: processes, ports, FLWR_HOME, connection, logs."""
        self.below.look()
        superlink = None
        if self._superlink_record is not None:
            superlink = {
                **self._superlink_record.to_json(),
                "port": self.port,
                "log": str(self.logs / "superlink.log"),
            }
        self._write(
            {
                "directory": str(self.directory),
                "address": self.address,
                "connection": CONNECTION,
                "flwr_home": str(self.flwr_home),
                "ca_cert": str(self.certs.ca_cert),
                "superlink": superlink,
                "supernodes": [n.state() for n in self.nodes],
                "descendants": [r.to_json() for r in self.below.records()],
            }
        )

    def _write(self, state: Mapping[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_file)

    def _tops(self) -> list[psutil.Process]:
        procs = [n.proc for n in self.nodes if n.proc is not None]
        return procs + ([self.superlink] if self.superlink is not None else [])

    # -- up

    def up(self) -> LocalFederation:
        """Start the SuperLink, register the keys, start the SuperNodes, wait until online.

        Returns
        -------
        LocalFederation
            Itself.

        Raises
        ------
        DeploymentError
            On a bad input or when a step fails; everything started is stopped
            (also on Ctrl-C).
        """
        if self.num_nodes < 0:
            raise DeploymentError(f"--nodes {self.num_nodes} is not allowed: expected >= 0")
        _, superlink, nodes = self._recorded()
        if superlink is not None or nodes:
            raise DeploymentError(
                f"a federation is already up in {self.directory} (see {self.state_file});"
                " take it down first"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        certs = reuse_or_make_certificates(self.certs.ca_cert.parent)
        keys = [reuse_or_make_node_key(self.keys_dir, f"node-{i}") for i in range(self.num_nodes)]
        data_dirs = self._data_dirs()
        for d in data_dirs:
            require_dir(d, "a node's data folder")
        try:
            self.port = processes.free_port()
            self.address = f"127.0.0.1:{self.port}"
            self.cli = connect(self.flwr_home, self.address, certs.ca_cert, self.env)
            with processes.interrupts_deferred():  # started is recorded
                self.superlink = start_superlink(
                    certs,
                    self.port,
                    "127.0.0.1",
                    log=self.logs / "superlink.log",
                    cwd=self.directory,
                    env=self._env(),
                )
                self._superlink_record = ProcessRecord.of(self.superlink)
                self.write_state()
            self.below.watch()
            self._wait(
                lambda: superlink_healthy(self.address, certs.ca_cert),
                [self.superlink],
                f"the SuperLink at {self.address} to answer",
            )
            for key, data_dir in zip(keys, data_dirs, strict=True):
                self.add_node(key, data_dir, wait=False)
            self.wait_online()
            self.write_state()
        except BaseException:
            self.down()
            raise
        return self

    def add_node(
        self,
        key: NodeKey | str,
        data_dir: str | os.PathLike,
        register: bool = True,
        wait: bool = True,
    ) -> NodeProcess:
        """Start one more SuperNode (registering its key first unless ``register=False``).

        Parameters
        ----------
        key : NodeKey or str
            Its key pair, or a name for one in ``keys/`` (made if missing).
        data_dir : str or os.PathLike
            Its data folder (must exist; may be empty).
        register : bool
            Register its public key; ``False`` starts a node the SuperLink refuses.
        wait : bool
            Wait until it is online (only for registered nodes).

        Returns
        -------
        NodeProcess
            The node, also appended to `nodes` and the state file.
        """
        if isinstance(key, str):
            key = reuse_or_make_node_key(self.keys_dir, key)
        node = NodeProcess(
            name=key.name,
            key=key,
            data_dir=Path(data_dir).expanduser().resolve(),
            port=processes.free_port(),
            log=self.logs / f"supernode-{key.name}.log",
            registered=register,
        )
        check_supernode_inputs(self.certs.ca_cert, key.private, node.data_dir)
        if register:
            node.node_id = self.cli.register_supernode(key.public)
        with processes.interrupts_deferred():  # started is recorded
            node.proc = start_supernode(
                self.address,
                self.certs.ca_cert,
                key.private,
                node.data_dir,
                node.port,
                log=node.log,
                env=self._env(),
                # Each node's feature cache stays in the federation's folder.
                cache_dir=self.directory / "cache" / key.name,
            )
            node.record = ProcessRecord.of(node.proc)
            self.nodes.append(node)
            self.write_state()
        if wait and register:
            self.wait_online([node])
        return node

    def wait_online(self, nodes: Sequence[NodeProcess] | None = None) -> None:
        """Wait until the given registered nodes (default: all) are online.

        Raises
        ------
        DeploymentError
            If one of their processes exits first, or the time runs out.
        """
        nodes = [n for n in (self.nodes if nodes is None else nodes) if n.registered]
        wanted = {n.node_id for n in nodes if n.node_id is not None}
        status: dict[int, str] = {}

        def online() -> bool:
            status.update(self.cli.supernodes())
            return all(status.get(n) == "online" for n in wanted)

        procs = [n.proc for n in nodes if n.proc is not None]
        try:
            self._wait(online, procs, f"nodes {sorted(wanted)} to come online")
        except DeploymentError as err:
            missing = sorted(n for n in wanted if status.get(n) != "online")
            states = ", ".join(f"{n} {status.get(n, 'unknown')}" for n in missing)
            raise DeploymentError(f"{err} ({states})") from None

    def _wait(self, predicate: Any, procs: Sequence[psutil.Process], what: str) -> None:
        try:
            processes.wait_until(predicate, self.timeout, procs, what, interval=0.5)
        except (processes.ProcessExitedError, processes.WaitTimeoutError) as err:
            raise DeploymentError(f"{err} (logs in {self.logs})") from None

    def stop_node(self, node: NodeProcess) -> None:
        """Stop one SuperNode and what it started."""
        if node.proc is not None:
            with processes.interrupts_deferred():
                processes.stop_tree(node.proc)

    # -- down

    def down(self) -> None:
        """Stop every process this federation started; also after a failed `up`.

        In the process that ran `up` it uses its own process handles; elsewhere
        the state file (a PID whose process started at another time than
        recorded is left alone). Unfinished runs are stopped through the
        SuperLink first. Ctrl-C waits until everything is stopped.
        """
        self.below.close()
        with processes.interrupts_deferred():
            superlink, nodes = self._running()
            try:
                if superlink is not None and processes.alive(superlink):
                    with contextlib.suppress(FlowerCLIError):  # the processes matter more
                        self.cli.stop_unfinished_runs(timeout=20)
                self.below.look()
            finally:
                processes.stop(nodes)  # SuperNodes first: they leave the SuperLink
                processes.stop([superlink] if superlink is not None else [])
                processes.stop(p for p in map(_live, self.below.records()) if p is not None)
                self._mark_down()

    def _running(self) -> tuple[psutil.Process | None, list[psutil.Process]]:
        """The SuperLink and SuperNodes to stop: ours, else the state file's still running."""
        if self.superlink is not None or self.nodes:
            return self.superlink, [n.proc for n in self.nodes if n.proc is not None]
        state, superlink, nodes = self._recorded()
        self.cli = FlowerCLI(state.get("flwr_home", self.flwr_home), self.env)
        tops = [*nodes, *([superlink] if superlink is not None else [])]
        self.below.add(ProcessRecord.from_json(r) for r in state.get("descendants", []))
        self.below.add(ProcessRecord.of(p) for top in tops for p in processes.descendants(top))
        return superlink, nodes

    def _mark_down(self) -> None:
        state = self._read_state()
        if state is not None:
            with contextlib.suppress(OSError):
                self._write({**state, "stopped": True})
        self.superlink = None
        for node in self.nodes:
            node.proc = None


def _live(record: ProcessRecord | None) -> psutil.Process | None:
    return record.process() if record is not None else None
