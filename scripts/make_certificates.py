#!/usr/bin/env python3
"""Make a CA and a SuperLink TLS certificate signed by it (no openssl needed).

Writes DIR/ca.crt and DIR/ca.key (the CA), DIR/server.pem and DIR/server.key (the
SuperLink's certificate and key; keys 0600). The server certificate names every
--host (and always 127.0.0.1 and localhost): SuperNodes and `flwr` must reach the
SuperLink by one of these names. Existing files are never overwritten.

Give ca.crt to every SuperNode and every `flwr` user; keep ca.key offline.

Example:
  scripts/make_certificates.py --out certificates --host superlink.example.org --host 10.0.0.5
"""

import sys
from pathlib import Path

# Runnable from a checkout without installing fl_app.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_app.deployment import (
    DEFAULT_HOSTS,
    DeploymentError,
    ScriptParser,
    certificate_hosts,
    fail,
    make_certificates,
)


def main(argv=None) -> int:
    parser = ScriptParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="folder for the four files")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="a host name or IP address of the SuperLink (repeatable; "
        f"{' and '.join(DEFAULT_HOSTS)} are always included)",
    )
    parser.add_argument("--days", type=int, default=825, help="validity (default: 825)")
    args = parser.parse_args(argv)
    if args.days < 1:
        parser.error(f"--days {args.days} is not allowed: expected >= 1")
    try:
        certs = make_certificates(args.out, args.host or DEFAULT_HOSTS, args.days)
    except (DeploymentError, OSError) as err:
        return fail(err)
    print(f"CA certificate:        {certs.ca_cert}  (give to SuperNodes and flwr users)")
    print(f"CA key:                {certs.ca_key}  (keep private)")
    print(f"SuperLink certificate: {certs.server_cert}")
    print(f"SuperLink key:         {certs.server_key}")
    print(f"The SuperLink may be reached as: {', '.join(certificate_hosts(certs.server_cert))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
