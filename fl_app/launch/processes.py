"""Start, track and stop every process fl_app runs, with psutil (Linux and macOS).

Processes are started here (`start`, `run`), remembered across processes as
`ProcessRecord` ``(pid, create_time)`` pairs that never touch a reused PID,
found below their parents with `descendants` and in their process group with
`group`, waited for with `wait_until`, and stopped with `stop`: SIGTERM, a
grace period, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

# The console scripts of the interpreter running us, not whatever PATH finds first.
BIN = Path(sys.executable).parent
# Two create times of one process may differ by float rounding, and on Linux by a
# recomputed boot time; a reused PID's process starts later than that.
SAME_START = 1.0

T = TypeVar("T")


class ProcessExitedError(RuntimeError):
    """A watched process ended while `wait_until` waited for something it should do."""


class WaitTimeoutError(RuntimeError, TimeoutError):
    """`wait_until` ran out of time."""


def process_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes: this interpreter's scripts first on PATH.

    SuperLinks and SuperNodes start ``flower-superexec``, ``flwr-serverapp`` and
    ``flwr-clientapp`` by name; this makes them the ones next to this Python.
    """
    env = dict(env if env is not None else os.environ)
    path = env.get("PATH", "")
    if path.split(os.pathsep)[0] != str(BIN):
        env["PATH"] = os.pathsep.join([str(BIN), path]) if path else str(BIN)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start(
    cmd: Sequence[str],
    log: str | os.PathLike | None = None,
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    own_session: bool = True,
    capture: bool = False,
) -> psutil.Popen:
    """Start ``cmd`` in the background; return its process.

    Parameters
    ----------
    cmd : sequence of str
        The argv.
    log : str or os.PathLike, optional
        File that gets its stdout and stderr (appended; folders created);
        default: discarded.
    cwd : str or os.PathLike, optional
        Its working directory.
    env : Mapping, optional
        Its environment (default: this process's), with this interpreter's
        scripts first on PATH (see `process_env`).
    own_session : bool
        Start it in a new session: a terminal's Ctrl-C, which goes to our
        process group, does not reach it; whoever started it stops it.
    capture : bool
        Give it a text pipe as stdout (and stderr), to read as ``proc.stdout``;
        ``log`` is ignored then.

    Returns
    -------
    psutil.Popen
        Both a `subprocess.Popen` and a `psutil.Process`.
    """
    kwargs: dict[str, Any] = {
        "cwd": cwd,
        "env": process_env(env),
        "stdin": subprocess.DEVNULL,
        "stderr": subprocess.STDOUT,
        "start_new_session": own_session,
    }
    if capture:
        return psutil.Popen(list(cmd), stdout=subprocess.PIPE, text=True, **kwargs)
    if log is None:
        return psutil.Popen(list(cmd), stdout=subprocess.DEVNULL, **kwargs)
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return psutil.Popen(list(cmd), stdout=out, **kwargs)


