"""Real deployments: TLS certificates, node keys, SuperLink and SuperNode processes.

A deployed federation is one ``flower-superlink`` with TLS and SuperNode
authentication, serving its Fleet (SuperNodes), Control (``flwr`` CLI) and
Runtime (its own ServerApps) APIs on ONE port, and any number of
``flower-supernode`` processes, each with its own key pair and data folder
(``--node-config 'data-dir="..."'``). This module makes the certificates and
keys, registers public keys, builds and starts the command lines (every input
file is checked first, with one clear error line naming it), and runs a whole
federation on loopback for demos and tests (`LocalFederation`).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fl_app.launch.local_superlink import (
    BIN,
    CONNECTION,
    FLOWER_SUPERLINK,
    FLWR,
    FlowerCLI,
    descendants,
    free_port,
    stop_pids,
    stop_process,
    write_connection,
)

FLOWER_SUPERNODE = str(BIN / "flower-supernode")
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
# Always in the SuperLink certificate: the SuperLink's own SuperExec (which starts
# ServerApps) connects to it on 127.0.0.1 when it listens on 0.0.0.0 or 127.0.0.1.
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
# Flower 1.42's default SuperLink port: Fleet, Control and Runtime APIs all on it.
DEFAULT_SUPERLINK_PORT = 8000
# Flower's default port of a SuperNode's own (ClientApp-facing) Runtime API.
DEFAULT_SUPERNODE_PORT = 9094
STATE_FILE = "federation.json"
BIND_ALL = ("0.0.0.0", "::", "[::]")


class DeploymentError(RuntimeError):
    """A bad input or a failed step of a deployment, as one line for the user."""


class ScriptParser(argparse.ArgumentParser):
    """An argument parser for the deployment scripts: bad input is ONE ``error:`` line, exit 2."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> Any:  # noqa: D102 - argparse's hook
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def fail(message: object) -> int:
    """Print ``error: <message>`` on one line to stderr; return the exit code 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


@dataclass(frozen=True)
class Certificates:
    """The files of a CA and of the SuperLink certificate it signed.

    Attributes
    ----------
    ca_cert, ca_key : Path
        The self-signed CA: its certificate goes to every SuperNode and every
        ``flwr`` user (``root-certificates``); its key stays with the operator.
    server_cert, server_key : Path
        The SuperLink's certificate (signed by the CA) and private key.
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: str | os.PathLike) -> Certificates:
        """The standard file names in ``directory`` (as `make_certificates` writes them)."""
        d = Path(directory).expanduser().resolve()
        return cls(d / CA_CERT, d / CA_KEY, d / SERVER_CERT, d / SERVER_KEY)

    def files(self) -> list[Path]:
        """All four paths."""
        return [self.ca_cert, self.ca_key, self.server_cert, self.server_key]

    def check_superlink(self) -> Certificates:
        """Check the three files the SuperLink reads; raise `DeploymentError` if one is missing."""
        require_file(self.ca_cert, "the CA certificate (make_certificates.py writes it)")
        require_file(self.server_cert, "the SuperLink's TLS certificate, signed by the CA")
        require_file(self.server_key, "the SuperLink's TLS private key")
        return self


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's key pair: OpenSSH ECDSA P-384 files ``<name>`` and ``<name>.pub``."""

    private: Path
    public: Path

    @property
    def name(self) -> str:
        """The private key's file name, used as the node's name."""
        return self.private.name

    @classmethod
    def in_dir(cls, directory: str | os.PathLike, name: str) -> NodeKey:
        """The key pair called ``name`` in ``directory``."""
        d = Path(directory).expanduser().resolve()
        return cls(d / name, d / f"{name}.pub")


def require_file(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` resolved if it is a file, else raise one clear line.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    what : str
        What the file is, for the message (e.g. "the CA certificate").

    Returns
    -------
    Path
        The absolute path.

    Raises
    ------
    DeploymentError
        ``"<path> is not a file: expected <what>"``.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DeploymentError(f"{p} is not a file: expected {what}")
    return p.resolve()


def require_dir(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` resolved if it is a folder, else raise one clear line.

    Parameters
    ----------
    path : str or os.PathLike
        The folder.
    what : str
        What the folder is, for the message.

    Returns
    -------
    Path
        The absolute path.

    Raises
    ------
    DeploymentError
        ``"<path> is not a folder: expected <what>"``.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DeploymentError(f"{p} is not a folder: expected {what}")
    return p.resolve()


def _refuse_existing(paths: Iterable[Path]) -> None:
    for p in paths:
        if p.exists() or p.is_symlink():
            raise DeploymentError(f"{p} already exists: refusing to overwrite it")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never overwriting) with permissions ``mode``."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise DeploymentError(f"{path} already exists: refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # whatever the umask


