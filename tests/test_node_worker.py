"""A deployed node's warm worker: real worker processes, real Keras, real messages.

The ClientApp (``fl_app.client_app``) is called as a SuperNode's ClientApp process
would call it; the worker it starts is stopped by the PID in its address file.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from multiprocessing import Pipe
from multiprocessing.connection import Listener
from pathlib import Path

import numpy as np
import psutil
import pytest
import test_client
from flwr.app import MessageType
from flwr.common.config import parse_config_args
from test_client import context, message, round_config

from fl_app import client_app, client_task, node_worker
from fl_app.deploy.commands import node_config
from fl_app.launch.processes import ProcessRecord
from fl_app.node_worker import WARM_WORKER_KEY

initial = test_client.initial
node = test_client.node


@pytest.fixture
def deployed(node, tmp_path):
    """A deployed node's config with its own cache folder; its workers are stopped after."""
    config = {**node, "cache-dir": str(tmp_path / "cache")}
    yield config
    for address in (tmp_path / "cache").glob(f"workers/*/{node_worker.ADDRESS_FILE}"):
        pid = json.loads(address.read_text())["pid"]
        if pid != os.getpid():  # a test's stand-in worker is this process
            stop(pid)


def stop(pid: int) -> None:
    try:
        proc = psutil.Process(pid)
        proc.terminate()
        proc.wait(30)
    except psutil.NoSuchProcess:
        pass


def worker_pid(node_config: dict) -> int:
    folder = node_worker.worker_dir(context(node_config))
    return json.loads((folder / node_worker.ADDRESS_FILE).read_text())["pid"]


def arrays_of(reply) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in reply.content["arrays"].items()}


@pytest.mark.e2e
def test_a_deployed_nodes_messages_go_to_one_warm_worker_and_get_the_same_replies(
    initial, deployed, tmp_path
):
    msg = message(initial, round_config())
    first = client_app.train(msg, context(deployed))
    pid = worker_pid(deployed)
    assert pid != os.getpid() and psutil.Process(pid).is_running()
    second = client_app.train(message(initial, round_config()), context(deployed))
    assert worker_pid(deployed) == pid  # the same process served both
    assert first.metadata.reply_to_message_id == msg.metadata.message_id

    # The same work as in this process, to the bit: same data, seeds and model.
    in_process = client_task.train(msg, context({**deployed, "cache-dir": str(tmp_path / "own")}))
    for key, value in arrays_of(in_process).items():
        np.testing.assert_array_equal(arrays_of(first)[key], value)
        np.testing.assert_array_equal(arrays_of(second)[key], value)
    assert first.content["metrics"]["num-examples"] == in_process.content["metrics"]["num-examples"]

    evaluated = client_app.evaluate(
        message(initial, round_config(), message_type=MessageType.EVALUATE), context(deployed)
    )
    assert worker_pid(deployed) == pid
    assert 0.0 <= evaluated.content["metrics"]["eval_accuracy"] <= 1.0

    # A worker that died (killed, out of memory) is replaced by the next message.
    psutil.Process(pid).kill()
    psutil.Process(pid).wait(30)
    again = client_app.train(message(initial, round_config()), context(deployed))
    assert worker_pid(deployed) != pid
    np.testing.assert_array_equal(
        arrays_of(again)["predictions/bias"], arrays_of(in_process)["predictions/bias"]
    )


@pytest.mark.e2e
def test_a_worker_that_ends_mid_message_is_replaced_and_the_message_runs_again(initial, deployed):
    # A stand-in worker at the node's address: it takes the message and ends unanswered.
    folder = node_worker.worker_dir(context(deployed))
    folder.mkdir(parents=True)
    key = os.urandom(32)
    listener = Listener(("127.0.0.1", 0), authkey=key)
    me = psutil.Process()
    address = {"port": listener.address[1], "key": key.hex(), **ProcessRecord.of(me).to_json()}
    (folder / node_worker.ADDRESS_FILE).write_text(json.dumps(address))
    taken = []

    def end_mid_message() -> None:
        with listener.accept() as conn:
            taken.append(conn.recv()[0])
        listener.close()

    thread = threading.Thread(target=end_mid_message)
    thread.start()
    reply = client_app.train(message(initial, round_config()), context(deployed))
    thread.join()
    assert taken == ["train"]
    assert worker_pid(deployed) != me.pid  # a real worker answered the second try
    assert reply.content["metrics"]["num-examples"] > 0


