"""What a real federation does when its processes die: SuperNodes, the SuperLink, restarts.

One module-scoped `LocalFederation` (TLS, node authentication, a SuperLink with
``--database``) of 3 SuperNodes on loopback; the tests kill its processes by PID
with SIGKILL, as a crash or a power cut would, and bring them back with
`LocalFederation.restart_node` / `restart_superlink` and ``fl-app local
restart``. They run in file order and each leaves all 3 nodes online (the
`repaired` fixture restarts what a failed test left dead); the last one takes the
federation down through the command line and checks, by the recorded PIDs and
process groups, that nothing is left. Five runs in all, 8-9 minutes on 2 cores, most
of it Flower's own timing (a dead node is noticed after up to 60 s). Only the last
test runs in `make test` (CI); the kills are `slow` (`make test-faults`).
Timings are printed (``pytest -s``): they are the numbers of the fault table in
docs/deployment.md.

Flower 1.42 facts these tests pin down: a node killed without leaving stays
"online" until it has missed two heartbeats (<= 60 s), then every message to it
gets a "Node Unavailable" error reply; until then the SuperLink refuses to
activate its key again. SuperNodes retry a lost SuperLink without limit, and
one restarted on its database knows their keys. A run whose SuperLink dies
ends (its ServerApp leaves with it, or hangs on its way out until stopped; the
restarted SuperLink marks the run failed when its heartbeat is missed), and
``resume`` continues it from its run folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from helpers import FinishedRun, log_lines, require_fashion_mnist
from test_deployment import REPO, RUN_CONFIG, fl_app, one_error_line, recorded, run_app
from test_processes import TREE

from fl_app.data import prepare_node_dirs
from fl_app.deploy.federation_state import NodeProcess
from fl_app.deploy.local_federation import LocalFederation
from fl_app.launch import processes
from fl_app.launch.flower_cli import RunStatus
from fl_app.launch.processes import ProcessRecord

# Flower's own id in the messages the SuperLink makes (flwr.common.constant.SUPERLINK_NODE_ID).
SUPERLINK_NODE_ID = 1
# A faulty run that hangs is stopped through the SuperLink after this many seconds.
WATCHDOG = 420


def test_orphans_are_found_in_their_process_group_and_stopped(tmp_path):
    """A killed parent leaves its children to init: no longer below it, still in its group."""
    proc = processes.start([sys.executable, "-c", TREE, "0", TREE], log=tmp_path / "tree.log")
    leader = ProcessRecord.of(proc)
    try:
        below = processes.wait_until(
            lambda: len(found := processes.descendants(proc)) == 2 and found, 30, proc, "children"
        )
        proc.kill()
        proc.wait()
        assert below[0].ppid() != proc.pid and processes.descendants(proc) == []
        assert {p.pid for p in processes.group(leader)} == {p.pid for p in below}
        # A record whose PID now names another process (here: this one) has no group.
        me = ProcessRecord.of(os.getpid())
        assert processes.group(ProcessRecord(me.pid, me.create_time - 3600)) == []
        # A recorded process that leads no group stands for itself.
        assert [p.pid for p in processes.in_groups([ProcessRecord.of(below[1])])] == [below[1].pid]
        assert processes.stop_group(leader, timeout=10) == []
        assert not any(map(processes.alive, below)) and processes.group(leader) == []
    finally:
        processes.stop(processes.group(leader), timeout=5)


def test_local_restart_of_something_unknown_is_one_error_line(tmp_path):
    line = one_error_line(fl_app("local", "restart", "--dir", tmp_path, "node-0"))
    assert line == f"error: {tmp_path / 'federation.json'} is not a file: expected the state" + (
        " of a federation `up`"
    )
    node = {"name": "node-0", "pid": None, "create_time": None, "port": 1, "key": "k"}
    node |= {"data_dir": str(tmp_path), "log": str(tmp_path / "log")}
    (tmp_path / "federation.json").write_text(json.dumps({"supernodes": [node]}))
    line = one_error_line(fl_app("local", "restart", "--dir", tmp_path, "node-9"))
    assert line == "error: 'node-9' is not a process of this federation: expected superlink, node-0"


class LiveRun:
    """A submitted run whose log is followed in a thread, every line stamped on arrival.

    The tests act on what the run says (kill a node when round 2 starts) and
    time its phases from the stamps.
    """

    def __init__(self, fed: LocalFederation, tmp: Path, overrides: dict[str, object]) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.fed = fed
        self.run_dir = tmp / "run"
        self.lines: list[tuple[float, str]] = []
        self.run_id = fed.cli.submit(
            REPO,
            {**RUN_CONFIG, "results-dir": str(self.run_dir), **overrides},
            config_file=tmp / "run_config.toml",
        )
        self.watchdog = threading.Timer(WATCHDOG, fed.cli.stop, [self.run_id])
        self.watchdog.start()
        self.thread = threading.Thread(target=fed.cli.follow, args=(self.run_id, self))
        self.thread.start()

    def write(self, text: str) -> None:
        now = time.monotonic()
        for line in text.splitlines():
            self.lines.append((now, re.sub(r"\x1b\[[0-9;]*m", "", line)))

    def flush(self) -> None:
        pass

    @property
    def log(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def when(self, pattern: str, after: float = 0.0) -> float | None:
        """When the first line matching ``pattern`` (at or after ``after``) arrived."""
        return next((t for t, line in self.lines if t >= after and re.search(pattern, line)), None)

    def wait_for(self, pattern: str, timeout: float = 300) -> float:
        """Wait until a line matches ``pattern``; when it arrived."""
        deadline = time.monotonic() + timeout
        while (found := self.when(pattern)) is None:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                pytest.fail(f"the run never logged /{pattern}/:\n{self.log[-3000:]}")
            time.sleep(0.2)
        return found

    def stop_following(self) -> None:
        """Wait for the end of its log (or of the `flwr log` that follows it)."""
        self.thread.join(WATCHDOG)
        self.watchdog.cancel()

    def finish(self) -> FinishedRun:
        """Wait for the end of its log and its final status."""
        self.stop_following()
        status = self.fed.cli.wait(self.run_id)
        return FinishedRun(self.run_id, status.status, status.details, self.log, self.run_dir)


def kill(node: NodeProcess) -> float:
    """SIGKILL a SuperNode's own process (not its group, as a crash of it would); when."""
    assert node.proc is not None and node.running()
    node.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    node.proc.wait(10)
    return killed


