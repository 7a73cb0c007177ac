"""Who may act on the federation: a device with ``ca.crt`` cannot, the operator can.

One loopback federation as `LocalFederation` (and so `fl-app local up`) sets it
up: a TLS SuperLink with node authentication on 127.0.0.1:P (its one port serves
the Fleet, Control and Runtime APIs), the Fleet gateway on 127.0.0.1:G in front
of it, and one SuperNode whose key is registered, connected through G. A
"device" is a ``flwr`` configuration holding only ``ca.crt``, pointed at G, the
only address a device is given.

What this proves: through the gateway, ``flwr supernode register`` of a new key
and ``flwr run`` fail at once with a clear error (HTTP 404, nothing reaches the
SuperLink: the key stays unregistered and no run exists; ``flwr`` shows the
gateway's one-line reason), as does every other
Control or Runtime call tried, also with ``..`` in the path; the registered
SuperNode works through the same gateway; and the operator, through P, can
register keys. What it does not prove: on one machine every process can reach
127.0.0.1:P, so this shows the separation of the two ports, not a firewall. On a
real deployment the SuperLink listens on loopback (`fl-app deploy superlink`
refuses another ``--host`` unless ``--expose-control-api``) and only the
gateway's port is on the devices' network; that a remote device cannot reach a
loopback port is the operating system's promise, not tested here.
"""

from __future__ import annotations

import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fl_app.deploy import DeploymentError
from fl_app.deploy.checks import check_control_host
from fl_app.deploy.local_federation import LocalFederation
from fl_app.deploy.pki import make_node_keys
from fl_app.deploy.start import connect
from fl_app.launch.flower_cli import FlowerCLIError

# Every `flwr` call of a device must fail fast: a hang would be a failure too.
CALL_TIMEOUT = 30


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """The recipe's loopback federation with one registered SuperNode (no data needed)."""
    root = tmp_path_factory.mktemp("control_api")
    empty = root / "data" / "node-0"
    empty.mkdir(parents=True)
    with LocalFederation(root / "federation", 1, data_dirs=[empty], timeout=60) as fed:
        yield fed


def post(address: str, path: str, ca_cert: Path) -> tuple[int, str]:
    """POST an empty body to ``https://address/path``; the status and the body."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    request = urllib.request.Request(f"https://{address}{path}", data=b"", method="POST")
    request.add_header("content-type", "application/protobuf")
    try:
        with urllib.request.urlopen(request, timeout=CALL_TIMEOUT, context=context) as reply:
            return reply.status, reply.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


@pytest.mark.e2e
def test_a_device_with_ca_crt_can_neither_register_a_key_nor_submit_a_run(federation, tmp_path):
    fed = federation
    node = fed.nodes[0]
    assert fed.fleet_address != fed.address

    device = connect(tmp_path / "device_home", fed.fleet_address, fed.certs.ca_cert)
    intruder = make_node_keys(tmp_path / "keys", ["intruder"])[0]

    start = time.monotonic()  # the two `flwr` calls, so that a hang shows
    with pytest.raises(FlowerCLIError) as register:
        device.call("supernode register", str(intruder.public), timeout=CALL_TIMEOUT)
    with pytest.raises(FlowerCLIError) as run:
        device.submit(Path(__file__).resolve().parents[1], {"num-server-rounds": 1})
    took = time.monotonic() - start
    print(f"register: {register.value}\nrun: {run.value}\n(both in {took:.1f} s)")
    for refused, call in ((register.value, "register-node"), (run.value, "start-run")):
        assert f"POST /v1/control/{call} is not served here" in str(refused), refused
    assert took < 2 * CALL_TIMEOUT

    # Nothing reached the SuperLink: no run (and no node, below).
    assert fed.cli.call("ls").get("runs", []) == []

    # Every other API is refused too, also with a path that a client would normalise.
    ca = fed.certs.ca_cert
    for path in (
        "/v1/control/list-runs",
        "/v1/control/register-node",
        "/v1/runtime/get-nodes",
        "/v1/fleet/../control/list-runs",
        "/v1/fleet/%2e%2e/control/list-runs",
        "/docs",
    ):
        status, body = post(fed.fleet_address, path, ca)
        assert status == 404 and "serves only the Fleet API" in body, (path, status, body)
    # The same Control call on the SuperLink's own port is answered (the refusal is the
    # gateway's doing), and the gateway logged each refusal.
    assert post(fed.address, "/v1/control/list-runs", ca)[0] != 404
    log = (fed.logs / "fleet-gateway.log").read_text()
    assert "refused POST /v1/control/register-node" in log

    # The operator, on the SuperLink's host, can still register keys through its port
    # (this one was not registered before: a key registers once); the device's own
    # node is online, through the gateway.
    node_id = fed.cli.register_supernode(intruder.public)
    assert fed.cli.supernodes() == {node.node_id: "online", node_id: "registered"}


def test_the_superlink_port_stays_on_loopback_unless_exposed_on_purpose():
    for host in ("127.0.0.1", "::1", "[::1]", "localhost"):
        check_control_host(host)
    check_control_host("0.0.0.0", expose_control_api=True)
    with pytest.raises(DeploymentError) as err:
        check_control_host("0.0.0.0")
    assert str(err.value).startswith("--host 0.0.0.0 is not allowed: expected a loopback")
    assert "--expose-control-api" in str(err.value) and "\n" not in str(err.value)
