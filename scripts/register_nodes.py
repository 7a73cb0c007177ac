#!/usr/bin/env python3
"""Register SuperNodes' public keys with a running SuperLink (node authentication on).

Runs `flwr supernode register KEY.pub` for each key over TLS, through a temporary
FLWR_HOME whose connection points at --superlink with --ca as root certificate.
Prints each key's node id. Only registered keys can connect; a key can be
registered once per SuperLink (its state is in memory unless it runs with
--database).

Example:
  scripts/register_nodes.py --superlink 10.0.0.5:8000 --ca certificates/ca.crt keys/*.pub
"""

import sys
from pathlib import Path

# Runnable from a checkout without installing fl_app.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_app.deployment import DeploymentError, ScriptParser, fail, register_keys


def main(argv=None) -> int:
    parser = ScriptParser(description=__doc__)
    parser.add_argument(
        "--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address"
    )
    parser.add_argument(
        "--ca", required=True, type=Path, help="the CA certificate (ca.crt) of the SuperLink"
    )
    parser.add_argument("keys", nargs="+", type=Path, metavar="KEY.pub", help="public key files")
    args = parser.parse_args(argv)
    try:
        node_ids = register_keys(args.superlink, args.ca, args.keys)
    except (DeploymentError, OSError) as err:
        return fail(err)
    for key, node_id in zip(args.keys, node_ids, strict=True):
        print(f"{key}: registered as SuperNode {node_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
