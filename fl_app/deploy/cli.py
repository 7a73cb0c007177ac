"""``fl-app deploy ...`` (certificates, keys, SuperLink, SuperNodes) and ``fl-app local ...``.

Every command checks its inputs before anything starts; a bad one is one
``error:`` line and exit code 2 (see `fl_app.cli.main`).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import psutil
import typer

from fl_app.deploy import DeploymentError
from fl_app.deploy.commands import (
    BIND_ALL,
    DEFAULT_FLEET_PORT,
    DEFAULT_SUPERLINK_PORT,
    DEFAULT_SUPERNODE_PORT,
    LOOPBACK,
    advertised_host,
    check_address,
    check_control_host,
    check_superlink_host,
    check_superlink_inputs,
    check_supernode_inputs,
    fleet_gateway_command,
    local_address,
    register_keys,
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
from fl_app.launch import processes

# `flwr run .` starts its own detached SuperLink here (Flower's LOCAL_SUPERLINK_HTTP_API_PORT).
FLWR_LOCAL_SUPERLINK_PORT = 39091

deploy = typer.Typer(
    help="A real deployment: certificates, node keys, SuperLink and SuperNodes (TLS + auth).",
    add_completion=False,
)
local = typer.Typer(
    help="A federation on this machine: `up` in the background, `restart` a node or the"
    " SuperLink, `down` by PID.",
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
    found = check_superlink_inputs(Certificates.in_dir(certs))
    check_control_host(host, expose_control_api)
    check_superlink_host(found, host)
    if fleet_port == port and fleet_host in (host, *BIND_ALL):
        raise DeploymentError(
            f"--fleet-port {fleet_port} is not allowed: expected another port than --port {port}"
        )
    cmd = superlink_command(found, port, host, database)
    control = f"{advertised_host(found, host)}:{port}"
    # The gateway reaches the SuperLink where its own SuperExec does (in its certificate).
    local = local_address(host)
    upstream = f"[{local}]:{port}" if ":" in local else f"{local}:{port}"
    address = f"{advertised_host(found, fleet_host)}:{fleet_port}"
    names = ", ".join(certificate_hosts(found.server_cert))
    # Our child, in our process group: Ctrl-C reaches it too, and it exits once the
    # SuperLink that replaces this process (same PID) has ended.
    gateway_cmd = fleet_gateway_command(found, upstream, fleet_port, fleet_host, os.getpid())
    gateway = processes.start(gateway_cmd, log=gateway_log, own_session=False)
    try:
        processes.wait_until(
            lambda: processes.listening_on(fleet_port) is not None,
            30,
            [gateway],
            f"the Fleet gateway to listen on {fleet_host}:{fleet_port}",
        )
    except (processes.ProcessExitedError, processes.WaitTimeoutError) as err:
        processes.stop([gateway])
        raise DeploymentError(f"{err} (see {gateway_log.resolve()})") from None
    exposed = (
        f"ALSO on {host}: --expose-control-api"
        if expose_control_api and host.strip("[]") not in LOOPBACK
        else "this machine only"
    )
    print(
        f"""SuperLink (TLS + SuperNode authentication) on {host}:{port} ({exposed}):
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
        federation.root_certificates={found.ca_cert}

