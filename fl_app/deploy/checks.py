"""Inputs and addresses of a deployment, checked before anything starts.

A bad file, folder, address or host is one `DeploymentError` line naming it and
what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path

from fl_app.deploy import DeploymentError
from fl_app.deploy.pki import Certificates, certificate_hosts
from fl_app.launch.flower_cli import split_host_port

# The SuperLink's own port serves the Control API, which authenticates nobody in
# open-source Flower 1.42: it listens on one of these unless explicitly exposed.
LOOPBACK = ("127.0.0.1", "::1", "localhost")
BIND_ALL = ("0.0.0.0", "::", "[::]")


def require_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` made absolute if it is a file, else a `DeploymentError` line.

    The line reads "<path> is not a file: expected <what>".
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DeploymentError(f"{p} is not a file: expected {what}")
    return p.resolve()


def require_dir(path: str | os.PathLike, what: str) -> Path:
    """``path`` made absolute if it is a folder, else a `DeploymentError` line.

    The line reads "<path> is not a folder: expected <what>".
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DeploymentError(f"{p} is not a folder: expected {what}")
    return p.resolve()


def check_superlink_inputs(certs: Certificates) -> Certificates:
    """Check the three files the SuperLink reads; raise `DeploymentError` if one is missing."""
    require_file(certs.ca_cert, "the CA certificate (`fl-app deploy certificates` writes it)")
    require_file(certs.server_cert, "the SuperLink's TLS certificate, signed by the CA")
    require_file(certs.server_key, "the SuperLink's TLS private key")
    return certs


def check_supernode_inputs(
    ca_cert: str | os.PathLike, private_key: str | os.PathLike, data_dir: str | os.PathLike
) -> None:
    """Check a SuperNode's CA certificate, private key and data folder exist.

    Raises
    ------
    DeploymentError
        Naming the first missing one and what it is.
    """
    require_file(ca_cert, "the CA certificate that signed the SuperLink's certificate")
    require_file(private_key, "the node's private key (`fl-app deploy node-keys` writes it)")
    require_dir(data_dir, "the node's data folder (partition.npz or one image folder per class)")


def check_address(address: str, what: str = "--superlink") -> tuple[str, int]:
    """Split ``HOST:PORT``; raise one clear line if it is not that.

    Parameters
    ----------
    address : str
        ``HOST:PORT`` (``[v6]:PORT`` for IPv6).
    what : str
        The option's name, for the message.

    Returns
    -------
    tuple of (str, int)
        Host and port.
    """
    parts = split_host_port(address)
    if parts is None:
        raise DeploymentError(f"{what} {address!r} is not allowed: expected HOST:PORT")
    return parts


def check_control_host(host: str, expose_control_api: bool = False) -> None:
    """Check that the SuperLink's one port (Control API included) stays on loopback.

    Anyone who reaches that port with ``ca.crt`` can register node keys and
    submit runs (Flower 1.42's open-source Control API has no account
    authentication), so another address needs ``expose_control_api``.

    Raises
    ------
    DeploymentError
        If ``host`` is not loopback and the exposure was not asked for.
    """
    if host.strip("[]").lower() not in LOOPBACK and not expose_control_api:
        raise DeploymentError(
            f"--host {host} is not allowed: expected a loopback address"
            f" ({', '.join(LOOPBACK)}), since that port serves the Control API to anyone"
            " holding ca.crt; devices reach the Fleet API through --fleet-host, or pass"
            " --expose-control-api"
        )


def local_address(host: str) -> str:
    """Where processes on the SuperLink's machine reach a SuperLink listening on ``host``.

    Loopback for an every-interface ``host`` (``0.0.0.0``: 127.0.0.1; ``::``: ::1),
    else ``host`` itself.
    """
    return "127.0.0.1" if host in BIND_ALL[:1] else "::1" if host in BIND_ALL[1:] else host


def check_superlink_host(certs: Certificates, host: str) -> None:
    """Check that the SuperLink's own SuperExec will trust its certificate.

    The SuperExec that starts ServerApps connects to ``host:port`` (loopback
    for ``0.0.0.0``) with TLS, so that address must be in the certificate.

    Raises
    ------
    DeploymentError
        If it is not.
    """
    local = local_address(host)
    names = [n.lower() for n in certificate_hosts(certs.server_cert)]
    if local.lower() not in names:
        raise DeploymentError(
            f"{certs.server_cert} does not name {local} (it names {', '.join(names) or 'nothing'}):"
            f" the SuperLink's own SuperExec connects to {local} over TLS; remake the"
            f" certificates with --host {local}"
        )


def advertised_host(certs: Certificates, host: str) -> str:
    """The host name clients should use for a SuperLink listening on ``host``.

    ``host`` itself, unless it listens on every interface: then the first
    non-loopback name in its certificate (else ``127.0.0.1``).
    """
    if host not in BIND_ALL:
        return f"[{host}]" if ":" in host else host
    loopback = {"127.0.0.1", "localhost", "::1"}
    for name in certificate_hosts(certs.server_cert):
        if name.lower() not in loopback:
            return f"[{name}]" if ":" in name else name
    return "127.0.0.1"
