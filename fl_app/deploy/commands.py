"""The command lines of a deployment: ``flower-superlink``, ``flower-supernode``, the Fleet gateway.

Each is built from its inputs alone; `fl_app.deploy.checks` checks those first
and `fl_app.deploy.start` starts them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from fl_app.deploy import DeploymentError
from fl_app.deploy.pki import Certificates
from fl_app.launch import processes
from fl_app.node_worker import WARM_WORKER_KEY

FLOWER_SUPERLINK = str(processes.BIN / "flower-superlink")
FLOWER_SUPERNODE = str(processes.BIN / "flower-supernode")
# Flower 1.42's default SuperLink port: Fleet, Control and Runtime APIs all on it.
DEFAULT_SUPERLINK_PORT = 8000
# Where devices reach the Fleet gateway (the Fleet API's port before Flower 1.42).
DEFAULT_FLEET_PORT = 9092
# Flower's default port of a SuperNode's own (ClientApp-facing) Runtime API.
DEFAULT_SUPERNODE_PORT = 9094
# A SuperNode's SuperExec looks for new messages every second by default (Flower 1.42):
# half a second of every deployed message's latency, on average.
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_SECONDS = "0.2"


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


def supernode_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A SuperNode's environment: ``env`` (default: this process's) with `process_env`'s PATH.

    Its SuperExec polls for messages every `SUPEREXEC_POLL_SECONDS` unless ``env``
    sets `SUPEREXEC_POLL_ENV`.
    """
    return {SUPEREXEC_POLL_ENV: SUPEREXEC_POLL_SECONDS, **processes.process_env(env)}
