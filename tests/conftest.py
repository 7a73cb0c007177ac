"""Fixtures: the session's machine cache, a SuperLink on a free loopback port, Flower's warnings."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import pytest
from helpers import SimulationRunner

from fl_app.cache import CACHE_ENV
from fl_app.launch.local_superlink import LocalSuperLink


@pytest.fixture(scope="session", autouse=True)
def machine_cache(tmp_path_factory) -> Iterable[Path]:
    """The machine's cache (converted weights, activations, bases) for this session only.

    Set before any test starts a process, so SuperLinks, Ray actors and launchers
    inherit it: tests neither read a cache left by earlier sessions nor fill the user's.
    """
    folder = tmp_path_factory.mktemp("machine-cache")
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    yield folder
    if previous is None:
        del os.environ[CACHE_ENV]
    else:
        os.environ[CACHE_ENV] = previous


@pytest.fixture(scope="session")
def superlink(tmp_path_factory) -> SimulationRunner:
    """A `flower-superlink --simulation` for the session, stopped by PID at the end."""
    with LocalSuperLink(tmp_path_factory.mktemp("flwr_home")) as link:
        yield SimulationRunner(link.cli, link)


@pytest.fixture
def flwr_warnings():
    """Flower's warning lines, as log records (its logger does not propagate to caplog)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
