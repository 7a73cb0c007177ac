"""A deployed node's warm worker: TensorFlow and the built models stay loaded.

Flower 1.42's SuperNode runs every message in a fresh ClientApp process. Doing the
work there would cost, every message, importing TensorFlow, building and tracing
the model again. Instead, the first message of a node starts this worker
(``python -m fl_app.node_worker``), and every ClientApp process of that node hands
its message over and returns the worker's reply: it runs `fl_app.client_task` in
one long-lived process, as a simulation's Ray actor does, so the work and its
results are the same.

The hand-over is a `multiprocessing.connection` on loopback, authenticated with a
key that only the node's user can read (the worker's ``address.json``, mode 600).
The worker belongs to one node and one installed app version: a run with another
version of the app gets a worker of its own.

It ends when the process that started it (the ClientApp process's parent, the
SuperNode's SuperExec) ends, after `IDLE_TIMEOUT` seconds without a message
(its memory goes back), or on SIGTERM. Node config ``warm-worker=false``
switches it off: each message then does all the work in its own process.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pickle
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import psutil
from flwr.app import Context, Message
from flwr.common import log
from flwr.common.logger import FLOWER_LOGGER

from fl_app.cache import node_cache_dir
from fl_app.launch.processes import ProcessRecord

# A deployed node's own setting (--node-config), not the run's: whether its messages go
# to a warm worker.
WARM_WORKER_KEY = "warm-worker"
# Memory goes back to the node after this long without a message; the next one
# pays the start-up again. Rounds are seconds to minutes apart.
IDLE_TIMEOUT = 900.0
# Importing TensorFlow takes many seconds on a Raspberry Pi.
START_TIMEOUT = 300.0
WATCH_INTERVAL = 1.0
ADDRESS_FILE = "address.json"
LOG_FILE = "worker.log"
TASKS = ("train", "evaluate")
# The installed app this process imported (Flower installs each FAB in its own folder).
APP_ROOT = Path(__file__).resolve().parents[1]


def wanted(node_config: Mapping[str, Any]) -> bool:
    """Whether this node's messages go to a warm worker: a deployed node, unless switched off.

    Raises
    ------
    ValueError
        If ``warm-worker`` is set to anything but true or false.
    """
    if "data-dir" not in node_config:  # a simulated node: its Ray actor stays up already
        return False
    value = node_config.get(WARM_WORKER_KEY, True)
    if not isinstance(value, bool):
        raise ValueError(f"node config {WARM_WORKER_KEY}={value!r}: expected true or false")
    return value


def worker_dir(context: Context) -> Path:
    """The worker folder of a node, for the app version this process imported."""
    key = hashlib.sha256(f"{APP_ROOT}\0{context.node_id}".encode()).hexdigest()[:16]
    return node_cache_dir(context.node_config) / "workers" / key


def forward(task: str, msg: Message, context: Context) -> Message:
    """Run ``task`` (train or evaluate) on ``msg`` in this node's warm worker; its reply.

    Starts the worker if none answers; if it ends before replying (killed, out of
    memory, or ending on idle just as the message came), tries once more on a new one.
    Log lines the worker wrote for this message are logged here too, so they reach
    the SuperNode's log.

    Raises
    ------
    RuntimeError
        If the worker does not start, or ends twice before replying.
    Exception
        What the task raised in the worker, re-raised here.
    """
    folder = worker_dir(context)
    for attempt in range(2):
        conn = _connect(folder)
        if conn is None:
            folder.mkdir(parents=True, exist_ok=True)
            with _locked(folder / "lock"):  # two messages at once start one worker
                conn = _connect(folder) or _start(folder)
        try:
            with conn:
                conn.send((task, msg, context))
                outcome, result, records = conn.recv()
            break
        except (EOFError, OSError):
            if attempt:
                raise RuntimeError(
                    f"the node's warm worker ended twice during the {task} message; "
                    f"its log: {folder / LOG_FILE}"
                ) from None
            log(logging.WARNING, "the node's warm worker ended during the %s message", task)
    for level, line in records:
        log(level, "%s", line)
    if outcome == "error":
        result.add_note(
            f"raised in this node's warm worker; its traceback is in {folder / LOG_FILE}"
        )
        raise result
    return result


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _address(folder: Path) -> dict[str, Any] | None:
    try:
        address = json.loads((folder / ADDRESS_FILE).read_text())
        worker = ProcessRecord.from_json(address)
    except (OSError, ValueError, TypeError, AttributeError):
        return None  # none yet, or not one a worker wrote: start one
    return address if worker is not None and worker.process() is not None else None


def _connect(folder: Path) -> Connection | None:
    address = _address(folder)
    if address is None:
        return None
    try:
        return Client(("127.0.0.1", address["port"]), authkey=bytes.fromhex(address["key"]))
    except (OSError, EOFError):
        return None  # it ended since it wrote the file, or is ending on idle


def _start(folder: Path) -> Connection:
    (folder / ADDRESS_FILE).unlink(missing_ok=True)
    # The app version this process imported, which Flower installed off the default import path.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(APP_ROOT), os.environ.get("PYTHONPATH")])),
    }
    watched = psutil.Process(os.getppid())
    command = [
        sys.executable,
        "-m",
        "fl_app.node_worker",
        str(folder),
        "--watch-pid",
        str(watched.pid),
        "--watch-created",
        repr(watched.create_time()),
    ]
    with (folder / LOG_FILE).open("ab") as out:
        # In this process's group: stopping the SuperNode's group stops it too.
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd=folder
        )
    log(
        logging.INFO,
        "started this node's warm worker (pid %d, log %s)",
        proc.pid,
        folder / LOG_FILE,
    )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the node's warm worker exited with {proc.returncode} before it was ready: "
                f"{_tail(folder / LOG_FILE)}"
            )
        conn = _connect(folder)
        if conn is not None:
            return conn
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(
        f"the node's warm worker was not ready after {START_TIMEOUT:.0f} s; "
        f"its log: {folder / LOG_FILE}"
    )


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"no log at {path}"


class _Records(logging.Handler):
    """The log lines of one message, to send back with its reply."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.getMessage()))


