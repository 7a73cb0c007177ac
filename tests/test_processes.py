"""fl_app.launch.processes on real short-lived processes, and Ctrl-C on `fl-app local up`.

The unit tests start `python -c` children (a few seconds at most each). The e2e
tests interrupt a real `fl-app local up` (TLS SuperLink and a SuperNode) while it
starts, and check with psutil that every process it recorded or ran is gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import require_fashion_mnist

from fl_app.deploy.local_federation import LocalFederation
from fl_app.launch import processes
from fl_app.launch.flower_cli import FlowerCLI, FlowerCLIError, write_connection
from fl_app.launch.processes import ProcessRecord

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SLEEP = "import time; time.sleep(60)"
# Ignores SIGTERM: only SIGKILL stops it.
STUBBORN = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
    " print('ready', flush=True); time.sleep(60)"
)


# `python -c TREE 0 TREE`: a parent that starts a child that starts a grandchild; all sleep.
TREE = (
    "import subprocess, sys, time\n"
    "level = int(sys.argv[1])\n"
    "if level < 2:\n"
    "    subprocess.Popen([sys.executable, '-c', sys.argv[2], str(level + 1), sys.argv[2]])\n"
    "time.sleep(60)\n"
)


@pytest.fixture
def started():
    """Processes a test starts; whatever is left is killed at the end."""
    procs: list[psutil.Popen] = []
    yield procs
    for proc in procs:
        for p in [*processes.descendants(proc), proc]:
            try:
                p.kill()
            except psutil.Error:
                pass
        proc.wait()


def gone(procs) -> bool:
    return not [p for p in procs if processes.alive(p)]


def test_stop_tree_stops_children_and_grandchildren(started, tmp_path):
    proc = processes.start([PYTHON, "-c", TREE, "0", TREE], log=tmp_path / "tree.log")
    started.append(proc)

    def both_levels() -> list[psutil.Process] | None:
        below = processes.descendants(proc)
        return below if len(below) == 2 else None

    below = processes.wait_until(both_levels, 30, proc, "two levels of children")
    assert [p.ppid() for p in below] == [proc.pid, below[0].pid]
    assert processes.stop_tree(proc, timeout=10) == []
    assert gone([proc, *below])
    assert proc.returncode == -signal.SIGTERM


def test_stop_kills_what_ignores_sigterm(started):
    proc = processes.start([PYTHON, "-c", STUBBORN], capture=True)
    started.append(proc)
    assert proc.stdout.readline() == "ready\n"  # its SIGTERM handler is set

    t0 = time.monotonic()
    assert processes.stop([proc], timeout=1) == []
    assert proc.returncode == -signal.SIGKILL
    assert time.monotonic() - t0 < 10


def test_start_appends_to_the_log_in_its_own_session(started, tmp_path):
    log = tmp_path / "logs" / "x.log"
    for word in ("one", "two"):
        proc = processes.start([PYTHON, "-c", f"print({word!r})"], log=log)
        started.append(proc)
        assert proc.wait(30) == 0
    assert log.read_text() == "one\ntwo\n"
    proc = processes.start([PYTHON, "-c", SLEEP])
    started.append(proc)
    assert os.getsid(proc.pid) == proc.pid != os.getsid(0)  # Ctrl-C at our terminal misses it
    proc = processes.start([PYTHON, "-c", SLEEP], own_session=False)
    started.append(proc)
    assert os.getsid(proc.pid) == os.getsid(0)


def test_a_record_survives_json_and_refuses_a_reused_pid(started):
    proc = processes.start([PYTHON, "-c", SLEEP])
    started.append(proc)
    record = ProcessRecord.of(proc)
    assert record is not None and record.pid == proc.pid

    again = ProcessRecord.from_json(json.loads(json.dumps(record.to_json())))
    assert again == record and again.process().pid == proc.pid
    # The same PID, started at another time: another process now has it.
    reused = ProcessRecord(proc.pid, record.create_time - 3600)
    assert reused.process() is None
    processes.stop([p for p in [reused.process()] if p is not None], timeout=1)
    assert processes.alive(proc)
    assert ProcessRecord.from_json({"pid": proc.pid}) is None  # no start time: never trusted

    processes.stop([proc])
    assert record.process() is None and ProcessRecord.of(proc.pid) is None


def test_wait_until_gives_up_when_the_process_exits(started):
    proc = processes.start([PYTHON, "-c", "import sys, time; time.sleep(0.5); sys.exit(3)"])
    started.append(proc)
    t0 = time.monotonic()
    with pytest.raises(processes.ProcessExitedError) as err:
        processes.wait_until(lambda: False, 60, proc, "a miracle")
    assert time.monotonic() - t0 < 10
    name = Path(PYTHON).name
    expected = f"{name} (pid {proc.pid}) exited with code 3 while waiting for a miracle"
    assert str(err.value) == expected

    with pytest.raises(processes.WaitTimeoutError, match="still waiting for x after 0 s") as err:
        processes.wait_until(lambda: 0, 0.2, what="x", interval=0.05)
    assert isinstance(err.value, TimeoutError) and isinstance(err.value, RuntimeError)
    assert processes.wait_until(lambda: "yes", 1) == "yes"


def test_free_port_listening_on_and_process_env(started):
    port = processes.free_port()
    code = (
        "import socket, time; s = socket.socket();"
        f" s.bind(('127.0.0.1', {port})); s.listen(); print('ready', flush=True); time.sleep(60)"
    )
    proc = processes.start([PYTHON, "-c", code], capture=True)
    started.append(proc)
    assert proc.stdout.readline() == "ready\n"
    assert processes.listening_on(port).pid == proc.pid
    assert processes.listening_on(processes.free_port()) is None

    env = processes.process_env({"PATH": "/usr/bin"})
    assert env["PATH"].split(os.pathsep) == [str(Path(PYTHON).parent), "/usr/bin"]
    assert processes.process_env(env) == env


def test_ctrl_c_is_held_back_until_the_block_ends():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with processes.interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler has run by now
            done.append(True)
    assert done == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_down_from_the_state_file_stops_only_recorded_processes(started, tmp_path):
    """`fl-app local down` in another process: the (pid, create_time) records decide."""
    proc = processes.start([PYTHON, "-c", SLEEP])
    started.append(proc)
    record = ProcessRecord.of(proc)
    fed = LocalFederation(tmp_path)

    def write_state(superlink: ProcessRecord) -> None:
        state = {"flwr_home": str(tmp_path / "flwr_home"), "supernodes": [], "descendants": []}
        fed.state_file.write_text(json.dumps({**state, "superlink": superlink.to_json()}))

    write_state(ProcessRecord(record.pid, record.create_time - 3600))  # a reused PID
    fed.down()
    assert processes.alive(proc)
    assert json.loads(fed.state_file.read_text())["stopped"] is True

    write_state(record)
    LocalFederation(tmp_path).down()
    assert not processes.alive(proc)


def test_stop_superlink_refuses_a_process_that_is_not_a_superlink(started):
    port = processes.free_port()
    code = (
        "import socket, time; s = socket.socket();"
        f" s.bind(('127.0.0.1', {port})); s.listen(); print('ready', flush=True); time.sleep(60)"
    )
    proc = processes.start([PYTHON, "-c", code], capture=True)
    started.append(proc)
    assert proc.stdout.readline() == "ready\n"
    done = fl_app("local", "stop-superlink", "--port", port)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"port {port} belongs to PID {proc.pid}, which is not a flower-superlink" in done.stderr
    assert processes.alive(proc)
    proc.kill()
    proc.wait()
    done = fl_app("local", "stop-superlink", "--port", port)
    assert done.returncode == 0 and "nothing to stop" in done.stderr


@pytest.mark.e2e
def test_stop_superlink_stops_a_flower_superlink(started, tmp_path):
    port = processes.free_port()
    cmd = ["flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1"]
    proc = processes.start([*cmd, "--port", str(port)], log=tmp_path / "log", cwd=tmp_path)
    started.append(proc)
    processes.wait_until(lambda: processes.listening_on(port), 60, proc, "its port")
    below = processes.descendants(proc)

    done = fl_app("local", "stop-superlink", "--port", port)

    assert done.returncode == 0, done.stderr
    assert done.stdout == f"stopped SuperLink PID {proc.pid}\n"
    assert gone([proc, *below])


# --- Ctrl-C on a real `fl-app local up`


def fl_app(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    """`fl-app ARGS` of this checkout."""
    return subprocess.run(
        [PYTHON, "-m", "fl_app.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def state_records(state_file: Path) -> list[ProcessRecord]:
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError):
        return []  # not written yet, or being replaced
    tops = [state.get("superlink"), *state.get("supernodes", []), *state.get("descendants", [])]
    return [r for r in map(ProcessRecord.from_json, tops) if r is not None]


# When to press Ctrl-C: as soon as the SuperLink is recorded (it is not healthy yet),
# or once a SuperNode is recorded (the SuperLink is up, the node is coming online).
MOMENTS = {
    "superlink-starting": lambda state: state.get("superlink") is not None,
    "supernode-starting": lambda state: bool(state.get("supernodes")),
}


@pytest.mark.e2e
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_ctrl_c_on_local_up_leaves_no_process_behind(moment, tmp_path):
    require_fashion_mnist()
    directory = tmp_path / "federation"
    cmd = ["local", "up", "--dir", directory, "--nodes", 1, "--max-examples", 32]
    up = psutil.Popen(
        [PYTHON, "-m", "fl_app.cli", *map(str, cmd)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: dict[ProcessRecord, str] = {}  # every process `up` ran, with its command line

    def see(record: ProcessRecord | None, proc: psutil.Process | None) -> None:
        # The latest command line: a child seen between fork and exec still has ours.
        if record is not None:
            seen[record] = _cmdline(proc) or seen.get(record, "")

    def look() -> dict:
        for proc in processes.descendants(up):
            see(ProcessRecord.of(proc), proc)
        for record in state_records(directory / "federation.json"):
            see(record, record.process())
        try:
            return json.loads((directory / "federation.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and up.poll() is None:
            if MOMENTS[moment](look()):
                break
            time.sleep(0.05)
        assert up.poll() is None, "`up` ended before the moment: " + up.stderr.read()
        look()
        up.send_signal(signal.SIGINT)
        out, err = up.communicate(timeout=120)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        LocalFederation(directory).down()  # whatever is left, so the next tests run clean

    assert up.returncode == 130, out + err
    assert err.strip().splitlines()[-1] == "interrupted: everything started was stopped"
    look()
    assert any("flower-superlink" in cmd for cmd in seen.values()), seen
    if moment == "supernode-starting":
        assert any("flower-supernode" in cmd for cmd in seen.values()), seen
    left = {r.pid: cmd for r, cmd in seen.items() if r.process() is not None}
    assert not left


def _cmdline(proc: psutil.Process | None) -> str:
    try:
        return " ".join(proc.cmdline()) if proc is not None else ""
    except psutil.Error:
        return ""


def test_a_failed_flwr_call_is_one_flower_cli_error_line(tmp_path):
    write_connection(tmp_path, f"127.0.0.1:{processes.free_port()}")  # nothing listens there
    cli = FlowerCLI(tmp_path)
    with pytest.raises(FlowerCLIError) as err:
        cli.unfinished_runs()
    assert str(err.value).startswith("flwr ls failed: ") and "\n" not in str(err.value)
    with pytest.raises(FlowerCLIError, match=r"^flwr supernode register failed: "):
        cli.register_supernode(tmp_path / "no.pub")


def test_stop_does_not_wait_for_a_zombie_nobody_reaps(started):
    # The parent never waits for its child: once stopped, the child stays a zombie.
    code = (
        "import subprocess, sys, time;"
        " child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        " print(child.pid, flush=True); time.sleep(60)"
    )
    parent = processes.start([PYTHON, "-c", code], capture=True)
    started.append(parent)
    child = psutil.Process(int(parent.stdout.readline()))

    t0 = time.monotonic()
    assert processes.stop([child], timeout=30) == []
    assert time.monotonic() - t0 < 5
    assert child.status() == psutil.STATUS_ZOMBIE and not processes.alive(child)
