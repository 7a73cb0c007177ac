"""The lifecycle of a TLS + authenticated federation on loopback: up, restarts, down.

For demos, tests and benches; what it started is kept in its saved state
(`fl_app.deploy.federation_state`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

from fl_app.deploy import DeploymentError
from fl_app.deploy.checks import check_supernode_inputs
from fl_app.deploy.federation_processes import FederationProcesses
from fl_app.deploy.federation_state import FederationState, NodeProcess
from fl_app.deploy.node_data import node_data_dirs
from fl_app.deploy.pki import (
    Certificates,
    NodeKey,
    reuse_or_make_certificates,
    reuse_or_make_node_key,
)
from fl_app.deploy.start import connect
from fl_app.launch import processes
from fl_app.launch.flower_cli import FlowerCLI, FlowerCLIError
from fl_app.launch.processes import ProcessRecord, describe

# A SuperNode that ended without deactivating (SIGKILL, power loss) stays "online" until
# it has missed HEARTBEAT_PATIENCE heartbeats (60 s in Flower 1.42), and the SuperLink
# refuses to activate its key again until then ("[code: 2004] Failed to activate SuperNode").
OFFLINE_AFTER = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL


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
    the state file records each as PID and start time (`state`), so no reused
    PID is ever signalled, and stopping one stops its whole group, orphans included.

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
    state : FederationState
        What it started and the state file that keeps it: `address`, `nodes`, ... read it.
    procs : FederationProcesses
        How each of its processes starts and stops.
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

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).expanduser().resolve()
        self.certs = Certificates.in_dir(self.directory / "certs")
        self.keys_dir = self.directory / "keys"
        self.logs = self.directory / "logs"
        self.state = FederationState(self.directory, self.certs.ca_cert, self.logs)
        self.procs = FederationProcesses(
            self.certs, self.directory, self.logs, self.state, self.env, self.timeout
        )
        self.cli = FlowerCLI(self.state.flwr_home, self.env)

    @property
    def address(self) -> str:
        """The SuperLink's ``127.0.0.1:PORT`` (Fleet, Control and Runtime APIs)."""
        return self.state.address

    @property
    def fleet_address(self) -> str:
        """The Fleet gateway's ``127.0.0.1:PORT``: the SuperNodes' ``--superlink``."""
        return self.state.fleet_address

    @property
    def superlink(self) -> psutil.Process | None:
        """The SuperLink's process while it is up."""
        return self.state.superlink

    @property
    def gateway(self) -> psutil.Process | None:
        """The Fleet gateway's process while it is up."""
        return self.state.gateway

    @property
    def nodes(self) -> list[NodeProcess]:
        """The SuperNodes started, in order."""
        return self.state.nodes

    @property
    def state_file(self) -> Path:
        """The state file, ``federation.json``."""
        return self.state.file

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
        if fed.state.read() is None:
            raise DeploymentError(
                f"{fed.state_file} is not a file: expected the state of a federation `up`"
            )
        fed.reload()
        return fed

    def reload(self) -> None:
        """Take the processes, ports and nodes from the state file (another process's changes)."""
        self.state.reload()
        self.cli = FlowerCLI(self.state.flwr_home, self.env)
        self.num_nodes = len(self.state.nodes)

    def node(self, name: str) -> NodeProcess:
        """The node called ``name`` (its key's name, e.g. ``node-1``)."""
        for node in self.nodes:
            if node.name == name:
                return node
        names = ", ".join(["superlink", *(n.name for n in self.nodes)])
        raise DeploymentError(f"{name!r} is not a process of this federation: expected {names}")

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
        if self.state.any_up():
            raise DeploymentError(
                f"a federation is already up in {self.directory} (see {self.state_file});"
                " take it down first"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        certs = reuse_or_make_certificates(self.certs.ca_cert.parent)
        keys = [reuse_or_make_node_key(self.keys_dir, f"node-{i}") for i in range(self.num_nodes)]
        data_dirs = node_data_dirs(
            self.num_nodes,
            self.data_dirs,
            self.data_root or self.directory / "data",
            self.dataset,
            self.partitioner,
            self.seed,
            self.max_examples,
        )
        # A new federation registers its keys afresh: an old database already holds them.
        state = self.state
        for path in (state.database, *(Path(f"{state.database}{s}") for s in ("-wal", "-shm"))):
            path.unlink(missing_ok=True)
        try:
            state.port = processes.free_port()
            state.address = f"127.0.0.1:{state.port}"
            self.cli = connect(state.flwr_home, state.address, certs.ca_cert, self.env)
            self.procs.start_superlink()
            state.fleet_port = processes.free_port()
            state.fleet_address = f"127.0.0.1:{state.fleet_port}"
            self.procs.start_gateway()
            state.below.watch()
            for key, data_dir in zip(keys, data_dirs, strict=True):
                self.add_node(key, data_dir, wait=False)
            self.wait_online()
            state.write()
        except BaseException:
            self.down(check=False)
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
            # Each node's feature cache stays in the federation's folder.
            cache_dir=self.directory / "cache" / key.name,
            warm_worker=self.warm_worker,
            registered=register,
        )
        check_supernode_inputs(self.certs.ca_cert, key.private, node.data_dir)
        if register:
            node.node_id = self.cli.register_supernode(key.public)
        self.nodes.append(node)
        self.procs.start_node(node)
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
            self.procs.wait(online, procs, f"nodes {sorted(wanted)} to come online")
        except DeploymentError as err:
            missing = sorted(n for n in wanted if status.get(n) != "online")
            states = ", ".join(f"{n} {status.get(n, 'unknown')}" for n in missing)
            raise DeploymentError(f"{err} ({states})") from None

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
        left = self.procs.stop_node(node)
        if left:
            raise DeploymentError(f"{node.name}: {describe(left)} still running after SIGKILL")
        if node.registered and node.node_id is not None:
            node_id = node.node_id
            self.procs.wait(
                lambda: self.cli.supernodes().get(node_id) != "online",
                [],
                f"the SuperLink to mark {node.name} (node {node_id}) offline",
                timeout=OFFLINE_AFTER + self.timeout,
                interval=2,  # each look is a `flwr` process: spare the CPU for the others
            )
        self.procs.start_node(node)
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
        self.procs.stop_superlink()
        self.procs.start_superlink()
        nodes = [n for n in self.nodes if n.registered]
        status: dict[int, str] = {}

        def settled() -> bool:
            # Each node either talks to the new SuperLink, or has given up.
            status.update(self.cli.supernodes())
            return all(status.get(n.node_id) == "online" or not n.running() for n in nodes)

        procs = [self.superlink] if self.superlink else []
        self.procs.wait(settled, procs, "the nodes to reconnect")
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
        state = self.state
        state.below.close()
        with processes.interrupts_deferred():
            saved = state.read() or {}
            if not self.nodes and self.superlink is None:
                self.cli = FlowerCLI(saved.get("flwr_home", state.flwr_home), self.env)
            state.remember(saved)
            superlink = state.superlink_record or ProcessRecord.from_json(saved.get("superlink"))
            try:
                if superlink is not None and superlink.process() is not None:
                    with contextlib.suppress(FlowerCLIError):  # the processes matter more
                        self.cli.stop_unfinished_runs(timeout=20)
                state.below.look()
            finally:
                left = self.procs.stop_all(superlink)
                state.mark_down()
        if left and check:
            raise DeploymentError(f"{describe(left)} still running after `down`")
        return left