$ {shlex.join(cmd)}""",
        flush=True,
    )
    os.execve(cmd[0], cmd, processes.process_env())
    return 0  # not reached


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


@local.command("up")
def up(
    directory: Annotated[Path, typer.Option("--dir", help="the federation's folder")],
    nodes: Annotated[int, typer.Option(min=1, help="SuperNodes")] = 2,
    data_root: Annotated[
        Path | None, typer.Option(help="folder of node-<i>/ data folders (default: DIR/data)")
    ] = None,
    dataset: Annotated[str, typer.Option(help="dataset to partition")] = "fashion_mnist",
    max_examples: Annotated[
        int, typer.Option(min=0, help="cap per node when preparing (0 = all)")
    ] = 0,
    timeout: Annotated[float, typer.Option(min=1, help="seconds to wait for each start")] = 120,
) -> int:
    """Start a TLS + authenticated federation on this machine, in the background.

    Makes (or reuses) certificates and node keys in DIR, prepares one data folder
    per node (unless --data-root already holds node-<i>/partition.npz), starts a
    SuperLink on a free loopback port and a Fleet gateway on another (the
    SuperNodes' address: it serves the Fleet API alone), registers the node
    keys, starts the SuperNodes, waits until they are online, and writes
    DIR/federation.json (processes, ports, FLWR_HOME, connection). The SuperLink keeps its state in
    DIR/superlink.db (fresh at every `up`), so `fl-app local restart --dir DIR
    superlink` keeps the registered keys. `fl-app local down --dir DIR` stops
    exactly those processes and what they started.
    """
    from fl_app.deploy.local_federation import LocalFederation

    fed = LocalFederation(
        directory,
        nodes,
        data_root=data_root,
        dataset=dataset,
        max_examples=max_examples,
        timeout=timeout,
    )
    try:
        fed.up()
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped", file=sys.stderr)
        return 130
    assert fed.superlink is not None and fed.gateway is not None
    print(
        f"SuperLink  pid {fed.superlink.pid}  {fed.address}  (TLS, node auth; Fleet, Control"
        f" and Runtime APIs: the operator's port)  log {fed.logs / 'superlink.log'}"
    )
    print(
        f"Gateway    pid {fed.gateway.pid}  {fed.fleet_address}  (the Fleet API alone: the"
        f" SuperNodes' port)  log {fed.logs / 'fleet-gateway.log'}"
    )
    for node in fed.nodes:
        assert node.proc is not None
        print(
            f"SuperNode  pid {node.proc.pid}  {node.name}  node id {node.node_id}  "
            f"port {node.port}  data {node.data_dir}  log {node.log}"
        )
    print(f"State: {fed.state_file}")
    print("\nSubmit runs (from the app folder):")
    print(f"  FLWR_HOME={fed.flwr_home} flwr run . fl-app --stream")
    print(
        f"  fl-app-experiment federation=deployment-tls federation.address={fed.address}"
        f" federation.root_certificates={fed.certs.ca_cert}"
    )
    print("Restart a node or the SuperLink (same keys, ports and database):")
    print(f"  fl-app local restart --dir {fed.directory} node-0   # or: superlink")
    print("Stop everything:")
    print(f"  fl-app local down --dir {fed.directory}")
    return 0


@local.command("down")
def down(
    directory: Annotated[Path, typer.Option("--dir", help="the federation's folder")],
) -> int:
    """Stop everything `up` started in DIR (recorded by PID and start time).

    Stops unfinished runs, then the SuperNodes, the SuperLink and the rest of
    their process groups (ClientApps and ServerApps whose parent has gone
    included), then checks that none of the processes it recorded still runs:
    any left is an error naming its PID.
    """
    from fl_app.deploy.local_federation import LocalFederation

    fed = LocalFederation.attach(directory)
    fed.down()
    print(f"Stopped the federation in {fed.directory}: no process it started is left")
    return 0


@local.command("restart")
def restart(
    directory: Annotated[Path, typer.Option("--dir", help="the federation's folder")],
    target: Annotated[
        str, typer.Argument(metavar="superlink|NODE", help="`superlink`, or a node's name")
    ],
    timeout: Annotated[float, typer.Option(min=1, help="seconds to wait for each start")] = 120,
) -> int:
    """Stop one process of the federation in DIR (if it runs) and start it again.

    A node (e.g. node-1) comes back with the same key, node id, data, cache and
    port, and its process group is stopped first (no ClientApp of the old one is
    left); a node that was killed is started once the SuperLink has marked it
    offline (up to 60 s: two missed heartbeats). The SuperLink comes back on the
    same port with the same database: registered keys are kept, SuperNodes that
    still run reconnect by themselves, and any that exited is started again.
    Runs in flight when the SuperLink stops end (Flower's ServerApp exits with
    it); continue one with `resume=<its run folder>`.
    """
    from fl_app.deploy.local_federation import LocalFederation

    fed = LocalFederation.attach(directory, timeout=timeout)
    if target == "superlink":
        outcome = fed.restart_superlink()
        assert fed.superlink is not None
        print(f"SuperLink  pid {fed.superlink.pid}  {fed.address}  database {fed.database}")
        for node in fed.nodes:
            if node.name in outcome and node.proc is not None:
                print(f"SuperNode  pid {node.proc.pid}  {node.name}  {outcome[node.name]}")
        return 0
    node = fed.restart_node(target)
    assert node.proc is not None
    print(f"SuperNode  pid {node.proc.pid}  {node.name}  node id {node.node_id}  online again")
    return 0


@local.command("stop-superlink")
def stop_superlink(
    port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="its port (default: $FLWR_LOCAL_SUPERLINK_HTTP_API_PORT or "
            f"{FLWR_LOCAL_SUPERLINK_PORT})",
        ),
    ] = None,
) -> int:
    """Stop the detached local SuperLink that `flwr run .` started.

    Only a flower-superlink listening on the port is stopped (SIGTERM, then
    SIGKILL after 10 s); no process there is fine.
    """
    if port is None:
        port = int(os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", FLWR_LOCAL_SUPERLINK_PORT))
    proc = processes.listening_on(port)
    if proc is None:
        print(f"no process listens on port {port}: nothing to stop", file=sys.stderr)
        return 0
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        cmdline = ""
    if "flower-superlink" not in cmdline:
        raise DeploymentError(
            f"port {port} belongs to PID {proc.pid}, which is not a flower-superlink:"
            " not stopping it"
        )
    if processes.stop_tree(proc, timeout=10):
        raise DeploymentError(f"SuperLink PID {proc.pid} did not stop within 10 s")
    print(f"stopped SuperLink PID {proc.pid}")
    return 0
