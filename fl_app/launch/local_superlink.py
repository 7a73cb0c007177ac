"""A local simulation SuperLink on a free loopback port, for the launcher, tests and benches."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

import psutil

from fl_app.launch import processes
from fl_app.launch.flower_cli import (
    FlowerCLI,
    FlowerCLIError,
    superlink_healthy,
    write_connection,
)

FLOWER_SUPERLINK = str(processes.BIN / "flower-superlink")


class LocalSuperLink:
    """A ``flower-superlink --simulation`` on a free loopback port, as a context manager.

    It runs ClientApps in this interpreter's environment (no per-run dependency
    install), in its own session (a terminal's Ctrl-C reaches only us). On exit
    it stops unfinished runs, then the SuperLink, then whatever the SuperLink
    started that is still there (a stopped run's simulation and Ray processes
    outlive it otherwise).

    Parameters
    ----------
    flwr_home : str or os.PathLike
        Its FLWR_HOME and working directory; gets ``config.toml`` (an insecure
        ``fl-app`` connection) and ``superlink.log``.
    env : Mapping, optional
        Base environment of the SuperLink and the `flwr` commands.
    timeout : float
        Seconds to wait until it answers ``/health``.
    """

    def __init__(
        self,
        flwr_home: str | os.PathLike,
        env: Mapping[str, str] | None = None,
        timeout: float = 60,
    ) -> None:
        self.flwr_home = Path(flwr_home)
        self.port = processes.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.cli = FlowerCLI(self.flwr_home, env)
        self.timeout = timeout
        self.proc: psutil.Popen | None = None
        # Everything ever seen below it: a simulation process that dies (a killed
        # ServerApp) leaves its Ray processes re-parented to init, out of its tree.
        self.below = processes.Descendants(lambda: [self.proc] if self.proc else [])

    def __enter__(self) -> LocalSuperLink:
        write_connection(self.flwr_home, self.address, insecure=True)
        log = self.flwr_home / "superlink.log"
        cmd = [
            FLOWER_SUPERLINK,
            "--insecure",
            "--simulation",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        with processes.interrupts_deferred():
            self.proc = processes.start(cmd, log=log, cwd=self.flwr_home, env=self.cli.env)
            self.below.watch()
        try:
            processes.wait_until(
                lambda: superlink_healthy(self.address),
                self.timeout,
                proc=self.proc,
                what=f"http://{self.address}/health to answer",
            )
        except processes.ProcessExitedError as err:
            self.__exit__()
            tail = log.read_text()[-2000:]
            raise processes.ProcessExitedError(f"{err}; its log ends:\n{tail}") from None
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc is None:
            return
        with processes.interrupts_deferred():
            try:
                if processes.alive(self.proc):
                    with contextlib.suppress(FlowerCLIError):
                        self.cli.stop_unfinished_runs()
            finally:
                self.below.look()
                processes.stop_tree(self.proc)
                self.proc = None
                self.below.close()
                processes.stop(p for record in self.below.records() if (p := record.process()))