def rounds_of(run: FinishedRun) -> list[dict]:
    return json.loads((run.run_dir / "metrics.json").read_text())["rounds"]


def names_superlink(log: str) -> list[str]:
    """Lines that blame Flower's SuperLink id for a node's reply."""
    return log_lines(log, rf"(reply from node|node\(s\)) {SUPERLINK_NODE_ID}\b")


def all_online(fed: LocalFederation) -> bool:
    status = fed.cli.supernodes()
    return all(status.get(n.node_id) == "online" for n in fed.nodes) and len(status) == 3


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A TLS SuperLink with node auth and a database, and 3 registered SuperNodes."""
    require_fashion_mnist()
    root = tmp_path_factory.mktemp("faults")
    data_dirs = prepare_node_dirs(root / "data", 3, max_examples=64)
    # `down` on leaving raises if any process it started is still running.
    with LocalFederation(root / "federation", 3, data_dirs=data_dirs, timeout=180) as fed:
        yield fed


@pytest.fixture(autouse=True)
def repaired(request):
    """Leave the federation whole for the next test, whatever this one did to it."""
    yield
    if "federation" not in request.fixturenames:
        return
    federation = request.getfixturevalue("federation")
    if json.loads(federation.state_file.read_text()).get("stopped"):
        return
    if federation.superlink is None or not processes.alive(federation.superlink):
        federation.restart_superlink()
    for node in federation.nodes:
        if not node.running():
            federation.restart_node(node, wait=False)
    federation.wait_online()


def member(record: ProcessRecord, name: str) -> bool:
    """Whether a process called ``name`` is in the process group ``record`` leads."""
    return any(p.name() == name for p in processes.group(record))


@pytest.mark.e2e
@pytest.mark.slow
def test_a_killed_supernode_is_left_out_then_rejoins_after_a_restart(federation, tmp_path):
    node = federation.nodes[1]
    old = node.record
    assert old is not None
    run = LiveRun(
        federation,
        tmp_path,
        {
            "num-server-rounds": 3,
            "head-rounds": 3,
            # Above Flower's heartbeat patience (60 s): the heartbeat finds the dead node.
            "round-timeout": 90,
            # Round 3 waits for the restarted node, so it takes part in it.
            "min-available-nodes": 3,
            "wait-for-nodes-timeout": 180,
        },
    )
    try:
        run.wait_for(r"Round 2: phase")
        # Killed while its ClientApp trains on the round's message.
        processes.wait_until(lambda: member(old, "flwr-clientapp"), 60, what="a ClientApp")
        killed = kill(node)
        # Its SuperExec and ClientApp outlive it, orphaned, in its group.
        left_behind = [p.name() for p in processes.group(old)]
        # Restarted once round 2 has given up on it: a node back under its id before the
        # ServerApp learns that it went offline hides the loss, and the round waits for
        # round-timeout (the message its dead process took is never answered).
        given_up = run.wait_for(rf"Round 2: rejected reply from node {node.node_id}\b")
        federation.restart_node(node)
        back = time.monotonic() - killed
        assert processes.group(old) == []  # the restart stopped what the dead node left
    finally:
        done = run.finish()

    assert done.status == "finished:completed", done.details + done.log[-3000:]
    r1, r2, r3 = rounds_of(done)[1:]
    # Round 2 went on with the other two once Flower's heartbeat found the dead node: its
    # message got a "Node Unavailable" error reply, blamed on it, not on the SuperLink.
    assert r2["train_replies"] == 2 and r2["model_updated"]
    assert r2["rejected_replies"] == 1 and r2["missing_replies"] == 0
    unavailable = (
        rf"Round 2: rejected reply from node {node.node_id}: client error 5: .*Node Unavailable"
    )
    assert log_lines(done.log, unavailable), done.log[-3000:]
    assert not names_superlink(done.log)
    # Back in round 3, with its base sent again (the server forgot it when it failed).
    assert r3["train_replies"] == 3 and r3["rejected_replies"] == 0
    assert r2["bases_sent"] + r3["bases_sent"] >= 1
    assert node.record != old and node.node_id in federation.cli.supernodes()

    train = {}
    for n in (2, 3):
        start = run.when(rf"Round {n}: phase")
        train[n] = run.when(r"configure_evaluate", after=start) - start
    print(
        f"\n[fault a] node {node.name} killed in round 2; left in its group: {left_behind};"
        f" round 2 gave up on it {given_up - killed:.1f} s after the kill; restarted and"
        f" online {back:.1f} s after the kill. Train phase: round 2 (dead node)"
        f" {train[2]:.1f} s, round 3 {train[3]:.1f} s; round_time r1 {r1['round_time']:.1f},"
        f" r2 {r2['round_time']:.1f}, r3 {r3['round_time']:.1f} s;"
        f" round 2 missing {r2['missing_replies']}, rejected {r2['rejected_replies']}"
    )


@pytest.mark.e2e
@pytest.mark.slow
def test_two_killed_supernodes_keep_the_model_and_the_run_fails_clearly(federation, tmp_path):
    dead = federation.nodes[1:]
    run = LiveRun(
        federation,
        tmp_path,
        {
            "num-server-rounds": 2,
            "head-rounds": 2,
            "round-timeout": 30,
            "min-train-nodes": 2,
            "min-available-nodes": 2,
            "wait-for-nodes-timeout": 5,
        },
    )
    try:
        started = run.wait_for(r"Round 1: phase")
        killed = [kill(n) for n in dead]
    finally:
        done = run.finish()
    ended = time.monotonic()
    try:
        assert done.status == "finished:failed", done.details + done.log[-3000:]
        assert log_lines(done.log, r"Round 1: .* valid replies \(minimum 2\); keeping the previous")
        waited = log_lines(
            done.log,
            r"only 1 of the 2 nodes needed \(min-available-nodes\) are connected after "
            r"wait-for-nodes-timeout=5 s",
        )
        assert waited, done.log[-3000:]
        assert not names_superlink(done.log)
        metrics = json.loads((done.run_dir / "metrics.json").read_text())
        assert metrics["status"] == "failed"
        r1 = metrics["rounds"][1]
        assert not r1["model_updated"] and r1["train_replies"] <= 1
        assert r1["missing_replies"] >= 2  # both dead nodes, within round-timeout
    finally:
        again = time.monotonic()
        for node in dead:
            federation.restart_node(node, wait=False)
        federation.wait_online()
    print(
        f"\n[fault b] 2 of 3 killed {killed[0] - started:.1f} s into round 1: the run failed"
        f" {ended - killed[0]:.0f} s after the kill (round-timeout 30, wait-for-nodes-timeout"
        f" 5); both restarted and online {time.monotonic() - again:.1f} s later;"
        f" round 1 missing {r1['missing_replies']}, round_time {r1['round_time']:.1f} s"
    )


@dataclass
class SuperLinkCrash:
    """A run whose SuperLink was killed in round 2, the restart, and the resumed run."""

    ids: dict[str, int | None]
    records: dict[str, ProcessRecord | None]
    below: list[psutil.Process]
    orphans: list[str]
    outcome: dict[str, str]
    back: float
    run_dir: Path
    resumed: FinishedRun
    interrupted: RunStatus
    # Each node's cached activations (path -> inode) before and after the resumed run.
    features: tuple[dict[str, int], dict[str, int]]


@pytest.fixture(scope="module")
def superlink_crash(federation, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("superlink-crash")
    ids = {n.name: n.node_id for n in federation.nodes}
    records = {n.name: n.record for n in federation.nodes}
    config = {"num-server-rounds": 2, "head-rounds": 2, "min-available-nodes": 3}
    run = LiveRun(federation, tmp / "first", config)
    try:
        # Round 1 is checkpointed: every node holds its base and has cached activations.
        run.wait_for(r"Round 2: phase")
        superlink = federation.superlink
        below = processes.descendants(superlink)  # its SuperExec and the ServerApp
        superlink.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        superlink.wait(10)
        # Flower's SuperExec and ServerApp watch their parent and leave with it; the
        # ServerApp's way out may hang while it cannot reach the SuperLink.
        with contextlib.suppress(processes.WaitTimeoutError):
            processes.wait_until(lambda: not any(map(processes.alive, below)), 5, what="exit")
        orphans = [p.name() for p in below if processes.alive(p)]
        outcome = federation.restart_superlink()  # stops them
        back = time.monotonic() - killed
    finally:
        run.stop_following()  # `flwr log` ended with the SuperLink
    # The interrupted run cannot go on; its run folder can.
    (tmp / "resume").mkdir()
    before = cached_features(federation)
    resumed = run_app(federation, tmp / "resume", {**config, "resume": str(run.run_dir)})
    interrupted = federation.cli.wait(run.run_id, timeout=120)
    features = (before, cached_features(federation))
    return SuperLinkCrash(
        ids, records, below, orphans, outcome, back, run.run_dir, resumed, interrupted, features
    )


def cached_features(federation: LocalFederation) -> dict[str, int]:
    """Every node's cached activation files, by path, with their inodes.

    A hit only touches a file (its mtime orders eviction); a recomputed entry is
    written anew and renamed into place, with a new inode.
    """
    files = (federation.directory / "cache").glob("*/features/*")
    return {str(path): path.stat().st_ino for path in files}


@pytest.mark.e2e
@pytest.mark.slow
def test_a_killed_superlink_restarts_on_its_database_and_the_run_resumes(
    federation, superlink_crash
):
    crash = superlink_crash
    assert not any(map(processes.alive, crash.below))  # the restart stopped the old ServerApp
    # The nodes never stopped: they reconnected by themselves, with their registered keys.
    assert crash.outcome == dict.fromkeys(crash.ids, "reconnected")
    assert {n.name: n.record for n in federation.nodes} == crash.records
    assert {n.name: n.node_id for n in federation.nodes} == crash.ids
    assert sorted(federation.cli.supernodes()) == sorted(crash.ids.values())
    reconnected = {
        n.name: float(m[-1])
        for n in federation.nodes
        if (m := re.findall(r"Connection successful after ([0-9.]+) seconds", n.log.read_text()))
    }
    # The interrupted run failed once its heartbeat was missed; `resume` finished it.
    assert crash.interrupted.status == "finished:failed", crash.interrupted
    assert "heartbeat" in crash.interrupted.details.lower()
    resumed = crash.resumed
    assert resumed.status == "finished:completed", resumed.details + resumed.log[-3000:]
    assert log_lines(resumed.log, r"Resuming .* after round 1 of 2")
    metrics = json.loads((crash.run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["rounds"][-1]["round"] == 2
    # The same nodes under the same ids: they kept their bases and cached activations
    # across the crash, so the resumed round sent no base and computed nothing again.
    assert metrics["rounds"][1]["bases_sent"] == 3
    assert metrics["rounds"][-1]["train_replies"] == 3
    assert metrics["rounds"][-1]["bases_sent"] == 0, metrics["rounds"][-1]
    before, after = crash.features
    assert before and after == before
    print(
        f"\n[fault c] SuperLink killed in round 2: still running 5 s later: {crash.orphans};"
        f" SuperLink back and nodes online {crash.back:.1f} s after the kill; nodes"
        f" reconnected by themselves after {reconnected} s; the interrupted run:"
        f" {crash.interrupted.status} ({crash.interrupted.details}); resume completed"
    )


@pytest.mark.e2e
@pytest.mark.slow
def test_a_resumed_run_records_each_round_once(superlink_crash):
    metrics = json.loads((superlink_crash.run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]


@pytest.mark.e2e
def test_local_restart_and_down_through_the_command_line(federation):
    directory = federation.directory
    node = federation.node("node-0")
    old_node, old_superlink = node.record, federation.state.superlink_record

    started = time.monotonic()
    done = fl_app("local", "restart", "--dir", directory, "node-0")
    node_restart = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"node-0  node id {node.node_id}  online again" in done.stdout
    federation.reload()  # the command changed the state file
    assert federation.node("node-0").record != old_node and processes.group(old_node) == []

    started = time.monotonic()
    done = fl_app("local", "restart", "--dir", directory, "superlink")
    superlink_restart = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("reconnected") == 3, done.stdout
    federation.reload()
    assert federation.state.superlink_record != old_superlink
    assert processes.group(old_superlink) == []
    assert all_online(federation)

    # Everything ever started, by PID and start time: the replaced processes too.
    records = recorded(federation.state_file)
    state = json.loads(federation.state_file.read_text())
    records += [r for r in map(ProcessRecord.from_json, state["groups"]) if r is not None]
    assert {old_node, old_superlink} <= set(records)
    started = time.monotonic()
    done = fl_app("local", "down", "--dir", directory)
    down = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no process it started is left" in done.stdout
    assert processes.in_groups(records) == []
    print(
        f"\n[fault d] `fl-app local restart node-0` {node_restart:.1f} s, `... superlink`"
        f" {superlink_restart:.1f} s, `fl-app local down` {down:.1f} s"
    )