def serve(folder: Path, watch: psutil.Process, idle_timeout: float) -> None:
    """Answer messages at ``folder``'s address until ``watch`` ends or ``idle_timeout`` passes."""
    from fl_app import client_task  # TensorFlow: before the address, so ready means warm

    key = secrets.token_bytes(32)
    # A backlog for messages that come while one is worked on (several runs at once).
    listener = Listener(("127.0.0.1", 0), backlog=16, authkey=key)
    me = psutil.Process()
    address = {"port": listener.address[1], "key": key.hex(), **ProcessRecord.of(me).to_json()}
    partial = folder / f"{ADDRESS_FILE}.{me.pid}"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(address, handle)
    partial.replace(folder / ADDRESS_FILE)
    state = {"busy": False, "last": time.monotonic()}
    lock = threading.Lock()

    def leave(reason: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            if json.loads((folder / ADDRESS_FILE).read_text())["pid"] == me.pid:
                (folder / ADDRESS_FILE).unlink()
        print(f"warm worker {me.pid}: {reason}", file=sys.stderr, flush=True)
        os._exit(0)  # the main thread may be blocked in accept()

    def watchdog() -> None:
        while True:
            time.sleep(WATCH_INTERVAL)
            if not watch.is_running():
                leave(f"process {watch.pid} that started it ended")
            with lock:
                if not state["busy"] and time.monotonic() - state["last"] > idle_timeout:
                    leave(f"no message for {idle_timeout:.0f} s")

    signal.signal(signal.SIGTERM, lambda *_: leave("SIGTERM"))
    threading.Thread(target=watchdog, daemon=True).start()
    print(f"warm worker {me.pid}: ready on port {address['port']}", file=sys.stderr, flush=True)
    while True:
        try:
            conn = listener.accept()
        except (OSError, EOFError, AuthenticationError):
            continue  # a caller that went away or had the wrong key
        with lock:
            state["busy"] = True
        try:
            with conn:
                _answer(conn, client_task)
        finally:
            with lock:
                state["busy"], state["last"] = False, time.monotonic()


def _answer(conn: Connection, client_task: Any) -> None:
    try:
        task, msg, context = conn.recv()
    except (EOFError, OSError):
        return
    if task not in TASKS:
        return
    records = _Records()
    FLOWER_LOGGER.addHandler(records)
    try:
        outcome, result = "ok", getattr(client_task, task)(msg, context)
    except Exception as err:  # the ClientApp process re-raises it
        traceback.print_exc()
        outcome, result = "error", err
    finally:
        FLOWER_LOGGER.removeHandler(records)
    try:
        conn.send((outcome, result, records.records))
    except (OSError, ValueError, TypeError, AttributeError, pickle.PicklingError):
        # An exception that does not pickle: its type and text still reach the caller.
        if outcome == "error":
            with contextlib.suppress(OSError):
                conn.send((outcome, RuntimeError(f"{type(result).__name__}: {result}"), []))


def main() -> None:
    """``python -m fl_app.node_worker FOLDER --watch-pid PID --watch-created T``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--watch-pid", type=int, required=True)
    parser.add_argument("--watch-created", type=float, required=True)
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT)
    args = parser.parse_args()
    watched = ProcessRecord(args.watch_pid, args.watch_created).process()
    if watched is None:
        sys.exit(f"process {args.watch_pid} to watch is not running")
    serve(args.folder, watched, args.idle_timeout)


if __name__ == "__main__":
    main()
