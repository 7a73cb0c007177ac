"""What the benchmark and report programs of scripts/ share: runs of fl_app, measures, reports.

Not part of the installed package: ``python scripts/<name>.py`` puts scripts/ first on
sys.path, so the programs import this module by its plain name.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from fl_app.config import RunConfig
from fl_app.launch.local_superlink import LocalSuperLink
from fl_app.launch.processes import descendants

if TYPE_CHECKING:
    import keras  # imported when needed: --help should not wait for TensorFlow

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
GIB = 2**30


def run_launcher(name: str, overrides: list[str], job_dir: Path, keep_log: bool = False) -> float:
    """Run one job of fl_app's Hydra launcher into ``job_dir``; its wall time in seconds.

    A fresh process per job, as a user's would be. With ``keep_log`` its output
    goes to ``job_dir/launcher.log``. Raises ``RuntimeError`` naming ``name`` when
    the job fails.
    """
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "fl_app.launch.experiment", *overrides, f"hydra.run.dir={job_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if keep_log:
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "launcher.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall


def parse_with_smallest(
    parser: argparse.ArgumentParser, smallest: Mapping[str, Any]
) -> argparse.Namespace:
    """Parse argv with a ``--smallest`` flag that sets every option of ``smallest`` (CI size)."""
    parser.add_argument(
        "--smallest",
        action="store_true",
        help="CI size: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in smallest.items()),
    )
    args = parser.parse_args()
    if args.smallest:
        for key, value in smallest.items():
            setattr(args, key, value)
    return args


def write_report(args: argparse.Namespace, machine: Mapping[str, Any], **parts: Any) -> None:
    """Write ``args.json``: the machine, the arguments (paths as text), then ``parts``."""
    args.json.parent.mkdir(parents=True, exist_ok=True)
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.json.write_text(json.dumps({"machine": machine, "args": arguments, **parts}, indent=2))
    print(f"\nwrote {args.json}")


class TreeRSS:
    """Peak of the summed RSS of a process and all its descendants, sampled with psutil.

    ``peak_by_name`` splits the peak by process name. With ``pss`` it sums each
    process's proportional set size instead: a page shared by n processes (TensorFlow's
    libraries, a memory-mapped file) counts 1/n in each, so once in the sum (Linux only).
    """

    def __init__(self, proc: psutil.Process, interval: float = 0.5, pss: bool = False) -> None:
        self.proc = proc
        self.interval = interval
        self.pss = pss
        self.peak = 0
        self.peak_by_name: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> TreeRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while True:
            by_name = self.sample()
            if sum(by_name.values()) > self.peak:
                self.peak, self.peak_by_name = sum(by_name.values()), by_name
            if self._stop.wait(self.interval):
                return

    def sample(self) -> dict[str, int]:
        """Bytes resident now by process name (RSS: shared pages count in each process)."""
        by_name: dict[str, int] = {}
        for proc in (self.proc, *descendants(self.proc)):
            try:
                rss = proc.memory_full_info().pss if self.pss else proc.memory_info().rss
                name = proc.name()
            except psutil.Error:
                continue  # the process ended while we looked
            by_name[name] = by_name.get(name, 0) + rss
        return by_name


def baseline_app(root: Path) -> Path:
    """A copy of this app whose ClientApp is the quickstart-style baseline."""
    app_dir = root / "baseline-app"
    shutil.copytree(
        REPO / "fl_app", app_dir / "fl_app", ignore=shutil.ignore_patterns("__pycache__")
    )
    # Into the copied package: the app's FAB holds fl_app's modules (fab-include).
    shutil.copy2(SCRIPTS / "baseline_client.py", app_dir / "fl_app" / "baseline_client.py")
    for name in ("README.md", "LICENSE"):  # the files beside fl_app that its FAB holds
        shutil.copy2(REPO / name, app_dir / name)
    ours = 'clientapp = "fl_app.client_app:app"'
    pyproject = (REPO / "pyproject.toml").read_text()
    if ours not in pyproject:
        raise RuntimeError(f"pyproject.toml has no line {ours!r} to point at the baseline")
    baseline = pyproject.replace(ours, 'clientapp = "fl_app.baseline_client:app"')
    (app_dir / "pyproject.toml").write_text(baseline)
    return app_dir


def run_app(
    out: Path,
    app_dir: Path,
    run_config: Mapping[str, Any],
    num_supernodes: int,
    env: Mapping[str, str] | None = None,
    federation: Mapping[str, Any] | None = None,
    pss: bool = False,
) -> dict[str, Any]:
    """One run on a fresh local SuperLink: rounds, wall time, peak tree RSS (``peak_rss``).

    With ``pss`` the peak is of PSS instead (``peak_pss``, see `TreeRSS`).

    ``env`` is the environment of the SuperLink and all it starts (default: this
    process's); ``federation`` adds simulation settings (``client-resources-num-cpus``...).
    """
    out.mkdir(parents=True)
    log_file = out / "flower.log"
    with LocalSuperLink(out / "flwr_home", env) as link, TreeRSS(link.proc, pss=pss) as rss:
        started = time.monotonic()
        run_id = link.cli.submit(
            app_dir,
            {**run_config, "results-dir": str(out / "run")},
            {"num-supernodes": num_supernodes, **(federation or {})},
            config_file=out / "run_config.toml",
        )
        with log_file.open("w") as log:
            link.cli.follow(run_id, log)
        status = link.cli.wait(run_id)
        wall_time = time.monotonic() - started
    if not status.completed:
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"run {run_id} {status.status}: {status.details}\n{tail}")
    rounds = json.loads((out / "run" / "metrics.json").read_text())["rounds"][1:]
    measure = "pss" if pss else "rss"
    return {
        "rounds": rounds,
        "wall_time": wall_time,
        f"peak_{measure}": rss.peak,
        f"peak_{measure}_by_process": rss.peak_by_name,
    }


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import flwr
    import keras

    # macOS has no CPU affinity: every CPU is usable there.
    affinity = getattr(psutil.Process(), "cpu_affinity", lambda: None)()
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(affinity) if affinity else os.cpu_count(),
        "memory_gib": psutil.virtual_memory().total / GIB,
        "load_average": os.getloadavg(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "flwr": flwr.__version__,
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
    }


def save_start_weights(
    config: RunConfig, image_shape: tuple[int, ...], num_classes: int, path: Path
) -> keras.Model:
    """Build the ServerApp's initial model for ``config`` and save its weights to ``path``.

    Runs that pass ``weights=<path>`` start from the same weights: a random init drawn
    in each ServerApp may differ.

    Returns
    -------
    keras.Model
        The model whose weights were saved.
    """
    from fl_app.model.initial import initial_model

    model, _ = initial_model(config, image_shape, num_classes)
    model.save_weights(path)
    return model
