#!/usr/bin/env python3
"""Run a Flower SuperLink with TLS and SuperNode authentication, in the foreground.

Reads DIR/ca.crt, DIR/server.pem and DIR/server.key (scripts/make_certificates.py)
and runs `flower-superlink` with them, --enable-supernode-auth and
--disable-runtime-dependency-installation (ServerApps run in this Python). In
Flower 1.42 ONE port (--port, default 8000) serves all three APIs: Fleet
(SuperNodes connect), Control (`flwr run`, `flwr ls`, `flwr supernode register`)
and Runtime (its own ServerApps). Relative `results-dir` values of runs start
from the directory you start it in. Stop it with Ctrl-C.

Example (on the SuperLink host, reachable as superlink.example.org):
  scripts/start_superlink.py --certs certificates --host 0.0.0.0
"""

import os
import shlex
import sys
from pathlib import Path

# Runnable from a checkout without installing fl_app.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_app.deployment import (
    DEFAULT_SUPERLINK_PORT,
    Certificates,
    DeploymentError,
    ScriptParser,
    advertised_host,
    certificate_hosts,
    check_superlink_host,
    fail,
    process_env,
    superlink_command,
)

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    parser = ScriptParser(description=__doc__)
    parser.add_argument(
        "--certs", required=True, type=Path, help="folder with ca.crt, server.pem, server.key"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_SUPERLINK_PORT,
        help=f"the one port of the Fleet, Control and Runtime APIs "
        f"(default: {DEFAULT_SUPERLINK_PORT})",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)",
    )
    parser.add_argument(
        "--database",
        type=Path,
        help="SQLite file keeping registered nodes and runs across restarts (default: memory)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port} is not allowed: expected 1..65535")
    try:
        certs = Certificates.in_dir(args.certs).check_superlink()
        check_superlink_host(certs, args.host)
    except (DeploymentError, OSError) as err:
        return fail(err)
    cmd = superlink_command(certs, args.port, args.host, args.database)
    address = f"{advertised_host(certs, args.host)}:{args.port}"
    names = ", ".join(certificate_hosts(certs.server_cert))
    print(
        f"""SuperLink (TLS + SuperNode authentication) listening on {args.host}:{args.port}:
Fleet, Control and Runtime APIs all on port {args.port}. Clients must use a name in its
certificate: {names}.

Register each node's public key (once per SuperLink start, unless --database):
  {HERE}/register_nodes.py --superlink {address} --ca {certs.ca_cert} node-0.pub ...

Start a SuperNode on a device (it needs ca.crt and its own private key):
  {HERE}/start_supernode.py --superlink {address} --ca ca.crt --key node-0 --data-dir /data/node-0
  or: flower-supernode --superlink {address} --root-certificates ca.crt \\
        --auth-supernode-private-key node-0 --node-config 'data-dir="/data/node-0"' --port 9094

Submit runs (from the app folder), with a connection in $FLWR_HOME/config.toml:
  [superlink]
  default = "fl-app"
  [superlink.fl-app]
  address = "{address}"
  insecure = false
  root-certificates = "{certs.ca_cert}"
then: flwr run . fl-app --stream
  or: python -m fl_app.launch.experiment federation=deployment-tls federation.address={address} \\
        federation.root_certificates={certs.ca_cert}

$ {shlex.join(cmd)}""",
        flush=True,
    )
    os.execve(cmd[0], cmd, process_env())
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
