"""``fl-app deploy ...``: certificates, node keys, the SuperLink with its Fleet gateway, SuperNodes.

Every command checks its inputs before anything starts; a bad one is one
``error:`` line and exit code 2 (see `fl_app.cli.main`).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated

import typer

from fl_app.deploy import DeploymentError
from fl_app.deploy.checks import (
    BIND_ALL,
    LOOPBACK,
    advertised_host,
    check_address,
    check_control_host,
    check_superlink_host,
    check_superlink_inputs,
    check_supernode_inputs,
    local_address,
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
from fl_app.deploy.pki import (
    DEFAULT_HOSTS,
    Certificates,
    certificate_hosts,
    make_certificates,
    make_node_keys,
)
from fl_app.deploy.start import register_keys
from fl_app.launch import processes

deploy = typer.Typer(
    help="A real deployment: certificates, node keys, SuperLink and SuperNodes (TLS + auth).",
    add_completion=False,
)


@deploy.command("certificates")
def certificates(
    out: Annotated[Path, typer.Option(help="folder for the four files")],
    host: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME_OR_IP",
            help="a host name or IP address of the SuperLink (repeatable; "
            f"{' and '.join(DEFAULT_HOSTS)} are always included)",
        ),
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="validity in days")] = 825,
) -> int:
    """Make a CA and a SuperLink TLS certificate signed by it (no openssl needed).

    Writes OUT/ca.crt and OUT/ca.key (the CA), OUT/server.pem and OUT/server.key
    (the SuperLink's certificate and key; keys 0600). The server certificate names
    every --host (and always 127.0.0.1 and localhost): SuperNodes and `flwr` must
    reach the SuperLink by one of these names. Existing files are never
    overwritten. Give ca.crt to every SuperNode and `flwr` user; keep ca.key
    offline.
    """
    certs = make_certificates(out, host or DEFAULT_HOSTS, days)
    print(f"CA certificate:        {certs.ca_cert}  (give to SuperNodes and flwr users)")
    print(f"CA key:                {certs.ca_key}  (keep private)")
    print(f"SuperLink certificate: {certs.server_cert}")
    print(f"SuperLink key:         {certs.server_key}")
    print(f"The SuperLink may be reached as: {', '.join(certificate_hosts(certs.server_cert))}")
    return 0


@deploy.command("node-keys")
def node_keys(
    out: Annotated[Path, typer.Option(help="folder for the keys")],
    names: Annotated[list[str], typer.Argument(metavar="NAME...", help="key (node) names")],
) -> int:
    """Make SuperNode key pairs for node authentication (like `ssh-keygen -t ecdsa -b 384`).

    For each NAME writes OUT/NAME (OpenSSH ECDSA P-384 private key, 0600, for
    `flower-supernode --auth-supernode-private-key`) and OUT/NAME.pub (the public
    key, for `fl-app deploy register`). Existing files are never overwritten.
    """
    for key in make_node_keys(out, names):
        print(f"{key.name}: private {key.private}, public {key.public}")
    return 0


@deploy.command("register")
def register(
    superlink: Annotated[str, typer.Option(metavar="HOST:PORT", help="the SuperLink's address")],
    ca: Annotated[Path, typer.Option(help="the CA certificate (ca.crt) of the SuperLink")],
    keys: Annotated[list[Path], typer.Argument(metavar="KEY.pub...", help="public key files")],
) -> int:
    """Register SuperNodes' public keys with a running SuperLink (node authentication on).

    Runs `flwr supernode register KEY.pub` for each key over TLS, through a
    temporary FLWR_HOME whose connection points at --superlink with --ca as root
    certificate. Only registered keys can connect; a key can be registered once
    per SuperLink (its state is in memory unless it runs with --database).
    """
    for key, node_id in zip(keys, register_keys(superlink, ca, keys), strict=True):
        print(f"{key}: registered as SuperNode {node_id}")
    return 0


@deploy.command("superlink")
def superlink(
    certs: Annotated[Path, typer.Option(help="folder with ca.crt, server.pem, server.key")],
    port: Annotated[
        int,
        typer.Option(
            min=1, max=65535, help="the SuperLink's port: Fleet, Control and Runtime APIs"
        ),
    ] = DEFAULT_SUPERLINK_PORT,
    host: Annotated[
        str, typer.Option(help="the SuperLink's address: loopback unless --expose-control-api")
    ] = "127.0.0.1",
    fleet_host: Annotated[
        str,
        typer.Option(help="where devices reach the Fleet gateway (0.0.0.0 for every interface)"),
    ] = "127.0.0.1",
    fleet_port: Annotated[
        int, typer.Option(min=1, max=65535, help="the Fleet gateway's port")
    ] = DEFAULT_FLEET_PORT,
    expose_control_api: Annotated[
        bool,
        typer.Option(
            help="allow a non-loopback --host: anyone reaching it with ca.crt can then"
            " register node keys and submit runs"
        ),
    ] = False,
    gateway_log: Annotated[Path, typer.Option(help="the Fleet gateway's log")] = Path(
        "fleet-gateway.log"
    ),
    database: Annotated[
        Path | None,
        typer.Option(help="SQLite file keeping registered nodes and runs (default: memory)"),
    ] = None,
) -> int:
    """Run a SuperLink with TLS and SuperNode authentication, and its Fleet gateway.

    Runs `flower-superlink` in the foreground with CERTS/ca.crt, server.pem and
    server.key, --enable-supernode-auth and --disable-runtime-dependency-installation
    (ServerApps run in this Python). Its ONE port serves the Fleet, Control and
    Runtime APIs, and Flower 1.42's open-source Control API authenticates nobody:
    so it listens on loopback (--host), and devices reach only the Fleet API,
    through the Fleet gateway on --fleet-host:--fleet-port (which refuses every
    other request). Register keys and submit runs on this machine, or through an
    SSH tunnel to it. Relative `results-dir` values of runs start from the
    directory you start it in. Ctrl-C stops both.
    """
    found = _check_superlink(certs, port, host, fleet_host, fleet_port, expose_control_api)
    cmd = superlink_command(found, port, host, database)
    _start_gateway(found, _upstream(host, port), fleet_host, fleet_port, gateway_log)
    exposed = (
        f"ALSO on {host}: --expose-control-api"
        if expose_control_api and host.strip("[]") not in LOOPBACK
        else "this machine only"
    )
    guide = _superlink_guide(found, host, port, fleet_host, fleet_port, exposed, gateway_log)
    print(f"{guide}\n\n$ {shlex.join(cmd)}", flush=True)
    os.execve(cmd[0], cmd, processes.process_env())
    return 0  # not reached


def _upstream(host: str, port: int) -> str:
    """Where the gateway reaches the SuperLink: where its SuperExec does (in its certificate)."""
    local = local_address(host)
    return f"[{local}]:{port}" if ":" in local else f"{local}:{port}"


def _check_superlink(
    certs: Path, port: int, host: str, fleet_host: str, fleet_port: int, expose_control_api: bool
) -> Certificates:
    """The certificates in ``certs``, once every option of `superlink` is checked."""
    found = check_superlink_inputs(Certificates.in_dir(certs))
    check_control_host(host, expose_control_api)
    check_superlink_host(found, host)
    if fleet_port == port and fleet_host in (host, *BIND_ALL):
        raise DeploymentError(
            f"--fleet-port {fleet_port} is not allowed: expected another port than --port {port}"
        )
    return found


def _start_gateway(
    certs: Certificates, upstream: str, fleet_host: str, fleet_port: int, log: Path
) -> None:
    """Start the Fleet gateway in front of ``upstream``; wait until it listens."""
    # Our child, in our process group: Ctrl-C reaches it too, and it exits once the
    # SuperLink that replaces this process (same PID) has ended.
    gateway_cmd = fleet_gateway_command(certs, upstream, fleet_port, fleet_host, os.getpid())
    gateway = processes.start(gateway_cmd, log=log, own_session=False)
    try:
        processes.wait_until(
            lambda: processes.listening_on(fleet_port) is not None,
            30,
            [gateway],
            f"the Fleet gateway to listen on {fleet_host}:{fleet_port}",
        )
    except (processes.ProcessExitedError, processes.WaitTimeoutError) as err:
        processes.stop([gateway])
        raise DeploymentError(f"{err} (see {log.resolve()})") from None


def _superlink_guide(
    found: Certificates,
    host: str,
    port: int,
    fleet_host: str,
    fleet_port: int,
    exposed: str,
    gateway_log: Path,
) -> str:
    """What `superlink` prints before it becomes the SuperLink: where it is and how to use it."""
    control = f"{advertised_host(found, host)}:{port}"
    upstream = _upstream(host, port)
    address = f"{advertised_host(found, fleet_host)}:{fleet_port}"
    names = ", ".join(certificate_hosts(found.server_cert))
    return f"""SuperLink (TLS + SuperNode authentication) on {host}:{port} ({exposed}):
Fleet, Control and Runtime APIs. Devices reach the Fleet API alone through the
Fleet gateway on {fleet_host}:{fleet_port} (log {gateway_log.resolve()}).
Clients must use a name in the certificate: {names}.

Register each node's public key (once per SuperLink start, unless --database), here:
  fl-app deploy register --superlink {control} --ca {found.ca_cert} node-0.pub ...

Start a SuperNode on a device (it needs ca.crt and its own private key):
  fl-app deploy supernode --superlink {address} --ca ca.crt --key node-0 --data-dir /data/node-0
  or: flower-supernode --superlink {address} --root-certificates ca.crt \\
        --auth-supernode-private-key node-0 --node-config 'data-dir="/data/node-0"' --port 9094

Submit runs (from the app folder, on this machine or through `ssh -L {port}:{upstream} ...`),
with a connection in $FLWR_HOME/config.toml:
  [superlink]
  default = "fl-app"
  [superlink.fl-app]
  address = "{control}"
  insecure = false
  root-certificates = "{found.ca_cert}"
then: flwr run . fl-app --stream
  or: fl-app-experiment federation=deployment-tls federation.address={control} \\
        federation.root_certificates={found.ca_cert}"""


@deploy.command("fleet-gateway")
def fleet_gateway(
    certs: Annotated[Path, typer.Option(help="folder with ca.crt, server.pem, server.key")],
    superlink: Annotated[
        str, typer.Option(metavar="HOST:PORT", help="the SuperLink, on this machine")
    ] = f"127.0.0.1:{DEFAULT_SUPERLINK_PORT}",
    host: Annotated[
        str, typer.Option(help="where devices reach it (0.0.0.0 for every interface)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="its port")] = DEFAULT_FLEET_PORT,
    parent_pid: Annotated[
        int | None, typer.Option(hidden=True, help="exit once this process has ended")
    ] = None,
) -> int:
    """Serve a SuperLink's Fleet API alone to the devices' network, in the foreground.

    Forwards POST /v1/fleet/<call> (and GET /health) over TLS to --superlink,
    presenting CERTS/server.pem; every other request (the Control API: `flwr run`,
    `flwr supernode register`; the Runtime API) gets a 404 and one log line.
    `fl-app deploy superlink` starts it; run it alone for a SuperLink started
    otherwise. Stop it with Ctrl-C.
    """
    found = check_superlink_inputs(Certificates.in_dir(certs))
    check_address(superlink)
    from fl_app.deploy.gateway import serve  # deferred: uvicorn and httpx

    serve(superlink, found.ca_cert, found.server_cert, found.server_key, host, port, parent_pid)
    return 0


@deploy.command("supernode")
def supernode(
    superlink: Annotated[str, typer.Option(metavar="HOST:PORT", help="the SuperLink's address")],
    ca: Annotated[Path, typer.Option(help="the CA certificate (ca.crt) of the SuperLink")],
    key: Annotated[Path, typer.Option(help="this node's private key")],
    data_dir: Annotated[Path, typer.Option(help="this node's data folder")],
    port: Annotated[
        int, typer.Option(min=1, max=65535, help="this node's own Runtime API port")
    ] = DEFAULT_SUPERNODE_PORT,
    host: Annotated[str, typer.Option(help="address of that API")] = "127.0.0.1",
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="where cached activations and the base model are kept"),
    ] = None,
    warm_worker: Annotated[
        bool,
        typer.Option(help="keep TensorFlow and the models loaded between messages"),
    ] = True,
) -> int:
    """Run a SuperNode with TLS and node authentication, in the foreground.

    The node connects to the SuperLink at --superlink over TLS (verified with
    --ca), authenticates with its private key (its public key must be registered:
    `fl-app deploy register`) and trains on its own data folder (partition.npz,
    or one subfolder of images per class). --port is the node's own Runtime API
    port, which its ClientApps connect to: every SuperNode on one machine needs
    its own. The cache folder defaults to ~/.cache/fl_app. With --no-warm-worker
    every message imports TensorFlow and builds the model in its own process
    instead of handing it to the node's warm worker (which holds the memory of a
    training process between rounds). Stop it with Ctrl-C.
    """
    check_address(superlink)
    check_supernode_inputs(ca, key, data_dir)
    cmd = supernode_command(superlink, ca, key, data_dir, port, host, cache_dir, warm_worker)
    print(f"$ {shlex.join(cmd)}", flush=True)
    os.execve(cmd[0], cmd, supernode_env())
    return 0  # not reached