def run(
    cmd: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run ``cmd`` to its end and capture its output as text (killed after ``timeout``)."""
    return subprocess.run(
        list(cmd),
        env=process_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def alive(proc: psutil.Process) -> bool:
    """Whether ``proc`` still runs (a zombie has exited: only its parent's wait is missing)."""
    if isinstance(proc, psutil.Popen):
        return proc.poll() is None  # also reaps our own child
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def descendants(proc: psutil.Process | int) -> list[psutil.Process]:
    """Every process below ``proc`` (children, their children, ...); empty if it ended."""
    try:
        if not isinstance(proc, psutil.Process):
            proc = psutil.Process(proc)
        return proc.children(recursive=True)
    except psutil.Error:
        return []


@dataclass(frozen=True)
class ProcessRecord:
    """A process as a state file keeps it: its PID and when it started.

    The start time tells the process apart from a later one that got the same
    PID: `process` returns ``None`` then, so nothing is ever sent to it.
    """

    pid: int
    create_time: float

    @classmethod
    def of(cls, proc: psutil.Process | int) -> ProcessRecord | None:
        """The record of a running process; ``None`` if it has ended."""
        try:
            if not isinstance(proc, psutil.Process):
                proc = psutil.Process(proc)
            return cls(proc.pid, proc.create_time())
        except psutil.Error:
            return None

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> ProcessRecord | None:
        """Read ``{"pid": ..., "create_time": ...}``; ``None`` if either is missing."""
        if not data or data.get("pid") is None or data.get("create_time") is None:
            return None
        return cls(int(data["pid"]), float(data["create_time"]))

    def to_json(self) -> dict[str, Any]:
        """``{"pid": ..., "create_time": ...}``."""
        return {"pid": self.pid, "create_time": self.create_time}

    def process(self) -> psutil.Process | None:
        """The process if it still runs and is the one recorded, else ``None``."""
        try:
            proc = psutil.Process(self.pid)
            same = abs(proc.create_time() - self.create_time) < SAME_START
        except psutil.Error:
            return None
        return proc if same and alive(proc) else None


def stop(processes: Iterable[psutil.Process], timeout: float = 15) -> list[psutil.Process]:
    """Stop processes: SIGTERM all, wait up to ``timeout``, SIGKILL the rest, wait again.

    psutil refuses to signal a `psutil.Process` whose PID now names another
    process, so a stale handle is safe to pass.

    Returns
    -------
    list of psutil.Process
        Those still running at the end (none, unless they are not ours to kill).
    """
    remaining = [p for p in processes if alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in remaining:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        deadline = time.monotonic() + timeout
        # In short waits: an orphan that exited stays a zombie where nothing reaps it
        # (PID 1 of some containers), which psutil would wait for to the end.
        while remaining and time.monotonic() < deadline:
            _, remaining = psutil.wait_procs(remaining, min(0.2, timeout))
            remaining = [p for p in remaining if alive(p)]
        if not remaining:
            break
    return remaining


def stop_tree(proc: psutil.Process, timeout: float = 15) -> list[psutil.Process]:
    """Stop ``proc`` first (it may stop its own children), then what was below it."""
    below = descendants(proc)
    return stop([proc], timeout) + stop(below, timeout)


def group(leader: ProcessRecord) -> list[psutil.Process]:
    """The running processes of the process group that ``leader`` leads, itself included.

    `start` puts each process in its own session, so it leads a group that its
    children, and theirs, join, and stay in after their parent has gone
    (re-parented orphans are no longer below anything). POSIX never reuses a
    group's ID while the group has members, so a group whose leader has ended
    is still recognised; a leader's PID that now names another process means
    the group has ended.
    """
    return in_groups([leader])


def in_groups(leaders: Iterable[ProcessRecord]) -> list[psutil.Process]:
    """The running processes of the groups the recorded processes lead, those included.

    A recorded process that leads no group stands for itself (see `group`).
    """
    ours: dict[int, ProcessRecord] = {}
    found: dict[int, psutil.Process] = {}
    for leader in leaders:
        try:
            proc = psutil.Process(leader.pid)
            if abs(proc.create_time() - leader.create_time) >= SAME_START:
                continue  # the PID names another process now
            if alive(proc):
                found[proc.pid] = proc
        except psutil.Error:
            pass
        ours[leader.pid] = leader
    for proc in psutil.process_iter() if ours else ():
        try:
            leader = ours.get(os.getpgid(proc.pid))
            # A member started after its leader: a cheap guard on top of POSIX's promise.
            if leader and proc.create_time() > leader.create_time - SAME_START and alive(proc):
                found.setdefault(proc.pid, proc)
        except (OSError, psutil.Error):
            continue
    return list(found.values())


def stop_group(leader: ProcessRecord, timeout: float = 15) -> list[psutil.Process]:
    """Stop ``leader`` first (it may stop its own children), then the rest of its group.

    Returns
    -------
    list of psutil.Process
        Those still running at the end.
    """
    members = group(leader)
    left = stop([p for p in members if p.pid == leader.pid], timeout)
    # Members it did not stop, and any it started meanwhile.
    rest = {p.pid: p for p in [*members, *group(leader)] if p.pid != leader.pid}
    return left + stop(rest.values(), timeout)


class Descendants:
    """Every process ever seen below some processes, kept as records; optionally watched.

    A process that outlives its parent is re-parented (to init or a subreaper)
    and no longer below it; here it stays, to be stopped with the rest.

    Parameters
    ----------
    tops : callable
        Returns the processes to look below (they may change over time).
    interval : float
        Seconds between looks of `watch`'s thread.
    """

    def __init__(self, tops: Callable[[], Iterable[psutil.Process]], interval: float = 2.0) -> None:
        self.tops = tops
        self.interval = interval
        self._seen: dict[int, ProcessRecord] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def look(self) -> None:
        """Record every process below the tops now."""
        for top in self.tops():
            self.add(map(ProcessRecord.of, descendants(top)))

    def add(self, records: Iterable[ProcessRecord | None]) -> None:
        """Remember more processes (``None`` entries are skipped)."""
        with self._lock:
            for record in records:
                if record is not None:
                    self._seen.setdefault(record.pid, record)

    def watch(self) -> None:
        """Look every `interval` seconds in a daemon thread, until `close`."""
        self._stop.clear()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(psutil.Error, OSError):
                self.look()

    def close(self) -> None:
        """Stop watching."""
        self._stop.set()

    def records(self) -> list[ProcessRecord]:
        """All processes seen so far, running or not."""
        with self._lock:
            return list(self._seen.values())


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    proc: psutil.Process | Sequence[psutil.Process] | None = None,
    what: str = "the condition",
    interval: float = 0.3,
) -> T:
    """Poll ``predicate`` until it returns something true; return that.

    Parameters
    ----------
    predicate : callable
        Checked every ``interval`` seconds (it should not raise for "not yet").
    timeout : float
        Seconds to wait at most.
    proc : psutil.Process or sequence of them, optional
        Processes that must keep running: if one exits, waiting is pointless.
    what : str
        What is awaited, for the messages ("waiting for <what>").
    interval : float
        Seconds between checks.

    Raises
    ------
    ProcessExitedError
        If one of ``proc`` exited first.
    WaitTimeoutError
        If ``predicate`` was not true in time (a `RuntimeError` and a `TimeoutError`).
    """
    watched = [proc] if isinstance(proc, psutil.Process) else list(proc or ())
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        for p in watched:
            if not alive(p):
                code = f" with code {p.returncode}" if isinstance(p, psutil.Popen) else ""
                raise ProcessExitedError(
                    f"{_name(p)} (pid {p.pid}) exited{code} while waiting for {what}"
                )
        if time.monotonic() > deadline:
            raise WaitTimeoutError(f"still waiting for {what} after {timeout:.0f} s")
        time.sleep(interval)


def describe(procs: Sequence[psutil.Process]) -> str:
    """``PID 123 (flwr-clientapp), ...``: processes for a message."""
    names = []
    for proc in procs:
        try:
            names.append(f"PID {proc.pid} ({proc.name()})")
        except psutil.Error:
            names.append(f"PID {proc.pid}")
    return ", ".join(names)


def _name(proc: psutil.Process) -> str:
    if isinstance(proc, psutil.Popen):
        return Path(str(proc.args[0])).name
    try:
        return proc.name()
    except psutil.Error:
        return "process"


def listening_on(port: int) -> psutil.Process | None:
    """The process with a TCP socket listening on ``port``, if we may see it."""
    try:
        pids = [c.pid for c in psutil.net_connections(kind="tcp") if _listens(c, port)]
    except psutil.AccessDenied:  # macOS, unless root: ask each process instead
        pids = [p.pid for p in psutil.process_iter() if any(_listens(c, port) for c in _tcp(p))]
    for pid in pids:
        if pid is not None:
            with contextlib.suppress(psutil.Error):
                return psutil.Process(pid)
    return None


def _listens(conn: Any, port: int) -> bool:
    return conn.status == psutil.CONN_LISTEN and bool(conn.laddr) and conn.laddr.port == port


def _tcp(proc: psutil.Process) -> list[Any]:
    try:
        return proc.net_connections(kind="tcp")
    except psutil.Error:
        return []


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back until the block ends, then raise it.

    For starting a process and recording it, and for stopping processes: an
    interrupt in between would leave a process nobody tracks. Outside the main
    thread (where signals cannot be handled) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and callable(previous):
        previous(signal.SIGINT, None)  # Python's own handler raises KeyboardInterrupt
    elif received and previous == signal.SIG_DFL:
        signal.raise_signal(signal.SIGINT)
