"""SuperLink and SuperNode command lines of a deployment, with their inputs checked first.

Every input file and address is checked before anything starts; a bad one is
one `DeploymentError` line naming it and what was expected.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from fl_app.config import WARM_WORKER_KEY
from fl_app.deploy import DeploymentError
from fl_app.deploy.pki import Certificates, certificate_hosts
from fl_app.launch import processes
from fl_app.launch.flower_cli import FlowerCLI, split_host_port, write_connection

FLOWER_SUPERLINK = str(processes.BIN / "flower-superlink")
FLOWER_SUPERNODE = str(processes.BIN / "flower-supernode")
# Flower 1.42's default SuperLink port: Fleet, Control and Runtime APIs all on it.
DEFAULT_SUPERLINK_PORT = 8000
# Where devices reach the Fleet gateway (the Fleet API's port before Flower 1.42).
DEFAULT_FLEET_PORT = 9092
# The SuperLink's own port serves the Control API, which authenticates nobody in
# open-source Flower 1.42: it listens on one of these unless explicitly exposed.
LOOPBACK = ("127.0.0.1", "::1", "localhost")
# Flower's default port of a SuperNode's own (ClientApp-facing) Runtime API.
DEFAULT_SUPERNODE_PORT = 9094
# A SuperNode's SuperExec looks for new messages every second by default (Flower 1.42):
# half a second of every deployed message's latency, on average.
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_SECONDS = "0.2"
BIND_ALL = ("0.0.0.0", "::", "[::]")
PUBLIC_KEY = "a node's public key (<name>.pub from `fl-app deploy node-keys`)"


def require_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` made absolute if it is a file, else a `DeploymentError` line.

    The line reads "<path> is not a file: expected <what>".
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DeploymentError(f"{p} is not a file: expected {what}")
    return p.resolve()


def require_dir(path: str | os.PathLike, what: str) -> Path:
    """``path`` made absolute if it is a folder, else a `DeploymentError` line.

    The line reads "<path> is not a folder: expected <what>".
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DeploymentError(f"{p} is not a folder: expected {what}")
    return p.resolve()


def check_superlink_inputs(certs: Certificates) -> Certificates:
    """Check the three files the SuperLink reads; raise `DeploymentError` if one is missing."""
    require_file(certs.ca_cert, "the CA certificate (`fl-app deploy certificates` writes it)")
    require_file(certs.server_cert, "the SuperLink's TLS certificate, signed by the CA")
    require_file(certs.server_key, "the SuperLink's TLS private key")
    return certs


def node_config(
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    warm_worker: bool = True,
) -> str:
    """The ``--node-config`` value: ``data-dir="/abs/path"`` [``cache-dir="/abs/path"``].

    ``cache-dir`` is where the node keeps cached activations, its base model and
    its warm worker's files between its ClientApp processes (default
    ``~/.cache/fl_app``). Without ``warm_worker``, ``warm-worker=false``: every
    message does its work in its own process (`fl_app.node_worker`).
    """
    entries = {"data-dir": data_dir, "cache-dir": cache_dir}
    paths = [
        f"{key}={_toml_string(str(Path(value).expanduser().resolve()))}"
        for key, value in entries.items()
        if value is not None
    ]
    return " ".join(paths if warm_worker else [*paths, f"{WARM_WORKER_KEY}=false"])


def _toml_string(path: str) -> str:
    # Flower reads each value as TOML: a basic string, or a literal one if needed.
    if '"' not in path and "\\" not in path:
        return f'"{path}"'
    if "'" not in path:
        return f"'{path}'"
    raise DeploymentError(f"{path}: a folder's path cannot contain both ' and \"")


