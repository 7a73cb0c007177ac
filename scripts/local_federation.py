#!/usr/bin/env python3
"""A real TLS + authenticated federation on this machine, in the background.

`up` makes (or reuses) certificates and node keys in DIR, prepares one data
folder per node (Fashion-MNIST partitions, unless --data-root already holds
node-<i>/partition.npz), starts a SuperLink on a free loopback port, registers
the node keys, starts N SuperNodes, waits until they are online, and writes
DIR/federation.json (PIDs, ports, FLWR_HOME, connection). `down` stops exactly
those processes (and what they started), by PID.

Examples:
  scripts/local_federation.py up --dir /tmp/fed --nodes 3
  FLWR_HOME=/tmp/fed/flwr_home flwr run . fl-app --stream
  scripts/local_federation.py down --dir /tmp/fed
"""

import sys
from pathlib import Path

# Runnable from a checkout without installing fl_app.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_app.deployment import LocalFederation, ScriptParser, fail

HERE = Path(__file__).resolve().parent


def up(args) -> int:
    fed = LocalFederation(
        args.dir,
        args.nodes,
        data_root=args.data_root,
        dataset=args.dataset,
        max_examples=args.max_examples,
        timeout=args.timeout,
    )
    try:
        fed.up()
    except (RuntimeError, OSError, ValueError) as err:  # DeploymentError included
        return fail(err)
    except KeyboardInterrupt:
        return fail("interrupted; everything started was stopped")
    assert fed.superlink is not None
    print(
        f"SuperLink  pid {fed.superlink.pid}  {fed.address}  (TLS, node auth; Fleet, Control"
        f" and Runtime APIs on this one port)  log {fed.logs / 'superlink.log'}"
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
        f"  python -m fl_app.launch.experiment federation=deployment-tls "
        f"federation.address={fed.address} federation.root_certificates={fed.certs.ca_cert}"
    )
    print("Stop everything:")
    print(f"  {HERE / 'local_federation.py'} down --dir {fed.directory}")
    return 0


def down(args) -> int:
    fed = LocalFederation(args.dir)
    if not fed.state_file.is_file():
        return fail(f"{fed.state_file} is not a file: expected the state of a federation `up`")
    fed.down()
    print(f"Stopped the federation in {fed.directory}")
    return 0


def main(argv=None) -> int:
    parser = ScriptParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{up,down}")
    p_up = commands.add_parser("up", help="start the federation in the background")
    p_up.add_argument("--dir", required=True, type=Path, help="the federation's folder")
    p_up.add_argument("--nodes", type=int, default=2, help="SuperNodes (default: 2)")
    p_up.add_argument(
        "--data-root", type=Path, help="folder of node-<i>/ data folders (default: DIR/data)"
    )
    p_up.add_argument(
        "--dataset", default="fashion_mnist", help="dataset to partition (default: fashion_mnist)"
    )
    p_up.add_argument(
        "--max-examples", type=int, default=0, help="cap per node when preparing (0 = all)"
    )
    p_up.add_argument(
        "--timeout", type=float, default=120, help="seconds to wait for each start (default 120)"
    )
    p_down = commands.add_parser("down", help="stop everything `up` started, by PID")
    p_down.add_argument("--dir", required=True, type=Path, help="the federation's folder")
    args = parser.parse_args(argv)
    if args.command == "up":
        if args.nodes < 1:
            parser.error(f"--nodes {args.nodes} is not allowed: expected >= 1")
        return up(args)
    return down(args)


if __name__ == "__main__":
    sys.exit(main())
