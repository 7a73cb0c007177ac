"""Start a deployment's SuperLink, Fleet gateway and SuperNodes, and register node keys.

Every input is checked first (`fl_app.deploy.checks`); each process starts in the
background, in its own session (`fl_app.launch.processes.start`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from fl_app.deploy.checks import (
    check_address,
    check_superlink_host,
    check_superlink_inputs,
    check_supernode_inputs,
    require_file,
)
from fl_app.deploy.commands import (
    DEFAULT_FLEET_PORT,
    DEFAULT_SUPERLINK_PORT,
    DEFAULT_SUPERNODE_PORT,
    fleet_gateway_command,
    superlink_command,
    supernode_command,
    supernode_env,
)
from fl_app.deploy.pki import Certificates
from fl_app.launch import processes
from fl_app.launch.flower_cli import FlowerCLI, write_connection

PUBLIC_KEY = "a node's public key (<name>.pub from `fl-app deploy node-keys`)"


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
