#!/usr/bin/env python3
"""Run a Flower SuperNode with TLS and node authentication, in the foreground.

The node connects to the SuperLink at --superlink over TLS (verified with --ca),
authenticates with its private key (its public key must be registered:
scripts/register_nodes.py) and trains on its own data folder, passed to the
ClientApp as --node-config 'data-dir="/abs/DIR"' (partition.npz, or one
subfolder of images per class). --port is the node's own Runtime API port, which
its ClientApps connect to: every SuperNode on one machine needs its own.
Stop it with Ctrl-C.

Example (on a device):
  scripts/start_supernode.py --superlink superlink.example.org:8000 --ca ca.crt \\
      --key node-0 --data-dir /data/node-0
"""

import os
import shlex
import sys
from pathlib import Path

# Runnable from a checkout without installing fl_app.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_app.deployment import (
    DEFAULT_SUPERNODE_PORT,
    DeploymentError,
    ScriptParser,
    check_address,
    check_supernode_inputs,
    fail,
    process_env,
    supernode_command,
)


def main(argv=None) -> int:
    parser = ScriptParser(description=__doc__)
    parser.add_argument(
        "--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address"
    )
    parser.add_argument(
        "--ca", required=True, type=Path, help="the CA certificate (ca.crt) of the SuperLink"
    )
    parser.add_argument("--key", required=True, type=Path, help="this node's private key")
    parser.add_argument("--data-dir", required=True, type=Path, help="this node's data folder")
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_SUPERNODE_PORT,
        help=f"this node's own Runtime API port (default: {DEFAULT_SUPERNODE_PORT})",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address of that API (default: 127.0.0.1)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="where cached activations and the base model are kept (default: ~/.cache/fl_app)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port} is not allowed: expected 1..65535")
    try:
        check_address(args.superlink)
        check_supernode_inputs(args.ca, args.key, args.data_dir)
        cmd = supernode_command(
            args.superlink, args.ca, args.key, args.data_dir, args.port, args.host, args.cache_dir
        )
    except (DeploymentError, OSError) as err:
        return fail(err)
    print(f"$ {shlex.join(cmd)}", flush=True)
    os.execve(cmd[0], cmd, process_env())
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
