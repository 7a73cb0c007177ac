"""Certificates and keys of a deployment: a CA, the SuperLink's TLS certificate, node keys.

Everything is ECDSA P-384 made with ``cryptography`` (no openssl needed). Files
are never overwritten; private keys get permissions 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fl_app.deploy import DeploymentError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
# Always in the SuperLink certificate: the SuperLink's own SuperExec (which starts
# ServerApps) connects to it on 127.0.0.1 when it listens on 0.0.0.0 or 127.0.0.1.
DEFAULT_HOSTS = ("127.0.0.1", "localhost")


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
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days))
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key, validity)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _server_certificate(server_key, ca_key, ca_cert, names, validity)
    certs.ca_cert.parent.mkdir(parents=True, exist_ok=True)
    _write_new(certs.ca_key, _key_pem(ca_key), 0o600)
    _write_new(certs.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_new(certs.server_key, _key_pem(server_key), 0o600)
    _write_new(certs.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return certs


def _ca_certificate(
    ca_key: ec.EllipticCurvePrivateKey, validity: tuple[datetime.datetime, datetime.datetime]
) -> x509.Certificate:
    """The self-signed CA certificate: it signs certificates, nothing else."""
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fl_app federation CA")])
    return (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
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
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )


def _server_certificate(
    server_key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: list[x509.GeneralName],
    validity: tuple[datetime.datetime, datetime.datetime],
) -> x509.Certificate:
    """The SuperLink's TLS server certificate for ``names``, signed by the CA."""
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(names[0].value))]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
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


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


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


def reuse_or_make_certificates(directory: str | os.PathLike) -> Certificates:
    """The four files of `make_certificates` in ``directory``: reused, or made if none is there.

    Raises
    ------
    DeploymentError
        If only some of them are there.
    """
    certs = Certificates.in_dir(directory)
    if not any(p.exists() for p in certs.files()):
        return make_certificates(directory)
    for p in certs.files():
        if not p.is_file():
            raise DeploymentError(
                f"{p} is not a file: expected part of the certificates in {p.parent}"
                " (remove the folder to remake)"
            )
    return certs


def reuse_or_make_node_key(directory: str | os.PathLike, name: str) -> NodeKey:
    """The key pair ``name`` in ``directory``: reused, or made if neither file is there.

    Raises
    ------
    DeploymentError
        If only one of the two files is there.
    """
    key = NodeKey.in_dir(directory, name)
    if not key.private.exists() and not key.public.exists():
        return make_node_keys(directory, [name])[0]
    for path, kind, other in (
        (key.private, "private", key.public),
        (key.public, "public", key.private),
    ):
        if not path.is_file():
            raise DeploymentError(
                f"{path} is not a file: expected the {kind} key of {name} (or remove {other})"
            )
    return key
