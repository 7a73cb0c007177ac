"""Real deployment on loopback: certificates, node keys, a TLS + authenticated federation.

The end-to-end tests start a real `flower-superlink` (TLS, SuperNode auth) and real
`flower-supernode` processes on free loopback ports, and stop every one of them in
fixtures, also when a test fails. Two runs in all: a clean one (2 nodes, their
updates summed under SecAgg+) and one, plain, with a node whose data folder is empty
and an unregistered node (tests 3 and 4).
The commands are `fl-app deploy ...` and `fl-app local ...`, run from this checkout.
"""

from __future__ import annotations

import io
import json
import stat
import subprocess
import sys
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key
from helpers import FinishedRun, log_lines, require_fashion_mnist

from fl_app.data import prepare_node_dirs
from fl_app.deploy import DeploymentError
from fl_app.deploy.federation_state import NodeProcess
from fl_app.deploy.local_federation import LocalFederation
from fl_app.deploy.pki import Certificates, certificate_hosts, make_certificates, make_node_keys
from fl_app.deploy.start import start_superlink, start_supernode
from fl_app.launch import processes
from fl_app.launch.processes import ProcessRecord

REPO = Path(__file__).resolve().parents[1]
COMMANDS = [
    ("deploy", "certificates"),
    ("deploy", "node-keys"),
    ("deploy", "register"),
    ("deploy", "superlink"),
    ("deploy", "supernode"),
    ("local", "up"),
    ("local", "down"),
    ("local", "restart"),
    ("local", "stop-superlink"),
    ("data", "prepare"),
    ("sweep", "summarize"),
]
RUN_CONFIG = {
    "num-server-rounds": 2,
    "head-rounds": 1,
    "input-size": 32,
    "max-test-examples": 100,
    "batch-size": 32,
    "min-train-nodes": 2,
    "min-evaluate-nodes": 2,
    "min-available-nodes": 2,
}
# A run that hangs (e.g. waiting for nodes) is stopped through the SuperLink after this.
RUN_TIMEOUT = 900


