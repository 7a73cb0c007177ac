#!/usr/bin/env python3
"""Make SuperNode key pairs for node authentication (like `ssh-keygen -t ecdsa -b 384`).

For each NAME writes DIR/NAME (OpenSSH ECDSA P-384 private key, 0600, for
`flower-supernode --auth-supernode-private-key`) and DIR/NAME.pub (the public
key, for `flwr supernode register` / scripts/register_nodes.py). Existing files
are never overwritten.

Example:
  scripts/make_node_keys.py --out keys node-0 node-1 node-2
"""

import sys
from pathlib import Path

# Runnable from a checkout without installing fl_app.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_app.deployment import DeploymentError, ScriptParser, fail, make_node_keys


def main(argv=None) -> int:
    parser = ScriptParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="folder for the keys")
    parser.add_argument("names", nargs="+", metavar="NAME", help="key (node) names")
    args = parser.parse_args(argv)
    try:
        keys = make_node_keys(args.out, args.names)
    except (DeploymentError, OSError) as err:
        return fail(err)
    for key in keys:
        print(f"{key.name}: private {key.private}, public {key.public}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
