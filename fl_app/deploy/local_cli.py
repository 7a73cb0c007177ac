"""``fl-app local ...``: a TLS + authenticated federation on this machine, up, restarted, down.

Every command checks its inputs before anything starts; a bad one is one
``error:`` line and exit code 2 (see `fl_app.cli.main`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import psutil
import typer

from fl_app.deploy import DeploymentError
from fl_app.launch import processes

# `flwr run .` starts its own detached SuperLink here (Flower's LOCAL_SUPERLINK_HTTP_API_PORT).
FLWR_LOCAL_SUPERLINK_PORT = 39091

local = typer.Typer(
    help="A federation on this machine: `up` in the background, `restart` a node or the"
    " SuperLink, `down` by PID.",
    add_completion=False,
)


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
    print(f"  FLWR_HOME={fed.state.flwr_home} flwr run . fl-app --stream")
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
        print(f"SuperLink  pid {fed.superlink.pid}  {fed.address}  database {fed.state.database}")
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