def superlink_command(
    certs: Certificates,
    port: int = DEFAULT_SUPERLINK_PORT,
    host: str = "127.0.0.1",
    database: str | os.PathLike | None = None,
) -> list[str]:
    """The ``flower-superlink`` command line with TLS and SuperNode authentication.

    The SuperLink serves the Fleet API (SuperNodes), the Control API
    (``flwr run``/``ls``/``supernode register``) and the Runtime API (its
    ServerApps) on ``host:port``, all over TLS. Runtime dependency installation
    is off: ServerApps run in this Python environment.

    Parameters
    ----------
    certs : Certificates
        The CA certificate and the SuperLink's certificate and key.
    port : int
        The one port of all three APIs.
    host : str
        The address to listen on (``0.0.0.0`` for every interface).
    database : str or os.PathLike, optional
        A SQLite file that keeps registered nodes and runs across restarts;
        default in memory.

    Returns
    -------
    list of str
        The argv.
    """
    cmd = [
        FLOWER_SUPERLINK,
        "--ssl-ca-certfile",
        str(certs.ca_cert),
        "--ssl-certfile",
        str(certs.server_cert),
        "--ssl-keyfile",
        str(certs.server_key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
    ]
    if database is not None:
        cmd += ["--database", str(Path(database).expanduser().resolve())]
    return cmd


def supernode_command(
    superlink: str,
    ca_cert: str | os.PathLike,
    private_key: str | os.PathLike,
    data_dir: str | os.PathLike,
    port: int = DEFAULT_SUPERNODE_PORT,
    host: str = "127.0.0.1",
    cache_dir: str | os.PathLike | None = None,
    warm_worker: bool = True,
) -> list[str]:
    """The ``flower-supernode`` command line of an authenticated node over TLS.

    Parameters
    ----------
    superlink : str
        The SuperLink's ``HOST:PORT``; HOST must be in its certificate.
    ca_cert : str or os.PathLike
        The CA certificate that signed the SuperLink's certificate.
    private_key : str or os.PathLike
        The node's OpenSSH ECDSA private key (its public key registered).
    data_dir : str or os.PathLike
        The node's data folder, passed as ``--node-config 'data-dir="..."'``.
    port : int
        The node's own Runtime API port (its ClientApps connect there); every
        SuperNode on one machine needs a different one.
    host : str
        The address of that Runtime API.
    cache_dir : str or os.PathLike, optional
        Where the node caches activations of the frozen part (see `node_config`).
    warm_worker : bool
        Whether its messages go to a warm worker (see `node_config`).

    Returns
    -------
    list of str
        The argv.
    """
    return [
        FLOWER_SUPERNODE,
        "--superlink",
        superlink,
        "--root-certificates",
        str(Path(ca_cert).expanduser().resolve()),
        "--auth-supernode-private-key",
        str(Path(private_key).expanduser().resolve()),
        "--node-config",
        node_config(data_dir, cache_dir, warm_worker),
        "--host",
        host,
        "--port",
        str(port),
    ]


def check_address(address: str, what: str = "--superlink") -> tuple[str, int]:
    """Split ``HOST:PORT``; raise one clear line if it is not that.

    Parameters
    ----------
    address : str
        ``HOST:PORT`` (``[v6]:PORT`` for IPv6).
    what : str
        The option's name, for the message.

    Returns
    -------
    tuple of (str, int)
        Host and port.
    """
    parts = split_host_port(address)
    if parts is None:
        raise DeploymentError(f"{what} {address!r} is not allowed: expected HOST:PORT")
    return parts


def check_control_host(host: str, expose_control_api: bool = False) -> None:
    """Check that the SuperLink's one port (Control API included) stays on loopback.

    Anyone who reaches that port with ``ca.crt`` can register node keys and
    submit runs (Flower 1.42's open-source Control API has no account
    authentication), so another address needs ``expose_control_api``.

    Raises
    ------
    DeploymentError
        If ``host`` is not loopback and the exposure was not asked for.
    """
    if host.strip("[]").lower() not in LOOPBACK and not expose_control_api:
        raise DeploymentError(
            f"--host {host} is not allowed: expected a loopback address"
            f" ({', '.join(LOOPBACK)}), since that port serves the Control API to anyone"
            " holding ca.crt; devices reach the Fleet API through --fleet-host, or pass"
            " --expose-control-api"
        )


def local_address(host: str) -> str:
    """Where processes on the SuperLink's machine reach a SuperLink listening on ``host``.

    Loopback for an every-interface ``host`` (``0.0.0.0``: 127.0.0.1; ``::``: ::1),
    else ``host`` itself.
    """
    return "127.0.0.1" if host in BIND_ALL[:1] else "::1" if host in BIND_ALL[1:] else host


def check_superlink_host(certs: Certificates, host: str) -> None:
    """Check that the SuperLink's own SuperExec will trust its certificate.

    The SuperExec that starts ServerApps connects to ``host:port`` (loopback
    for ``0.0.0.0``) with TLS, so that address must be in the certificate.

    Raises
    ------
    DeploymentError
        If it is not.
    """
    local = local_address(host)
    names = [n.lower() for n in certificate_hosts(certs.server_cert)]
    if local.lower() not in names:
        raise DeploymentError(
            f"{certs.server_cert} does not name {local} (it names {', '.join(names) or 'nothing'}):"
            f" the SuperLink's own SuperExec connects to {local} over TLS; remake the"
            f" certificates with --host {local}"
        )


def advertised_host(certs: Certificates, host: str) -> str:
    """The host name clients should use for a SuperLink listening on ``host``.

    ``host`` itself, unless it listens on every interface: then the first
    non-loopback name in its certificate (else ``127.0.0.1``).
    """
    if host not in BIND_ALL:
        return f"[{host}]" if ":" in host else host
    loopback = {"127.0.0.1", "localhost", "::1"}
    for name in certificate_hosts(certs.server_cert):
        if name.lower() not in loopback:
            return f"[{name}]" if ":" in name else name
    return "127.0.0.1"


def start_superlink(
    certs: Certificates,
    port: int = DEFAULT_SUPERLINK_PORT,
    host: str = "127.0.0.1",
    log: str | os.PathLike = "superlink.log",
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    database: str | os.PathLike | None = None,
) -> psutil.Popen:
    """Start a TLS + SuperNode-auth SuperLink in the background; return its process.

    Every input file is checked first. Relative ``results-dir`` values of runs
    start from ``cwd`` (the ServerApp's working directory).

    Parameters
    ----------
    certs : Certificates
        CA certificate, SuperLink certificate and key.
    port, host : int, str
        Where it listens (see `superlink_command`).
    log : str or os.PathLike
        Its stdout and stderr (appended).
    cwd : str or os.PathLike, optional
        Its working directory.
    env : Mapping, optional
        Its environment (default: this process's).
    database : str or os.PathLike, optional
        See `superlink_command`.

    Returns
    -------
    psutil.Popen
        The process, in its own session; stop it with `fl_app.launch.processes.stop_tree`.
    """
    check_superlink_inputs(certs)
    check_superlink_host(certs, host)
    cmd = superlink_command(certs, port, host, database)
    return processes.start(cmd, log=log, cwd=cwd, env=env)


def fleet_gateway_command(
    certs: Certificates,
    superlink: str,
    port: int = DEFAULT_FLEET_PORT,
    host: str = "127.0.0.1",
    parent_pid: int | None = None,
) -> list[str]:
    """The ``fl-app deploy fleet-gateway`` command line (see `fl_app.deploy.gateway`).

    Parameters
    ----------
    certs : Certificates
        The CA certificate (to check the SuperLink) and the SuperLink's
        certificate and key (which the gateway presents to SuperNodes).
    superlink : str
        The SuperLink's ``HOST:PORT`` on this machine.
    port, host : int, str
        Where devices reach the gateway (``0.0.0.0`` for every interface).
    parent_pid : int, optional
        The gateway exits once this process has ended.

    Returns
    -------
    list of str
        The argv (this Python, ``-m fl_app.cli``).
    """
    cmd = [
        sys.executable,
        "-m",
        "fl_app.cli",
        "deploy",
        "fleet-gateway",
        "--certs",
        str(Path(certs.ca_cert).parent),
        "--superlink",
        superlink,
        "--host",
        host,
        "--port",
        str(port),
    ]
    if parent_pid is not None:
        cmd += ["--parent-pid", str(parent_pid)]
    return cmd


def start_fleet_gateway(
    certs: Certificates,
    superlink: str,
    port: int = DEFAULT_FLEET_PORT,
    host: str = "127.0.0.1",
    log: str | os.PathLike = "fleet-gateway.log",
    env: Mapping[str, str] | None = None,
) -> psutil.Popen:
    """Start the Fleet gateway in the background; return its process.

    Parameters
    ----------
    certs, superlink, port, host
        See `fleet_gateway_command`.
    log : str or os.PathLike
        Its stdout and stderr (appended).
    env : Mapping, optional
        Its environment (default: this process's).

    Returns
    -------
    psutil.Popen
        The process, in its own session; stop it with `fl_app.launch.processes.stop_tree`.
    """
    check_superlink_inputs(certs)
    check_address(superlink)
    cmd = fleet_gateway_command(certs, superlink, port, host)
    return processes.start(cmd, log=log, env=env)


def check_supernode_inputs(
    ca_cert: str | os.PathLike, private_key: str | os.PathLike, data_dir: str | os.PathLike
) -> None:
    """Check a SuperNode's CA certificate, private key and data folder exist.

    Raises
    ------
    DeploymentError
        Naming the first missing one and what it is.
    """
    require_file(ca_cert, "the CA certificate that signed the SuperLink's certificate")
    require_file(private_key, "the node's private key (`fl-app deploy node-keys` writes it)")
    require_dir(data_dir, "the node's data folder (partition.npz or one image folder per class)")


def start_supernode(
    superlink: str,
    ca_cert: str | os.PathLike,
    private_key: str | os.PathLike,
    data_dir: str | os.PathLike,
    port: int = DEFAULT_SUPERNODE_PORT,
    host: str = "127.0.0.1",
    log: str | os.PathLike = "supernode.log",
    env: Mapping[str, str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    warm_worker: bool = True,
) -> psutil.Popen:
    """Start an authenticated SuperNode in the background; return its process.

    Every input file is checked first (see `check_supernode_inputs`); an
    existing but empty data folder is allowed (the node's ClientApps then
    fail, and the server rejects their replies).

    Parameters
    ----------
    superlink, ca_cert, private_key, data_dir, port, host, cache_dir, warm_worker
        See `supernode_command`.
    log : str or os.PathLike
        Its stdout and stderr (appended).
    env : Mapping, optional
        Its environment (default: this process's).

    Returns
    -------
    psutil.Popen
        The process, in its own session; stop it with `fl_app.launch.processes.stop_tree`.
    """
    check_address(superlink)
    check_supernode_inputs(ca_cert, private_key, data_dir)
    cmd = supernode_command(
        superlink, ca_cert, private_key, data_dir, port, host, cache_dir, warm_worker
    )
    return processes.start(cmd, log=log, env=supernode_env(env))


def supernode_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A SuperNode's environment: ``env`` (default: this process's) with `process_env`'s PATH.

    Its SuperExec polls for messages every `SUPEREXEC_POLL_SECONDS` unless ``env``
    sets `SUPEREXEC_POLL_ENV`.
    """
    return {SUPEREXEC_POLL_ENV: SUPEREXEC_POLL_SECONDS, **processes.process_env(env)}


def connect(
    flwr_home: str | os.PathLike,
    address: str,
    ca_cert: str | os.PathLike,
    env: Mapping[str, str] | None = None,
) -> FlowerCLI:
    """Write a TLS ``fl-app`` connection into ``flwr_home`` and return its `FlowerCLI`.

    Parameters
    ----------
    flwr_home : str or os.PathLike
        The ``FLWR_HOME`` folder (created if needed).
    address : str
        The SuperLink's ``HOST:PORT`` (its one port).
    ca_cert : str or os.PathLike
        The CA certificate (``root-certificates`` of the connection).
    env : Mapping, optional
        Base environment of the ``flwr`` commands.

    Returns
    -------
    FlowerCLI
        For ``submit``/``follow``/``wait`` and ``register_supernode``/``supernodes``.
    """
    ca = require_file(ca_cert, "the CA certificate that signed the SuperLink's certificate")
    home = Path(flwr_home).expanduser().resolve()
    write_connection(home, address, insecure=False, root_certificates=str(ca))
    return FlowerCLI(home, env)


def register_keys(
    superlink: str,
    ca_cert: str | os.PathLike,
    public_keys: Sequence[str | os.PathLike],
    env: Mapping[str, str] | None = None,
) -> list[int]:
    """Register public keys with a running SuperLink, through a throw-away FLWR_HOME.

    Parameters
    ----------
    superlink : str
        The SuperLink's ``HOST:PORT``.
    ca_cert : str or os.PathLike
        The CA certificate that signed its certificate.
    public_keys : sequence of path
        OpenSSH public key files.
    env : Mapping, optional
        Base environment of ``flwr``.

    Returns
    -------
    list of int
        The node ids, in order.
    """
    check_address(superlink)
    for key in public_keys:
        require_file(key, PUBLIC_KEY)
    with tempfile.TemporaryDirectory(prefix="flwr_home-") as home:
        cli = connect(home, superlink, ca_cert, env)
        return [cli.register_supernode(require_file(key, PUBLIC_KEY)) for key in public_keys]