def fl_app(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    """`fl-app ARGS` of this checkout (the console script runs `fl_app.cli:main`)."""
    return subprocess.run(
        [sys.executable, "-m", "fl_app.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """A command refused bad input: exit code 2 and exactly one `error:` line."""
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def running(record: ProcessRecord | None) -> bool:
    return record is not None and record.process() is not None


def recorded(state_file: Path) -> list[ProcessRecord]:
    """Every process the state file names: SuperLink, SuperNodes, what ran below them."""
    state = json.loads(state_file.read_text())
    records = [state["superlink"], *state["supernodes"], *state["descendants"]]
    return [r for r in map(ProcessRecord.from_json, records) if r is not None]


# --- 1. certificates, keys, input checks, commands


def test_certificates_are_signed_by_the_ca_and_name_the_hosts(tmp_path):
    certs = make_certificates(tmp_path / "certs", ["fl.example.org", "10.1.2.3"])

    assert certs == Certificates.in_dir(tmp_path / "certs")
    for path in certs.files():
        assert path.is_file()
    for key in (certs.ca_key, certs.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {
        "10.1.2.3",
        "127.0.0.1",
    }
    assert certificate_hosts(certs.server_cert)[:2] == ["fl.example.org", "10.1.2.3"]
    # The key pair matches the certificate, and the CA file works as a trust store.
    import ssl

    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certs.server_cert, certs.server_key)
    ssl.create_default_context(cafile=str(certs.ca_cert))

    # Default hosts: loopback only.
    default = make_certificates(tmp_path / "default")
    assert sorted(certificate_hosts(default.server_cert)) == ["127.0.0.1", "localhost"]


def test_certificates_and_keys_are_never_overwritten(tmp_path):
    certs = make_certificates(tmp_path)
    before = {p: p.read_bytes() for p in certs.files()}
    with pytest.raises(DeploymentError) as err:
        make_certificates(tmp_path)
    assert str(err.value) == f"{certs.ca_cert} already exists: refusing to overwrite it"
    assert {p: p.read_bytes() for p in certs.files()} == before
    line = one_error_line(fl_app("deploy", "certificates", "--out", tmp_path))
    assert line == f"error: {certs.ca_cert} already exists: refusing to overwrite it"

    (key,) = make_node_keys(tmp_path / "keys", ["node-0"])
    before = key.private.read_bytes()
    with pytest.raises(DeploymentError, match="node-0 already exists: refusing to overwrite"):
        make_node_keys(tmp_path / "keys", ["node-1", "node-0"])
    assert key.private.read_bytes() == before
    assert not (tmp_path / "keys" / "node-1").exists()  # nothing written when one exists
    line = one_error_line(fl_app("deploy", "node-keys", "--out", tmp_path / "keys", "node-0"))
    assert line == f"error: {key.private} already exists: refusing to overwrite it"


def test_node_keys_are_openssh_ecdsa_p384_that_flower_accepts(tmp_path):
    done = fl_app("deploy", "node-keys", "--out", tmp_path, "node-0", "node-1")
    assert done.returncode == 0, done.stderr
    for name in ("node-0", "node-1"):
        private_file, public_file = tmp_path / name, tmp_path / f"{name}.pub"
        assert stat.S_IMODE(private_file.stat().st_mode) == 0o600
        assert private_file.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
        assert public_file.read_text().startswith("ecdsa-sha2-nistp384 ")
        # What flower-supernode --auth-supernode-private-key does with the file ...
        private = load_ssh_private_key(private_file.read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        # ... and what `flwr supernode register` does: the same key.
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        assert try_load_public_key(public_file) == public_key_to_bytes(private.public_key())


def test_missing_inputs_are_one_clear_line_before_anything_starts(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    certs = make_certificates(tmp_path / "certs")
    (key,) = make_node_keys(tmp_path / "keys", ["node-0"])

    with pytest.raises(DeploymentError) as err:
        start_superlink(Certificates.in_dir(empty), log=tmp_path / "superlink.log")
    assert str(err.value) == (
        f"{empty / 'ca.crt'} is not a file: expected the CA certificate "
        "(`fl-app deploy certificates` writes it)"
    )
    checks = [
        (tmp_path / "no.crt", key.private, empty, "no.crt is not a file: expected the CA"),
        (certs.ca_cert, tmp_path / "no-key", empty, "no-key is not a file: expected the node's"),
        (certs.ca_cert, key.private, tmp_path / "no-data", "no-data is not a folder"),
    ]
    for ca, private, data, message in checks:
        with pytest.raises(DeploymentError, match=message) as err:
            start_supernode("127.0.0.1:1", ca, private, data, log=tmp_path / "supernode.log")
        assert "\n" not in str(err.value)
    assert not (tmp_path / "superlink.log").exists() and not (tmp_path / "supernode.log").exists()

    # The commands: exit code 2 and the same one line.
    line = one_error_line(fl_app("deploy", "superlink", "--certs", empty))
    assert f"{empty / 'ca.crt'} is not a file" in line
    line = one_error_line(
        fl_app(
            *("deploy", "supernode", "--superlink", "127.0.0.1:1", "--ca", certs.ca_cert),
            *("--key", tmp_path / "no-key", "--data-dir", empty),
        )
    )
    assert "no-key is not a file: expected the node's private key" in line
    register = ("deploy", "register", "--superlink")
    line = one_error_line(fl_app(*register, "127.0.0.1:1", "--ca", certs.ca_cert, "x.pub"))
    assert "x.pub is not a file: expected a node's public key" in line
    line = one_error_line(fl_app(*register, "nohost", "--ca", certs.ca_cert, "x.pub"))
    assert line == "error: --superlink 'nohost' is not allowed: expected HOST:PORT"
    line = one_error_line(fl_app("deploy", "superlink", "--certs", tmp_path / "certs", "--port", 0))
    assert "'--port': 0 is not in the range 1<=x<=65535" in line
    line = one_error_line(fl_app("local", "up", "--dir", empty, "--nodes", 0))
    assert "'--nodes': 0 is not in the range x>=1" in line
    line = one_error_line(fl_app("local", "down", "--dir", empty))
    assert f"{empty / 'federation.json'} is not a file" in line
    line = one_error_line(fl_app("deploy", "node-keys", "--out", tmp_path))  # no NAME
    assert "Missing argument 'NAME...'" in line
    line = one_error_line(fl_app("data", "prepare", "--out", empty, "--nodes", 1, "--dataset", "x"))
    assert "'x' is not one of fashion_mnist, mnist, cifar10" in line
    line = one_error_line(fl_app("deploy", "certificate"))
    assert "No such command 'certificate'" in line and "fl-app deploy --help" in line
    # The benchmarks are programs of the repository (python scripts/<name>.py), not commands.
    line = one_error_line(fl_app("bench", "client", "--smallest"))
    assert line == "error: No such command 'bench' (see fl-app --help)"


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_without_keras(command):
    check = (
        "import sys; from fl_app.cli import main; code = main(sys.argv[1:]);"
        " heavy = {'keras', 'tensorflow'} & set(sys.modules); assert not heavy, heavy;"
        " sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", check, *command, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and "Usage: fl-app" in done.stdout, done.stderr


def test_fl_app_is_the_console_script_that_replaced_the_scripts():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fl-app"] == "fl_app.cli:main"


# --- 2.-4. a real federation on loopback


def run_app(fed: LocalFederation, tmp: Path, overrides: dict[str, object]) -> FinishedRun:
    """Submit a run, follow its log, wait for it; stop it if it hangs."""
    run_dir = tmp / "run"
    run_id = fed.cli.submit(
        REPO,
        {**RUN_CONFIG, "results-dir": str(run_dir), **overrides},
        config_file=tmp / "run_config.toml",
    )
    watchdog = threading.Timer(RUN_TIMEOUT, fed.cli.stop, [run_id])
    watchdog.start()
    log = io.StringIO()
    try:
        fed.cli.follow(run_id, log)
    finally:
        watchdog.cancel()
    status = fed.cli.wait(run_id)
    return FinishedRun(run_id, status.status, status.details, log.getvalue(), run_dir)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A TLS SuperLink with node auth and 2 registered SuperNodes, each with its own data."""
    require_fashion_mnist()
    root = tmp_path_factory.mktemp("deployment")
    data_dirs = prepare_node_dirs(root / "data", 2, max_examples=64)
    fed = LocalFederation(root / "federation", 2, data_dirs=data_dirs, timeout=180)
    with fed:
        yield fed
    records = recorded(fed.state_file)
    assert records and not [r for r in records if running(r)], "processes left running"


@pytest.mark.e2e
def test_two_secure_rounds_over_tls_with_two_authenticated_supernodes(federation, tmp_path):
    state = json.loads(federation.state_file.read_text())
    assert state["connection"] == "fl-app" and state["address"] == federation.address
    assert (Path(state["flwr_home"]) / "config.toml").is_file()
    nodes = state["supernodes"]
    assert len(nodes) == 2 and all(running(ProcessRecord.from_json(n)) for n in nodes)
    assert len({n["data_dir"] for n in nodes}) == 2  # each node its own data folder
    online = federation.cli.supernodes()
    assert sorted(online) == sorted(n["node_id"] for n in nodes)
    assert set(online.values()) == {"online"}

    # SecAgg+'s four stages pass through each node's SuperNode, ClientApp processes and
    # warm worker: the protocol's state must live in the node's context between them.
    run = run_app(federation, tmp_path, {"secure-aggregation": "secagg+"})

    assert run.status == "finished:completed", run.details + run.log[-3000:]
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["train_replies"] == 2 and r["secagg_dropped"] == 0 and r["model_updated"]
    assert log_lines(run.log, r"Secure aggregation: SecAgg\+")
    assert log_lines(run.log, r"Round 2 summary: train acc")
    import keras

    import fl_app.model.classifier  # noqa: F401 - registers the preprocessing layer

    model = keras.saving.load_model(run.run_dir / "final.keras")
    assert model.output_shape == (None, 10)


@dataclass
class FaultyRun:
    run: FinishedRun
    bad: NodeProcess
    intruder: NodeProcess
    intruder_exit: int | None
    intruder_log: str
    online: dict[int, str]
    registered: list[int]


@pytest.fixture(scope="module")
def faulty_run(federation, tmp_path_factory):
    """One run with a 3rd node whose data folder is empty, and an unregistered 4th node."""
    tmp = tmp_path_factory.mktemp("faulty")
    empty = tmp / "empty-data"
    empty.mkdir()
    bad = federation.add_node("bad-node", empty)  # registered, online, no data
    (key,) = make_node_keys(tmp / "keys", ["intruder"])  # never registered
    intruder = federation.add_node(key, federation.nodes[0].data_dir, register=False, wait=False)
    try:
        try:
            intruder_exit = intruder.proc.wait(timeout=90)
        except psutil.TimeoutExpired:
            intruder_exit = None
        online = federation.cli.supernodes()
        run = run_app(federation, tmp, {"min-available-nodes": 3})
        registered = [n.node_id for n in federation.nodes if n.registered]
        yield FaultyRun(
            run, bad, intruder, intruder_exit, intruder.log.read_text(), online, registered
        )
    finally:
        federation.procs.stop_node(intruder)
        federation.procs.stop_node(bad)


@pytest.mark.e2e
def test_an_unregistered_supernode_is_refused_and_the_others_still_train(faulty_run):
    assert "[code: 2004] Failed to activate SuperNode" in faulty_run.intruder_log
    assert faulty_run.intruder_exit not in (None, 0)
    # Only the three registered nodes exist on the SuperLink, all online.
    assert faulty_run.intruder.node_id is None
    assert sorted(faulty_run.online) == sorted(faulty_run.registered)
    assert set(faulty_run.online.values()) == {"online"}

    run = faulty_run.run
    assert run.status == "finished:completed", run.details + run.log[-3000:]
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    assert (run.run_dir / "final.keras").is_file()


@pytest.mark.e2e
def test_a_supernode_without_data_does_not_stop_the_run(faulty_run):
    run = faulty_run.run
    assert run.status == "finished:completed", run.details + run.log[-3000:]
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    for r in metrics["rounds"][1:]:
        assert r["train_replies"] == 2 and r["rejected_replies"] >= 1 and r["model_updated"]
    node_id = faulty_run.bad.node_id
    rejected = log_lines(run.log, rf"rejected reply from node {node_id}: client error")
    assert len(rejected) >= 2, run.log[-3000:]  # its train reply, every round


@pytest.mark.e2e
def test_fl_app_local_up_and_down(tmp_path):
    """`up` leaves a SuperLink and a SuperNode running, `down` stops them and all below."""
    data = tmp_path / "data" / "node-0"
    data.mkdir(parents=True)  # `up` reuses node-<i>/ folders that hold partition.npz
    (data / "partition.npz").write_bytes(b"")  # never read: no run is submitted
    directory = tmp_path / "federation"
    try:
        done = fl_app(
            *("local", "up", "--dir", directory, "--nodes", 1, "--data-root", tmp_path / "data")
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "flwr run . fl-app" in done.stdout and "fl-app local down --dir" in done.stdout
        records = recorded(directory / "federation.json")
        assert len(records) >= 2 and all(running(r) for r in records[:2])
        assert f"pid {records[0].pid}" in done.stdout
        # A second `up` on a running federation is refused.
        line = one_error_line(fl_app("local", "up", "--dir", directory))
        assert "already up" in line
        # Processes started below them (SuperExecs) are stopped too.
        below = [ProcessRecord.of(p) for r in records[:2] for p in processes.descendants(r.pid)]
        done = fl_app("local", "down", "--dir", directory)
        assert done.returncode == 0, done.stderr
        assert not [r for r in records + below if running(r)]
        assert json.loads((directory / "federation.json").read_text())["stopped"] is True
    finally:
        LocalFederation(directory).down()  # by the records in the state file, if any are left