def _san_entries(hosts: Iterable[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in (*hosts, *DEFAULT_HOSTS):
        host = host.strip().strip("[]")
        if not host or host.lower() in seen:
            continue
        seen.add(host.lower())
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def make_certificates(
    out_dir: str | os.PathLike,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 825,
) -> Certificates:
    """Make a self-signed CA and a SuperLink certificate signed by it.

    Writes ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key`` (ECDSA
    P-384, keys with permissions 0600) into ``out_dir``, creating it.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Where the four files go. None of them may exist yet.
    hosts : sequence of str
        Host names and IP addresses SuperNodes and ``flwr`` reach the SuperLink
        by: they go into the server certificate's subjectAltName. ``127.0.0.1``
        and ``localhost`` are always added (the SuperLink's own SuperExec
        connects on loopback).
    days : int
        Validity of both certificates.

    Returns
    -------
    Certificates
        The paths written.

    Raises
    ------
    DeploymentError
        If any of the files already exists (nothing is written then).
    """
    certs = Certificates.in_dir(out_dir)
    _refuse_existing(certs.files())
    names = _san_entries(hosts)
    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(minutes=5)
    not_after = now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fl_app federation CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    first = names[0].value
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(first))]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    certs.ca_cert.parent.mkdir(parents=True, exist_ok=True)
    _write_new(certs.ca_key, key_pem(ca_key), 0o600)
    _write_new(certs.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_new(certs.server_key, key_pem(server_key), 0o600)
    _write_new(certs.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return certs


def certificate_hosts(cert_file: str | os.PathLike) -> list[str]:
    """The host names and IP addresses in a certificate's subjectAltName.

    Parameters
    ----------
    cert_file : str or os.PathLike
        A PEM certificate (e.g. ``server.pem``).

    Returns
    -------
    list of str
        DNS names and IP addresses, in the certificate's order.
    """
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(name.value) for name in san if isinstance(name, x509.DNSName | x509.IPAddress)]


def make_node_keys(out_dir: str | os.PathLike, names: Sequence[str]) -> list[NodeKey]:
    """Make one SuperNode key pair per name, like ``ssh-keygen -t ecdsa -b 384``.

    ``<name>`` is the OpenSSH private key (unencrypted, 0600), which
    ``flower-supernode --auth-supernode-private-key`` reads; ``<name>.pub``
    the one-line OpenSSH public key, which ``flwr supernode register`` reads.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Where the keys go (created if needed).
    names : sequence of str
        File names of the private keys; plain names, no folders.

    Returns
    -------
    list of NodeKey
        The key pairs written, in the order of ``names``.

    Raises
    ------
    DeploymentError
        If a name is not a plain file name, or any file already exists
        (nothing is written then).
    """
    if not names:
        raise DeploymentError("no key names given: expected at least one NAME")
    keys = []
    for name in names:
        if not name or Path(name).name != name or name.endswith(".pub") or name.startswith("."):
            raise DeploymentError(f"{name!r} is not a plain key name (like node-0)")
        keys.append(NodeKey.in_dir(out_dir, name))
    if len({k.name for k in keys}) != len(keys):
        raise DeploymentError(f"key names repeat: {' '.join(names)}")
    _refuse_existing(p for k in keys for p in (k.private, k.public))
    Path(out_dir).expanduser().mkdir(parents=True, exist_ok=True)
    for key in keys:
        private = ec.generate_private_key(ec.SECP384R1())
        _write_new(
            key.private,
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
            0o600,
        )
        public = private.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write_new(key.public, public + f" {key.name}\n".encode(), 0o644)
    return keys


def node_config(data_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """The ``--node-config`` value: ``data-dir="/abs/path"`` [``cache-dir="/abs/path"``].

    ``cache-dir`` is where the node keeps cached activations and its base model
    between its ClientApp processes (default ``~/.cache/fl_app``).
    """
    entries = {"data-dir": data_dir, "cache-dir": cache_dir}
    return " ".join(
        f"{key}={_toml_string(str(Path(value).expanduser().resolve()))}"
        for key, value in entries.items()
        if value is not None
    )


def _toml_string(path: str) -> str:
    # Flower reads each value as TOML: a basic string, or a literal one if needed.
    if '"' not in path and "\\" not in path:
        return f'"{path}"'
    if "'" not in path:
        return f"'{path}'"
    raise DeploymentError(f"{path}: a folder's path cannot contain both ' and \"")


def superlink_command(
    certs: Certificates,
    port: int = DEFAULT_SUPERLINK_PORT,
    host: str = "127.0.0.1",
    database: str | os.PathLike | None = None,
) -> list[str]:
    """The ``flower-superlink`` command line with TLS and SuperNode authentication.

    The SuperLink serves the Fleet API (SuperNodes), the Control API
    (``flwr run``/``ls``/``supernode register``) and the Runtime API (its
    ServerApps) on ``host:port``, all over TLS. Runtime dependency installation
    is off: ServerApps run in this Python environment.

    Parameters
    ----------
    certs : Certificates
        The CA certificate and the SuperLink's certificate and key.
    port : int
        The one port of all three APIs.
    host : str
        The address to listen on (``0.0.0.0`` for every interface).
    database : str or os.PathLike, optional
        A SQLite file that keeps registered nodes and runs across restarts;
        default in memory.

    Returns
    -------
    list of str
        The argv.
    """
    cmd = [
        FLOWER_SUPERLINK,
        "--ssl-ca-certfile",
        str(certs.ca_cert),
        "--ssl-certfile",
        str(certs.server_cert),
        "--ssl-keyfile",
        str(certs.server_key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
    ]
    if database is not None:
        cmd += ["--database", str(Path(database).expanduser().resolve())]
    return cmd


def supernode_command(
    superlink: str,
    ca_cert: str | os.PathLike,
    private_key: str | os.PathLike,
    data_dir: str | os.PathLike,
    port: int = DEFAULT_SUPERNODE_PORT,
    host: str = "127.0.0.1",
    cache_dir: str | os.PathLike | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line of an authenticated node over TLS.

    Parameters
    ----------
    superlink : str
        The SuperLink's ``HOST:PORT``; HOST must be in its certificate.
    ca_cert : str or os.PathLike
        The CA certificate that signed the SuperLink's certificate.
    private_key : str or os.PathLike
        The node's OpenSSH ECDSA private key (its public key registered).
    data_dir : str or os.PathLike
        The node's data folder, passed as ``--node-config 'data-dir="..."'``.
    port : int
        The node's own Runtime API port (its ClientApps connect there); every
        SuperNode on one machine needs a different one.
    host : str
        The address of that Runtime API.
    cache_dir : str or os.PathLike, optional
        Where the node caches activations of the frozen part (see `node_config`).

    Returns
    -------
    list of str
        The argv.
    """
    return [
        FLOWER_SUPERNODE,
        "--superlink",
        superlink,
        "--root-certificates",
        str(Path(ca_cert).expanduser().resolve()),
        "--auth-supernode-private-key",
        str(Path(private_key).expanduser().resolve()),
        "--node-config",
        node_config(data_dir, cache_dir),
        "--host",
        host,
        "--port",
        str(port),
    ]


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
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in address:
        raise DeploymentError(f"{what} {address!r} is not allowed: expected HOST:PORT")
    return host.strip("[]"), int(port)


def check_superlink_host(certs: Certificates, host: str) -> None:
    """Check that the SuperLink's own SuperExec will trust its certificate.

    The SuperExec that starts ServerApps connects to ``host:port`` (loopback
    for ``0.0.0.0``) with TLS, so that address must be in the certificate.

    Raises
    ------
    DeploymentError
        If it is not.
    """
    local = "127.0.0.1" if host in BIND_ALL[:1] else "::1" if host in BIND_ALL[1:] else host
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


def process_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes: this interpreter's scripts first on PATH.

    SuperLinks and SuperNodes start ``flower-superexec``, ``flwr-serverapp``
    and ``flwr-clientapp`` by name; this makes them the ones next to this Python.
    """
    env = dict(env if env is not None else os.environ)
    path = env.get("PATH", "")
    if path.split(os.pathsep)[0] != str(BIN):
        env["PATH"] = os.pathsep.join([str(BIN), path]) if path else str(BIN)
    return env


def _popen(cmd: list[str], log: Path, cwd: Path | None, env: Mapping[str, str] | None):
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            env=process_env(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own session: a terminal's Ctrl-C (or the end of `up`) does not reach it.
            start_new_session=True,
        )


def start_superlink(
    certs: Certificates,
    port: int = DEFAULT_SUPERLINK_PORT,
    host: str = "127.0.0.1",
    log: str | os.PathLike = "superlink.log",
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    database: str | os.PathLike | None = None,
) -> subprocess.Popen:
    """Start a TLS + SuperNode-auth SuperLink in the background; return its process.

    Every input file is checked first. Relative ``results-dir`` values of runs
    start from ``cwd`` (the ServerApp's working directory).

    Parameters
    ----------
    certs : Certificates
        CA certificate, SuperLink certificate and key.
    port, host : int, str
        Where it listens (see `superlink_command`).
    log : str or os.PathLike
        Its stdout and stderr (appended).
    cwd : str or os.PathLike, optional
        Its working directory.
    env : Mapping, optional
        Its environment (default: this process's).
    database : str or os.PathLike, optional
        See `superlink_command`.

    Returns
    -------
    subprocess.Popen
        The process; stop it with `fl_app.launch.local_superlink.stop_process`.
    """
    certs.check_superlink()
    check_superlink_host(certs, host)
    cmd = superlink_command(certs, port, host, database)
    return _popen(cmd, Path(log), Path(cwd) if cwd else None, env)


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
    require_file(private_key, "the node's private key (make_node_keys.py writes it)")
    require_dir(data_dir, "the node's data folder (partition.npz or one image folder per class)")


def start_supernode(
    superlink: str,
    ca_cert: str | os.PathLike,
    private_key: str | os.PathLike,
    data_dir: str | os.PathLike,
    port: int = DEFAULT_SUPERNODE_PORT,
    host: str = "127.0.0.1",
    log: str | os.PathLike = "supernode.log",
    env: Mapping[str, str] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> subprocess.Popen:
    """Start an authenticated SuperNode in the background; return its process.

    Every input file is checked first (see `check_supernode_inputs`); an
    existing but empty data folder is allowed (the node's ClientApps then
    fail, and the server rejects their replies).

    Parameters
    ----------
    superlink, ca_cert, private_key, data_dir, port, host, cache_dir
        See `supernode_command`.
    log : str or os.PathLike
        Its stdout and stderr (appended).
    env : Mapping, optional
        Its environment (default: this process's).

    Returns
    -------
    subprocess.Popen
        The process; stop it with `fl_app.launch.local_superlink.stop_process`.
    """
    check_address(superlink)
    check_supernode_inputs(ca_cert, private_key, data_dir)
    cmd = supernode_command(superlink, ca_cert, private_key, data_dir, port, host, cache_dir)
    return _popen(cmd, Path(log), None, env)


def wait_superlink_ready(
    address: str, ca_cert: str | os.PathLike, proc: subprocess.Popen | None = None, timeout=60.0
) -> None:
    """Wait until the SuperLink answers ``GET /health`` over TLS.

    Parameters
    ----------
    address : str
        ``HOST:PORT`` it serves on.
    ca_cert : str or os.PathLike
        The CA certificate to verify it with.
    proc : subprocess.Popen, optional
        Its process: if it exits, stop waiting.
    timeout : float
        Seconds.

    Raises
    ------
    DeploymentError
        If it exited or did not answer in time.
    """
    context = ssl.create_default_context(cafile=str(ca_cert))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"https://{address}/health", timeout=2, context=context):
                return
        except OSError as err:
            if proc is not None and proc.poll() is not None:
                raise DeploymentError(
                    f"flower-superlink exited with code {proc.returncode} before it served"
                    f" {address} (see its log)"
                ) from None
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"the SuperLink at {address} did not answer in {timeout:.0f} s ({err})"
                ) from None
            time.sleep(0.3)


def connect(
    flwr_home: str | os.PathLike,
    address: str,
    ca_cert: str | os.PathLike,
    env: Mapping[str, str] | None = None,
) -> FlowerCLI:
    """Write a TLS ``fl-app`` connection into ``flwr_home`` and return its `FlowerCLI`.

    Parameters
    ----------
    flwr_home : str or os.PathLike
        The ``FLWR_HOME`` folder (created if needed).
    address : str
        The SuperLink's ``HOST:PORT`` (its one port).
    ca_cert : str or os.PathLike
        The CA certificate (``root-certificates`` of the connection).
    env : Mapping, optional
        Base environment of the ``flwr`` commands.

    Returns
    -------
    FlowerCLI
        For ``submit``/``follow``/``wait`` and `register_node`/`list_nodes`.
    """
    ca = require_file(ca_cert, "the CA certificate that signed the SuperLink's certificate")
    home = Path(flwr_home).expanduser().resolve()
    write_connection(home, address, insecure=False, root_certificates=str(ca))
    return FlowerCLI(home, process_env(env))


def _flwr_json(cli: FlowerCLI, *args: str, timeout: float = 60) -> dict[str, Any]:
    done = subprocess.run(
        [FLWR, *args, CONNECTION, "--format", "json"],
        env=cli.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    try:
        reply = json.loads(done.stdout[done.stdout.find("{") :])
    except json.JSONDecodeError:
        reply = {}
    if done.returncode != 0 or not reply.get("success"):
        message = reply.get("error-message") or (done.stdout + done.stderr).strip()
        raise DeploymentError(f"flwr {' '.join(args[:2])} failed: {' '.join(message.split())}")
    return reply


def register_node(cli: FlowerCLI, public_key: str | os.PathLike) -> int:
    """Register a SuperNode's public key with ``flwr supernode register``.

    Parameters
    ----------
    cli : FlowerCLI
        The ``fl-app`` connection to the SuperLink (see `connect`).
    public_key : str or os.PathLike
        An OpenSSH ECDSA public key file (``<name>.pub``).

    Returns
    -------
    int
        The node id the SuperLink gave it.

    Raises
    ------
    DeploymentError
        If the file is missing or the SuperLink refused it (e.g. already registered).
    """
    key = require_file(public_key, "a node's public key (<name>.pub from make_node_keys.py)")
    reply = _flwr_json(cli, "supernode", "register", str(key))
    return int(reply["node-id"])


def list_nodes(cli: FlowerCLI) -> dict[int, str]:
    """The SuperLink's nodes and their status (``registered``, ``online``, ``offline``, ...).

    Parameters
    ----------
    cli : FlowerCLI
        The ``fl-app`` connection to the SuperLink (see `connect`).

    Returns
    -------
    dict of int to str
        Node id to status.
    """
    reply = _flwr_json(cli, "supernode", "list")
    return {int(node["node-id"]): node["status"] for node in reply.get("nodes", [])}


def wait_nodes_online(
    cli: FlowerCLI,
    node_ids: Iterable[int],
    procs: Sequence[subprocess.Popen] = (),
    timeout: float = 120,
) -> None:
    """Wait until every node in ``node_ids`` is ``online`` on the SuperLink.

    Raises
    ------
    DeploymentError
        If one of ``procs`` exits first, or the time runs out.
    """
    wanted = set(node_ids)
    deadline = time.monotonic() + timeout
    while True:
        nodes = list_nodes(cli)
        missing = sorted(n for n in wanted if nodes.get(n) != "online")
        if not missing:
            return
        for proc in procs:
            if proc.poll() is not None:
                raise DeploymentError(
                    f"{' '.join(map(str, proc.args[:1]))} (pid {proc.pid}) exited with code"
                    f" {proc.returncode} before its node came online"
                )
        if time.monotonic() > deadline:
            raise DeploymentError(
                f"nodes {missing} not online after {timeout:.0f} s: "
                + ", ".join(f"{n} {nodes.get(n, 'unknown')}" for n in missing)
            )
        time.sleep(1)


# --- processes recorded by PID and start time, so a later `down` never hits a reused PID


def _start_time(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _record(pid: int) -> dict[str, int] | None:
    start = _start_time(pid)
    return None if start is None else {"pid": pid, "start": start}


def _same_process(record: Mapping[str, Any]) -> bool:
    return record.get("start") is not None and _start_time(int(record["pid"])) == record["start"]


@dataclass
class NodeProcess:
    """A SuperNode started by a `LocalFederation`."""

    name: str
    key: NodeKey
    data_dir: Path
    port: int
    log: Path
    proc: subprocess.Popen | None = None
    node_id: int | None = None
    registered: bool = True
    start: int | None = None

    def state(self) -> dict[str, Any]:
        """What the state file records about it."""
        return {
            "name": self.name,
            "pid": self.proc.pid if self.proc else None,
            "start": self.start,
            "node_id": self.node_id,
            "registered": self.registered,
            "port": self.port,
            "key": str(self.key.private),
            "data_dir": str(self.data_dir),
            "log": str(self.log),
        }


@dataclass
class LocalFederation:
    """A TLS + authenticated federation on loopback: one SuperLink, N SuperNodes.

    Use it as a context manager (`up` on entry, `down` on exit), or call `up`
    and later `down` (also from another process: ``LocalFederation(dir).down()``
    reads the state file). Everything lives in ``directory``: ``certs/``,
    ``keys/``, ``data/node-<i>/`` (unless ``data_dirs``/``data_root`` are
    given), ``flwr_home/`` (the ``fl-app`` connection), ``logs/``, the state
    file ``federation.json``, and the SuperLink's working directory (relative
    ``results-dir`` values land here). Certificates, keys and data already there
    are reused. Ports are free loopback ports picked at `up`.

    Parameters
    ----------
    directory : str or os.PathLike
        The federation's folder.
    num_nodes : int
        SuperNodes to start (keys ``node-0`` ... ``node-<N-1>``).
    data_dirs : sequence of path, optional
        One data folder per node; default: prepared with
        `fl_app.data.prepare_node_dirs` into ``data_root``.
    data_root : str or os.PathLike, optional
        Where prepared data folders go (default ``directory/data``); folders
        already holding ``partition.npz`` are reused.
    dataset, partitioner, seed, max_examples
        Passed to `fl_app.data.prepare_node_dirs`.
    env : Mapping, optional
        Base environment of every process.
    timeout : float
        Seconds to wait for the SuperLink, and for the nodes, to come up.

    Attributes
    ----------
    cli : FlowerCLI
        The ``fl-app`` connection, for ``submit``, ``follow``, ``wait``.
    address : str
        The SuperLink's ``127.0.0.1:PORT`` (Fleet, Control and Runtime APIs).
    nodes : list of NodeProcess
        The SuperNodes started, in order.
    """

    directory: Path | str
    num_nodes: int = 2
    data_dirs: Sequence[str | os.PathLike] | None = None
    data_root: str | os.PathLike | None = None
    dataset: str = "fashion_mnist"
    partitioner: str = "iid"
    seed: int = 0
    max_examples: int = 0
    env: Mapping[str, str] | None = None
    timeout: float = 120
    nodes: list[NodeProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).expanduser().resolve()
        self.certs = Certificates.in_dir(self.directory / "certs")
        self.keys_dir = self.directory / "keys"
        self.flwr_home = self.directory / "flwr_home"
        self.logs = self.directory / "logs"
        self.state_file = self.directory / STATE_FILE
        self.port = 0
        self.address = ""
        self.superlink: subprocess.Popen | None = None
        self._superlink_start: int | None = None
        self.cli = FlowerCLI(self.flwr_home, process_env(self.env))
        self._seen: dict[int, dict[str, int]] = {}
        self._lock = threading.Lock()
        self._watching = threading.Event()
        self._watcher: threading.Thread | None = None

    # -- context manager

    def __enter__(self) -> LocalFederation:
        return self.up()

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    # -- inputs

    def _certificates(self) -> Certificates:
        present = [p.exists() for p in self.certs.files()]
        if not any(present):
            return make_certificates(self.certs.ca_cert.parent)
        for p in self.certs.files():
            require_file(p, f"part of the certificates in {p.parent} (remove the folder to remake)")
        return self.certs

    def _key(self, name: str) -> NodeKey:
        key = NodeKey.in_dir(self.keys_dir, name)
        if not key.private.exists() and not key.public.exists():
            return make_node_keys(self.keys_dir, [name])[0]
        require_file(key.private, f"the private key of {name} (or remove {key.public})")
        require_file(key.public, f"the public key of {name} (or remove {key.private})")
        return key

    def _data_dirs(self) -> list[Path]:
        if self.data_dirs is not None:
            if len(self.data_dirs) != self.num_nodes:
                raise DeploymentError(
                    f"{len(self.data_dirs)} data folders given for {self.num_nodes} nodes"
                )
            return [Path(d).expanduser().resolve() for d in self.data_dirs]
        root = Path(self.data_root or self.directory / "data").expanduser().resolve()
        dirs = [root / f"node-{i}" for i in range(self.num_nodes)]
        if all((d / "partition.npz").is_file() for d in dirs):
            return dirs
        from fl_app.data import prepare_node_dirs  # deferred: loads the dataset

        return [
            Path(d).resolve()
            for d in prepare_node_dirs(
                root,
                self.num_nodes,
                dataset=self.dataset,
                partitioner=self.partitioner,
                seed=self.seed,
                max_examples=self.max_examples,
            )
        ]

    # -- state

    def _running_state(self) -> dict[str, Any] | None:
        if not self.state_file.is_file():
            return None
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        records = [state.get("superlink") or {}, *state.get("supernodes", [])]
        return state if any(r.get("pid") and _same_process(r) for r in records) else None

    def write_state(self) -> None:
        """Write the state file: PIDs, ports, FLWR_HOME, connection, logs."""
        self._snapshot()
        superlink = None
        if self.superlink is not None:
            superlink = {
                "pid": self.superlink.pid,
                "start": self._superlink_start,
                "port": self.port,
                "log": str(self.logs / "superlink.log"),
            }
        with self._lock:
            seen = list(self._seen.values())
        state = {
            "directory": str(self.directory),
            "address": self.address,
            "connection": CONNECTION,
            "flwr_home": str(self.flwr_home),
            "ca_cert": str(self.certs.ca_cert),
            "superlink": superlink,
            "supernodes": [n.state() for n in self.nodes],
            "descendants": seen,
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_file)

    def _own_pids(self) -> list[int]:
        pids = [n.proc.pid for n in self.nodes if n.proc is not None]
        return pids + ([self.superlink.pid] if self.superlink is not None else [])

    def _snapshot(self) -> None:
        """Remember every process below ours (ServerApps, SuperExecs, ClientApps)."""
        for pid in self._own_pids():
            for child in descendants(pid):
                record = _record(child)
                if record is not None:
                    with self._lock:
                        self._seen.setdefault(child, record)

    def _watch(self) -> None:
        while not self._watching.wait(2):
            try:
                self._snapshot()
            except Exception:  # best effort: `down` walks /proc again anyway
                pass

    # -- up

    def up(self) -> LocalFederation:
        """Start the SuperLink, register the keys, start the SuperNodes, wait until online.

        Returns
        -------
        LocalFederation
            Itself.

        Raises
        ------
        DeploymentError
            On a bad input or when a step fails; everything started is stopped.
        """
        if self.num_nodes < 0:
            raise DeploymentError(f"--nodes {self.num_nodes} is not allowed: expected >= 0")
        if self._running_state() is not None:
            raise DeploymentError(
                f"a federation is already up in {self.directory} (see {self.state_file});"
                " take it down first"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        certs = self._certificates()
        keys = [self._key(f"node-{i}") for i in range(self.num_nodes)]
        data_dirs = self._data_dirs()
        for d in data_dirs:
            require_dir(d, "a node's data folder")
        try:
            self.port = free_port()
            self.address = f"127.0.0.1:{self.port}"
            self.cli = connect(self.flwr_home, self.address, certs.ca_cert, self.env)
            self.superlink = start_superlink(
                certs,
                self.port,
                "127.0.0.1",
                log=self.logs / "superlink.log",
                cwd=self.directory,
                env={**process_env(self.env), "FLWR_HOME": str(self.flwr_home)},
            )
            self._superlink_start = _start_time(self.superlink.pid)
            self.write_state()
            self._watcher = threading.Thread(target=self._watch, daemon=True)
            self._watcher.start()
            wait_superlink_ready(self.address, certs.ca_cert, self.superlink, self.timeout)
            for key, data_dir in zip(keys, data_dirs, strict=True):
                self.add_node(key, data_dir, wait=False)
            self.wait_online()
            self.write_state()
        except BaseException:
            self.down()
            raise
        return self

    def add_node(
        self,
        key: NodeKey | str,
        data_dir: str | os.PathLike,
        register: bool = True,
        wait: bool = True,
    ) -> NodeProcess:
        """Start one more SuperNode (registering its key first unless ``register=False``).

        Parameters
        ----------
        key : NodeKey or str
            Its key pair, or a name for one in ``keys/`` (made if missing).
        data_dir : str or os.PathLike
            Its data folder (must exist; may be empty).
        register : bool
            Register its public key; ``False`` starts a node the SuperLink refuses.
        wait : bool
            Wait until it is online (only for registered nodes).

        Returns
        -------
        NodeProcess
            The node, also appended to `nodes` and the state file.
        """
        if isinstance(key, str):
            key = self._key(key)
        node = NodeProcess(
            name=key.name,
            key=key,
            data_dir=Path(data_dir).expanduser().resolve(),
            port=free_port(),
            log=self.logs / f"supernode-{key.name}.log",
            registered=register,
        )
        check_supernode_inputs(self.certs.ca_cert, key.private, node.data_dir)
        if register:
            node.node_id = register_node(self.cli, key.public)
        node.proc = start_supernode(
            self.address,
            self.certs.ca_cert,
            key.private,
            node.data_dir,
            node.port,
            log=node.log,
            env={**process_env(self.env), "FLWR_HOME": str(self.flwr_home)},
            # Each node's feature cache stays in the federation's folder.
            cache_dir=self.directory / "cache" / key.name,
        )
        node.start = _start_time(node.proc.pid)
        self.nodes.append(node)
        self.write_state()
        if wait and register:
            self.wait_online([node])
        return node

    def wait_online(self, nodes: Sequence[NodeProcess] | None = None) -> None:
        """Wait until the given registered nodes (default: all) are online."""
        nodes = [n for n in (self.nodes if nodes is None else nodes) if n.registered]
        procs = [n.proc for n in nodes if n.proc is not None]
        wait_nodes_online(self.cli, [n.node_id for n in nodes if n.node_id], procs, self.timeout)

    def stop_node(self, node: NodeProcess) -> None:
        """Stop one SuperNode and what it started, by PID."""
        if node.proc is None:
            return
        below = descendants(node.proc.pid)
        stop_process(node.proc)
        stop_pids(below)

    # -- down

    def down(self) -> None:
        """Stop every process this federation started, by PID; also after a failed `up`.

        In the process that ran `up` it uses its own process handles; elsewhere
        the state file (PIDs with start times, so a reused PID is left alone).
        Unfinished runs are stopped through the SuperLink first.
        """
        self._watching.set()
        if self.superlink is None and not self.nodes:
            self._down_from_state()
            return
        try:
            if self.superlink is not None and self.superlink.poll() is None:
                self._stop_runs()
            self._snapshot()
        finally:
            with self._lock:
                seen = [r for r in self._seen.values() if _same_process(r)]
            for node in self.nodes:
                if node.proc is not None:
                    stop_process(node.proc)
            if self.superlink is not None:
                stop_process(self.superlink)
            stop_pids([r["pid"] for r in seen if _same_process(r)])
            self._mark_down()

    def _stop_runs(self) -> None:
        try:
            for run_id in self.cli.unfinished_runs():
                self.cli.stop(run_id)
                self.cli.wait(run_id, timeout=20)
        except Exception:  # stopping the processes below is what matters
            pass

    def _down_from_state(self) -> None:
        state = self._running_state()
        if state is None:
            self._mark_down()
            return
        superlink = state.get("superlink") or {}
        tops = [r for r in [*state.get("supernodes", []), superlink] if r.get("pid")]
        tops = [r for r in tops if _same_process(r)]
        if superlink in tops:
            self.cli = FlowerCLI(Path(state["flwr_home"]), process_env(self.env))
            self._stop_runs()
        below = [_record(p) for r in tops for p in descendants(int(r["pid"]))]
        below += state.get("descendants", [])
        below = [r for r in below if r is not None and _same_process(r)]
        node_pids = [int(r["pid"]) for r in tops if r is not superlink]
        stop_pids(node_pids)
        if superlink in tops:
            stop_pids([int(superlink["pid"])])
        stop_pids(sorted({int(r["pid"]) for r in below if _same_process(r)}))
        self._mark_down()

    def _mark_down(self) -> None:
        if self.state_file.is_file():
            try:
                state = json.loads(self.state_file.read_text())
                state["stopped"] = True
                self.state_file.write_text(json.dumps(state, indent=2) + "\n")
            except (OSError, json.JSONDecodeError):
                pass
        self.superlink = None
        for node in self.nodes:
            node.proc = None


def register_keys(
    superlink: str,
    ca_cert: str | os.PathLike,
    public_keys: Sequence[str | os.PathLike],
    env: Mapping[str, str] | None = None,
) -> list[int]:
    """Register public keys with a running SuperLink, through a throw-away FLWR_HOME.

    Parameters
    ----------
    superlink : str
        The SuperLink's ``HOST:PORT``.
    ca_cert : str or os.PathLike
        The CA certificate that signed its certificate.
    public_keys : sequence of path
        OpenSSH public key files.
    env : Mapping, optional
        Base environment of ``flwr``.

    Returns
    -------
    list of int
        The node ids, in order.
    """
    check_address(superlink)
    for key in public_keys:
        require_file(key, "a node's public key (<name>.pub from make_node_keys.py)")
    with tempfile.TemporaryDirectory(prefix="flwr_home-") as home:
        cli = connect(home, superlink, ca_cert, env)
        return [register_node(cli, key) for key in public_keys]