@pytest.mark.e2e
def test_what_the_task_raises_in_the_worker_is_raised_in_the_clientapp(initial, deployed):
    msg = message(initial, round_config())
    del msg.content["config"]["classes"]
    with pytest.raises(ValueError, match="the message carries no class list"):
        client_app.train(msg, context(deployed))


def test_the_warm_worker_is_for_deployed_nodes_and_can_be_switched_off(node, tmp_path):
    assert node_worker.wanted(node)
    assert not node_worker.wanted({**node, WARM_WORKER_KEY: False})
    # What `fl-app deploy` passes to flower-supernode, as Flower parses it.
    for warm in (True, False):
        parsed = parse_config_args([node_config(tmp_path, warm_worker=warm)])
        assert node_worker.wanted(parsed) is warm
    assert not node_worker.wanted({"partition-id": 0, "num-partitions": 2})
    with pytest.raises(ValueError, match=r"warm-worker='yes': expected true or false"):
        node_worker.wanted({**node, "warm-worker": "yes"})


def start_worker(folder: Path, watched: psutil.Process, *extra: str) -> subprocess.Popen:
    folder.mkdir(parents=True)
    command = [sys.executable, "-m", "fl_app.node_worker", str(folder)]
    command += ["--watch-pid", str(watched.pid), "--watch-created", repr(watched.create_time())]
    return subprocess.Popen([*command, *extra], stderr=subprocess.PIPE, text=True)


def wait_ready(folder: Path, worker: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not (folder / node_worker.ADDRESS_FILE).exists():
        assert worker.poll() is None, worker.stderr.read()
        assert time.monotonic() < deadline, "the worker was not ready in 120 s"
        time.sleep(0.2)


@pytest.mark.e2e
def test_the_worker_ends_with_the_process_that_started_it(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    worker = start_worker(tmp_path / "w", psutil.Process(sleeper.pid))
    try:
        wait_ready(tmp_path / "w", worker)
        assert (tmp_path / "w" / node_worker.ADDRESS_FILE).stat().st_mode & 0o077 == 0
        os.kill(sleeper.pid, signal.SIGTERM)
        sleeper.wait()
        assert worker.wait(30) == 0
        assert "that started it ended" in worker.stderr.read()
        assert not (tmp_path / "w" / node_worker.ADDRESS_FILE).exists()
    finally:
        for proc in (worker, sleeper):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.e2e
def test_an_idle_worker_ends_and_gives_its_memory_back(tmp_path):
    worker = start_worker(tmp_path / "w", psutil.Process(), "--idle-timeout", "1")
    try:
        wait_ready(tmp_path / "w", worker)
        assert worker.wait(30) == 0
        assert "no message for 1 s" in worker.stderr.read()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


class UnpicklableError(Exception):
    def __reduce__(self):
        raise pickle.PicklingError("not this one")


class RaisesUnpicklable:
    @staticmethod
    def train(msg, context):
        raise UnpicklableError("out of luck")


def test_an_exception_that_does_not_pickle_reaches_the_clientapp_as_its_type_and_text():
    clientapp_end, worker_end = Pipe()
    clientapp_end.send(("train", None, None))
    node_worker._answer(worker_end, RaisesUnpicklable)
    outcome, error, _ = clientapp_end.recv()
    assert outcome == "error"
    assert isinstance(error, RuntimeError) and str(error) == "UnpicklableError: out of luck"
