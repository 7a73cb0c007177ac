"""A whole TLS + authenticated federation on loopback, for demos, tests and benches."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

from fl_app.deploy import DeploymentError
from fl_app.deploy.commands import (
    check_supernode_inputs,
    connect,
    require_dir,
    start_fleet_gateway,
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
SUPERLINK = "superlink"
FLEET_GATEWAY = "fleet-gateway"
# The SuperLink's SQLite file: registered keys and runs outlive a restart of the SuperLink.
DATABASE = "superlink.db"
# Seconds between looks for processes started below ours (ServerApps, ClientApps).
WATCH_INTERVAL = 2
# A SuperNode that ended without deactivating (SIGKILL, power loss) stays "online" until
# it has missed HEARTBEAT_PATIENCE heartbeats (60 s in Flower 1.42), and the SuperLink
# refuses to activate its key again until then ("[code: 2004] Failed to activate SuperNode").
OFFLINE_AFTER = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL


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


@dataclass
class LocalFederation:
    """A TLS + authenticated federation on loopback: one SuperLink, N SuperNodes.

    Use it as a context manager (`up` on entry, `down` on exit), or call `up`
    and later `down`; another process takes it over with `attach` (the state
    file). Everything lives in ``directory``: ``certs/``, ``keys/``,
    ``data/node-<i>/`` (unless ``data_dirs``/``data_root`` are given),
    ``flwr_home/`` (the ``fl-app`` connection), ``logs/``, ``cache/`` (each
    node's feature cache), the SuperLink's database ``superlink.db`` (fresh at
    every `up`; kept by `restart_superlink`), the state file ``federation.json``
    and the SuperLink's working directory (relative ``results-dir`` values land
    here). Certificates, keys and data already there are reused. Ports are free
    loopback ports picked at `up`, kept across restarts.

    As with `fl-app deploy superlink`, the SuperNodes reach the SuperLink only
    through a Fleet gateway (`fl_app.deploy.gateway`) at `fleet_address`, which
    forwards the Fleet API and refuses the Control and Runtime APIs; `address`,
    the SuperLink's own port, is what the ``fl-app`` connection (`cli`) uses.
    All of it is on 127.0.0.1, so on this machine that separates what each side
    is configured to use, not what a local process could reach.

    Every SuperLink and SuperNode starts in its own session and leads a process
    group that whatever it starts (SuperExecs, ServerApps, ClientApps) joins;
    the state file records each as PID and start time, so no reused PID is ever
    signalled, and stopping one stops its whole group, orphans included.

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
    warm_worker : bool
        Whether the nodes hand their messages to a warm worker (`fl_app.node_worker`).
    timeout : float
        Seconds to wait for the SuperLink, and for the nodes, to come up.

    Attributes
    ----------
    cli : FlowerCLI
        The ``fl-app`` connection, for ``submit``, ``follow``, ``wait``.
    address : str
        The SuperLink's ``127.0.0.1:PORT`` (Fleet, Control and Runtime APIs).
    fleet_address : str
        The Fleet gateway's ``127.0.0.1:PORT``: the SuperNodes' ``--superlink``.
    superlink : psutil.Process or None
        The SuperLink's process while it is up.
    gateway : psutil.Process or None
        The Fleet gateway's process while it is up.
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
    warm_worker: bool = True
    timeout: float = 120
    nodes: list[NodeProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).expanduser().resolve()
        self.certs = Certificates.in_dir(self.directory / "certs")
        self.keys_dir = self.directory / "keys"
        self.flwr_home = self.directory / "flwr_home"
        self.logs = self.directory / "logs"
        self.state_file = self.directory / STATE_FILE
        self.database = self.directory / DATABASE
        self.port = 0
        self.address = ""
        self.fleet_port = 0
        self.fleet_address = ""
        self.superlink: psutil.Process | None = None
        self._superlink_record: ProcessRecord | None = None
        self.gateway: psutil.Process | None = None
        self._gateway_record: ProcessRecord | None = None
        # Every SuperLink and SuperNode ever started (the leaders of process groups), by name.
        self.leaders: dict[ProcessRecord, str] = {}
        self.cli = FlowerCLI(self.flwr_home, self.env)
        # SuperExecs, ServerApps and ClientApps, also once their parent has gone.
        self.below = processes.Descendants(self._tops, WATCH_INTERVAL)

    def __enter__(self) -> LocalFederation:
        return self.up()

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        # A leftover process is an error of its own only when nothing else went wrong.
        self.down(check=exc_type is None)

    @classmethod
    def attach(cls, directory: str | os.PathLike, timeout: float = 120) -> LocalFederation:
        """The federation `up` started in ``directory``, from its state file.

        Raises
        ------
        DeploymentError
            If there is no state file.
        """
        fed = cls(directory, timeout=timeout)
        if fed._read_state() is None:
            raise DeploymentError(
                f"{fed.state_file} is not a file: expected the state of a federation `up`"
            )
        fed.reload()
        return fed

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

    def reload(self) -> None:
        """Take the processes, ports and nodes from the state file (another process's changes)."""
        state = self._read_state() or {}
        self.flwr_home = Path(state.get("flwr_home", self.flwr_home))
        self.cli = FlowerCLI(self.flwr_home, self.env)
        self.address = state.get("address", self.address)
        self.database = Path(state.get("database", self.database))
        superlink = state.get("superlink") or {}
        self.port = int(superlink.get("port", self.port))
        self._superlink_record = ProcessRecord.from_json(superlink)
        self.superlink = self._superlink_record.process() if self._superlink_record else None
        gateway = state.get("fleet_gateway") or {}
        self.fleet_port = int(gateway.get("port", self.fleet_port))
        self.fleet_address = state.get("fleet_address", self.fleet_address)
        self._gateway_record = ProcessRecord.from_json(gateway)
        self.gateway = self._gateway_record.process() if self._gateway_record else None
        self.nodes = [NodeProcess.from_state(n) for n in state.get("supernodes", [])]
        self.num_nodes = len(self.nodes)
        self._remember(state)

    def _remember(self, state: Mapping[str, Any]) -> None:
        """Add the state file's process records to ours (none is ever dropped)."""
        for record, name in _leaders(state):
            self.leaders.setdefault(record, name)
        self.below.add(ProcessRecord.from_json(r) for r in state.get("descendants", []))

    def write_state(self) -> None:
        """Write the state file: processes, ports, FLWR_HOME, connection, database, logs.

        Process records another process wrote meanwhile (a `restart` from the
        command line) are kept, so that `down` still finds them.
        """
        self.below.look()
        self._remember(self._read_state() or {})
        superlink = None
        if self._superlink_record is not None:
            superlink = {
                **self._superlink_record.to_json(),
                "port": self.port,
                "log": str(self.logs / "superlink.log"),
            }
        gateway = None
        if self._gateway_record is not None:
            gateway = {
                **self._gateway_record.to_json(),
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
                "ca_cert": str(self.certs.ca_cert),
                "database": str(self.database),
                "superlink": superlink,
                "fleet_gateway": gateway,
                "supernodes": [n.state() for n in self.nodes],
                "groups": [{"name": n, **r.to_json()} for r, n in self.leaders.items()],
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

    def node(self, name: str) -> NodeProcess:
        """The node called ``name`` (its key's name, e.g. ``node-1``)."""
        for node in self.nodes:
            if node.name == name:
                return node
        names = ", ".join(["superlink", *(n.name for n in self.nodes)])
        raise DeploymentError(f"{name!r} is not a process of this federation: expected {names}")

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
        if any(processes.group(r) for r, _ in _leaders(self._read_state() or {})):
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
        # A new federation registers its keys afresh: an old database already holds them.
        for path in (self.database, *(Path(f"{self.database}{s}") for s in ("-wal", "-shm"))):
            path.unlink(missing_ok=True)
        try:
            self.port = processes.free_port()
            self.address = f"127.0.0.1:{self.port}"
            self.cli = connect(self.flwr_home, self.address, certs.ca_cert, self.env)
            self._start_superlink()
            self.fleet_port = processes.free_port()
            self.fleet_address = f"127.0.0.1:{self.fleet_port}"
            self._start_gateway()
            self.below.watch()
            for key, data_dir in zip(keys, data_dirs, strict=True):
                self.add_node(key, data_dir, wait=False)
            self.wait_online()
            self.write_state()
        except BaseException:
            self.down(check=False)
            raise
        return self

    def _start_superlink(self) -> None:
        """Start the SuperLink on our port and database; wait until it answers."""
        with processes.interrupts_deferred():  # started is recorded
            proc = start_superlink(
                self.certs,
                self.port,
                "127.0.0.1",
                log=self.logs / "superlink.log",
                cwd=self.directory,
                env=self._env(),
                database=self.database,
            )
            self.superlink, self._superlink_record = proc, ProcessRecord.of(proc)
            self._started(self._superlink_record, SUPERLINK)
        self._wait(
            lambda: superlink_healthy(self.address, self.certs.ca_cert),
            [proc],
            f"the SuperLink at {self.address} to answer",
        )

    def _start_gateway(self) -> None:
        """Start the Fleet gateway in front of our SuperLink; wait until it answers.

        It stays up while the SuperLink restarts: a SuperNode's call in between
        gets a 502, which Flower's SuperNode retries like a refused connection.
        """
        with processes.interrupts_deferred():  # started is recorded
            proc = start_fleet_gateway(
                self.certs,
                self.address,
                self.fleet_port,
                log=self.logs / "fleet-gateway.log",
                env=self._env(),
            )
            self.gateway, self._gateway_record = proc, ProcessRecord.of(proc)
            self._started(self._gateway_record, FLEET_GATEWAY)
        self._wait(
            lambda: superlink_healthy(self.fleet_address, self.certs.ca_cert),
            [proc],
            f"the Fleet gateway at {self.fleet_address} to answer",
        )

    def _started(self, record: ProcessRecord | None, name: str) -> None:
        if record is not None:
            self.leaders[record] = name
        self.write_state()

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
            # Each node's feature cache stays in the federation's folder.
            cache_dir=self.directory / "cache" / key.name,
            warm_worker=self.warm_worker,
            registered=register,
        )
        check_supernode_inputs(self.certs.ca_cert, key.private, node.data_dir)
        if register:
            node.node_id = self.cli.register_supernode(key.public)
        self.nodes.append(node)
        self._start_node(node)
        if wait and register:
            self.wait_online([node])
        return node

    def _start_node(self, node: NodeProcess) -> None:
        with processes.interrupts_deferred():  # started is recorded
            node.proc = start_supernode(
                self.fleet_address,
                self.certs.ca_cert,
                node.key.private,
                node.data_dir,
                node.port,
                log=node.log,
                env=self._env(),
                cache_dir=node.cache_dir,
                warm_worker=node.warm_worker,
            )
            node.record = ProcessRecord.of(node.proc)
            self._started(node.record, node.name)

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

    def _wait(
        self,
        predicate: Callable[[], Any],
        procs: Sequence[psutil.Process],
        what: str,
        timeout: float | None = None,
        interval: float = 0.5,
    ) -> None:
        try:
            processes.wait_until(predicate, timeout or self.timeout, procs, what, interval)
        except (processes.ProcessExitedError, processes.WaitTimeoutError) as err:
            raise DeploymentError(f"{err} (logs in {self.logs})") from None

    # -- stop and restart

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

    def restart_node(self, node: NodeProcess | str, wait: bool = True) -> NodeProcess:
        """Stop a SuperNode (if it still runs) and its group, and start it again.

        It comes back with the same key (so the same node id: no new
        registration), data, cache and port. A node that ended without leaving
        the SuperLink (killed) is started once the SuperLink has marked it
        offline, which takes up to two missed heartbeats (`OFFLINE_AFTER` s):
        before, the SuperLink refuses to activate its key.

        Parameters
        ----------
        node : NodeProcess or str
            The node, or its name.
        wait : bool
            Wait until it is online again.

        Returns
        -------
        NodeProcess
            The node, with its new process.

        Raises
        ------
        DeploymentError
            If its old processes cannot be stopped, or it does not come back in time.
        """
        if isinstance(node, str):
            node = self.node(node)
        left = self.stop_node(node)
        if left:
            raise DeploymentError(f"{node.name}: {describe(left)} still running after SIGKILL")
        if node.registered and node.node_id is not None:
            node_id = node.node_id
            self._wait(
                lambda: self.cli.supernodes().get(node_id) != "online",
                [],
                f"the SuperLink to mark {node.name} (node {node_id}) offline",
                timeout=OFFLINE_AFTER + self.timeout,
                interval=2,  # each look is a `flwr` process: spare the CPU for the others
            )
        self._start_node(node)
        if wait and node.registered:
            self.wait_online([node])
        return node

    def restart_superlink(self) -> dict[str, str]:
        """Stop the SuperLink and all it started, start it again on the same port and database.

        Registered keys and runs are in the database, so nothing is registered
        again. SuperNodes that still run reconnect by themselves (Flower 1.42
        retries without limit); any that exited is started again. Runs in
        flight end: Flower's ServerApp leaves when its SuperLink does (one whose
        SuperLink was killed may hang on its way out: it is stopped here), and
        the restarted SuperLink marks the run failed once its heartbeat is
        missed; ``resume=<run folder>`` continues it.

        Returns
        -------
        dict of str to str
            Each registered node's name: ``"reconnected"`` or ``"restarted"``.
        """
        self.below.look()  # its SuperExec and ServerApps, if it still runs
        with processes.interrupts_deferred():
            left = processes.stop_group(self._superlink_record) if self._superlink_record else []
            left += processes.stop(self._superlink_leftovers())
        if left:
            raise DeploymentError(f"the SuperLink's {describe(left)} still running after SIGKILL")
        self._start_superlink()
        nodes = [n for n in self.nodes if n.registered]
        status: dict[int, str] = {}

        def settled() -> bool:
            # Each node either talks to the new SuperLink, or has given up.
            status.update(self.cli.supernodes())
            return all(status.get(n.node_id) == "online" or not n.running() for n in nodes)

        self._wait(settled, [self.superlink] if self.superlink else [], "the nodes to reconnect")
        outcome = {}
        for node in nodes:
            outcome[node.name] = "reconnected" if node.running() else "restarted"
            if not node.running():
                self.restart_node(node, wait=False)
        self.wait_online(nodes)
        return outcome

    def down(self, check: bool = True) -> list[psutil.Process]:
        """Stop every process this federation started; also after a failed `up`.

        The state file decides what that is (every SuperLink and SuperNode ever
        started, also by another process, and what was seen below them); a PID
        whose process started at another time than recorded is left alone.
        Unfinished runs are stopped through the SuperLink first; then SuperNodes,
        the SuperLink, and the rest of their process groups. Ctrl-C waits until
        everything is stopped.

        Parameters
        ----------
        check : bool
            Raise if anything it started is still running at the end.

        Returns
        -------
        list of psutil.Process
            What is still running (only when ``check`` is false).

        Raises
        ------
        DeploymentError
            Naming every process left, with its PID.
        """
        self.below.close()
        with processes.interrupts_deferred():
            state = self._read_state() or {}
            if not self.nodes and self.superlink is None:
                self.cli = FlowerCLI(state.get("flwr_home", self.flwr_home), self.env)
            self._remember(state)
            superlink = self._superlink_record or ProcessRecord.from_json(state.get("superlink"))
            try:
                if superlink is not None and superlink.process() is not None:
                    with contextlib.suppress(FlowerCLIError):  # the processes matter more
                        self.cli.stop_unfinished_runs(timeout=20)
                self.below.look()
            finally:
                # SuperNodes first, all at once: they leave the SuperLink (through the
                # gateway, so it stays until they are gone). Then the SuperLink and the
                # gateway, then what is left of their groups and below them.
                links = (SUPERLINK, FLEET_GATEWAY)
                nodes = [r for r, name in self.leaders.items() if name not in links]
                processes.stop(p for p in map(_live, nodes) if p is not None)
                gateways = [r for r, name in self.leaders.items() if name == FLEET_GATEWAY]
                processes.stop(p for p in map(_live, [superlink, *gateways]) if p is not None)
                processes.stop(self.left_running())
                left = self.left_running()
                self._mark_down()
        if left and check:
            raise DeploymentError(f"{describe(left)} still running after `down`")
        return left

    def left_running(self) -> list[psutil.Process]:
        """Every process this federation started that still runs, by its records.

        That is every recorded process, and the rest of the process group of
        each: Flower's SuperLink starts its SuperExec in a session of its own,
        whose ServerApps join that SuperExec's group.
        """
        return processes.in_groups([*self.leaders, *self.below.records()])

    def _superlink_leftovers(self) -> list[psutil.Process]:
        """What earlier SuperLinks started that still runs: all that is no SuperNode's or gateway's.

        A SuperNode's SuperExec and ClientApps stay in its process group; the
        SuperLink's SuperExec leads a group of its own, and its ServerApps, also
        orphaned ones (a ServerApp whose SuperLink was killed may hang on its way
        out), are in that group.
        """
        nodes = [r for r, name in self.leaders.items() if name != SUPERLINK]
        theirs = {p.pid for p in processes.in_groups(nodes)}
        return [p for p in self.left_running() if p.pid not in theirs]

    def _mark_down(self) -> None:
        state = self._read_state()
        if state is not None:
            with contextlib.suppress(OSError):
                self._write({**state, "stopped": True})
        self.superlink = None
        self.gateway = None
        for node in self.nodes:
            node.proc = None


def describe(procs: Sequence[psutil.Process]) -> str:
    """``PID 123 (flwr-clientapp), ...``: processes for a message."""
    names = []
    for proc in procs:
        try:
            names.append(f"PID {proc.pid} ({proc.name()})")
        except psutil.Error:
            names.append(f"PID {proc.pid}")
    return ", ".join(names)


def _leaders(state: Mapping[str, Any]) -> list[tuple[ProcessRecord, str]]:
    """The SuperLinks and SuperNodes a state file records (leaders of process groups), named."""
    named = [
        ({**(state.get("superlink") or {}), "name": SUPERLINK}),
        *state.get("supernodes", []),
        *state.get("groups", []),
    ]
    leaders = [(ProcessRecord.from_json(entry), entry.get("name", "")) for entry in named]
    return [(record, name) for record, name in leaders if record is not None]


def _live(record: ProcessRecord | None) -> psutil.Process | None:
    return record.process() if record is not None else None
