"""Experiment launcher: compose a Hydra config, run it with `flwr run`, collect results.

``python -m fl_app.launch.experiment [key=value ...]`` runs one experiment;
``-m key=a,b ...`` sweeps every combination and ends with ``summary.csv`` and
``accuracy.png`` in the sweep folder. Every job's config is checked before the
first one starts; a bad key or value stops the launcher with one line.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import MISSING, DictConfig, OmegaConf

from fl_app.config import LAUNCHER, RunConfig, flower_key
from fl_app.config import fields as config_fields
from fl_app.launch.flower_cli import (
    FlowerCLI,
    FlowerCLIError,
    RunStatus,
    split_host_port,
    write_connection,
)
from fl_app.launch.local_superlink import LocalSuperLink
from fl_app.launch.sweep import check_target_accuracy, summarize_sweep, summary_table
from fl_app.run_folder import METRICS
from fl_app.values import DATASETS, NO_TEST_DATA

APP_DIR = Path(__file__).resolve().parents[2]
CONF_DIR = APP_DIR / "conf"
FEDERATION_KINDS = ("simulation", "ray-cluster", "deployment")
# Kinds the launcher runs on its own local SuperLink, on Flower's Ray simulation engine.
SIMULATION_KINDS = ("simulation", "ray-cluster")
# Run-config keys that may name a file or folder on the launcher's machine.
PATH_KEYS = ("dataset", "test-data", "classes", "resume")

log = logging.getLogger(__name__)
# Outcome of every job this process ran; the exit code is read from it.
_outcomes: list[str] = []


@dataclass
class FederationConfig:
    """Where a run goes: a local simulation or a SuperLink of a deployment."""

    kind: str = MISSING
    # simulation
    num_supernodes: int = 2
    client_num_cpus: int = 2
    client_num_gpus: float = 0.0
    # ray-cluster: the simulation's actors run on a Ray cluster started with `ray start`
    ray_address: str | None = None
    # deployment
    address: str | None = None
    insecure: bool = False
    root_certificates: str | None = None


def hydra_path(spec: Field) -> str | None:
    """Where a run-config key lives in the Hydra config; ``None`` for the launcher's own keys."""
    group, leaf = spec.metadata["group"], spec.metadata["leaf"] or spec.name
    if group == LAUNCHER:
        return None
    return f"{group}.{leaf}" if group else leaf


def experiment_schema() -> type:
    """Hydra's structured config: the federation group, then every run-config key.

    Types come from `fl_app.config.RunConfig`; values from ``conf/*.yaml``.
    """
    groups: dict[str, list[tuple[str, type, Any]]] = {}
    for spec in config_fields():
        path = hydra_path(spec)
        if path is not None:
            group, _, leaf = path.rpartition(".")
            groups.setdefault(group, []).append((leaf, spec.type, field(default=MISSING)))
    top = groups.pop("")
    nested = [
        (group, schema, field(default_factory=schema))
        for group, schema in [
            ("federation", FederationConfig),
            *((g, make_dataclass(f"{g.title()}Config", leaves)) for g, leaves in groups.items()),
        ]
    ]
    return make_dataclass("ExperimentConfig", [*nested, *top])


ConfigStore.instance().store(name="experiment_schema", node=experiment_schema())


def check_config(cfg: DictConfig) -> dict[str, Any]:
    """Validate a composed config; return the Flower run config it maps to.

    Raises ``ValueError`` naming the Hydra key, the value and what is allowed.
    """
    paths = {flower_key(s): hydra_path(s) for s in config_fields() if hydra_path(s)}
    known = {*paths.values()}
    for group, node in cfg.items():
        leaves = [f"{group}.{leaf}" for leaf in node] if isinstance(node, Mapping) else [group]
        unknown = [path for path in leaves if path not in known and group != "federation"]
        if unknown:
            raise ValueError(
                f"{unknown[0]} is not a key of the experiment config: see "
                "`python -m fl_app.launch.experiment --cfg job` for the keys there are"
            )
    # A `???` the user left unset selects as None: RunConfig.parse calls it missing.
    selected = {key: OmegaConf.select(cfg, path) for key, path in paths.items()}
    run_config = _absolute({key: value for key, value in selected.items() if value is not None})
    # results-dir is the launcher's, set per job; validate the rest.
    RunConfig.parse({**run_config, "results-dir": "."}, name=lambda key: paths.get(key, key))
    _check_federation(cfg.federation)
    return run_config


def _absolute(run_config: dict[str, Any]) -> dict[str, Any]:
    """Relative dataset and class-list paths, made absolute here.

    The SuperLink's processes do not run where the launcher was started.
    """
    for key in PATH_KEYS:
        value = run_config.get(key)
        if value and value not in (*DATASETS, NO_TEST_DATA) and Path(value).expanduser().exists():
            run_config[key] = str(Path(value).expanduser().resolve())
    return run_config


def _check_federation(fed: DictConfig) -> None:
    if fed.kind not in FEDERATION_KINDS:
        raise ValueError(
            f"federation.kind={fed.kind!r} is not allowed: expected one of "
            + ", ".join(FEDERATION_KINDS)
        )
    if fed.kind in SIMULATION_KINDS:
        if fed.kind == "ray-cluster":
            _check_ray_address(fed.ray_address)
        if fed.num_supernodes < 1:
            raise ValueError(
                f"federation.num_supernodes={fed.num_supernodes} is not allowed: "
                "expected an integer >= 1"
            )
        if fed.client_num_cpus <= 0 or fed.client_num_gpus < 0:
            raise ValueError(
                f"federation.client_num_cpus={fed.client_num_cpus}, client_num_gpus="
                f"{fed.client_num_gpus} are not allowed: expected cpus > 0 and gpus >= 0"
            )
        return
    if split_host_port(fed.address or "") is None:
        raise ValueError(f"federation.address={fed.address!r} is not allowed: expected HOST:PORT")
    if not fed.insecure:
        cert = Path(fed.root_certificates or "").expanduser()
        if not fed.root_certificates or not cert.is_file():
            raise ValueError(
                f"federation.root_certificates={fed.root_certificates!r} is not a file: "
                "expected the CA certificate of the SuperLink (or federation.insecure=true)"
            )


def _check_ray_address(address: str | None) -> None:
    # A `???` left unset composes as the schema's None.
    if address is None:
        raise ValueError(
            "federation.ray_address is missing: expected the Ray head's HOST:PORT "
            "(`ray start --head` prints it; port 6379 by default), or auto on a cluster node"
        )
    if address != "auto" and split_host_port(address) is None:
        raise ValueError(
            f"federation.ray_address={address!r} is not allowed: expected HOST:PORT of the "
            "Ray head, or auto"
        )


def _one_line(err: BaseException) -> str:
    """Hydra and OmegaConf errors span lines and causes; keep what names the problem."""
    parts: list[str] = []
    key = ""
    cause: BaseException | None = err
    while cause is not None:
        text = str(cause).split("Config search path")[0]
        for line in filter(None, (line.strip() for line in text.splitlines())):
            if line.startswith("full_key:"):
                key = line.split(":", 1)[1].strip()
            elif not line.startswith(("object_type", "reference_type", "Set the environment")):
                parts.append(line)
        cause = cause.__cause__
    message = " ".join(parts) or type(err).__name__
    return f"{message} (key: {key})" if key and key not in message else message


def precheck(argv: list[str]) -> str | None:
    """Compose and check every job of a command line; return the first error line.

    Sweeps (``a,b``, ``range(...)``) are expanded like Hydra's basic sweeper, so a
    bad value in the last job stops the launcher before the first job starts.
    """
    from hydra._internal.utils import get_args_parser  # hydra.main's own CLI parser

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return None  # Hydra answers these itself
    overrides = [o for o in args.overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        choices = [
            [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
            if o.is_sweep_override()
            else [o.input_line]
            for o in parsed
        ]
        if any(o.is_sweep_override() for o in parsed) and not args.multirun:
            return "sweep values (a,b) need multirun: add -m"
        with hydra.initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            for job in itertools.product(*choices):
                check_config(hydra.compose(args.config_name or "config", overrides=list(job)))
    except Exception as err:  # any composition or validation error ends the launch
        return _one_line(err)
    return None


def _run_job(cfg: DictConfig, output_dir: Path) -> None:
    """Run one experiment into ``output_dir``; record its outcome in ``status.json``.

    A run that did not complete is also marked in the run folder's ``metrics.json``
    (see `mark_metrics`), since a ServerApp that died cannot do it itself.
    """
    run_config = {**check_config(cfg), "results-dir": str(output_dir)}
    (output_dir / "config.resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    fed = cfg.federation
    flwr_home = Path(tempfile.mkdtemp(prefix="fl_app-flwr-home-"))
    run_id: int | None = None
    cli: FlowerCLI | None = None
    status: RunStatus | None = None
    outcome = "failed"
    failure = "the launcher stopped before Flower reported the run's end"
    started = time.monotonic()
    try:
        if fed.kind in SIMULATION_KINDS:
            # Flower's ray.init() joins the cluster RAY_ADDRESS names instead of starting one.
            ray_cluster = fed.kind == "ray-cluster"
            env = {**os.environ, "RAY_ADDRESS": fed.ray_address} if ray_cluster else None
            superlink = LocalSuperLink(flwr_home, env=env)
            context: contextlib.AbstractContextManager = superlink
            cli = superlink.cli
            federation_config = {
                "num-supernodes": fed.num_supernodes,
                "client-resources-num-cpus": fed.client_num_cpus,
                "client-resources-num-gpus": fed.client_num_gpus,
            }
        else:
            write_connection(flwr_home, fed.address, fed.insecure, fed.root_certificates)
            context = contextlib.nullcontext()
            cli = FlowerCLI(flwr_home)
            federation_config = None
        with context, (output_dir / "flower.log").open("a") as flower_log:
            run_id = cli.submit(
                APP_DIR, run_config, federation_config, output_dir / "run_config.toml"
            )
            log.info("Started run %d (%s); results go to %s", run_id, fed.kind, output_dir)
            cli.follow(run_id, sys.stdout, flower_log)
            status = cli.wait(run_id)
            outcome = "completed" if status.completed else "failed"
            failure = f"{status.status}: {status.details}" if status.details else status.status
    except RuntimeError as err:  # the SuperLink refused the run, could not start or went away
        log.error("%s", err)
        failure = str(err)
    except KeyboardInterrupt:
        outcome = "interrupted"
        failure = "interrupted: the launcher stopped the run"
        # The simulation's SuperLink context already stopped its runs; a deployment
        # SuperLink is not ours to stop, but our run on it is.
        if fed.kind not in SIMULATION_KINDS and cli is not None and run_id is not None:
            with contextlib.suppress(FlowerCLIError):  # it may have ended meanwhile
                cli.stop(run_id)
        raise
    finally:
        if run_id is not None:  # a run was submitted: its folder's metrics.json is ours too
            _settle_metrics(output_dir, outcome, failure)
        _write_status(output_dir, outcome, run_id, status, time.monotonic() - started)
        _outcomes.append(outcome)
        shutil.rmtree(flwr_home, ignore_errors=True)


def mark_metrics(run_dir: Path, status: str, failure: str) -> None:
    """Mark the run folder's ``metrics.json`` as ended with ``status``, and say why.

    The ServerApp writes ``metrics.json`` as the run goes (``"status": "running"``)
    and marks its own end; one that was killed cannot. This sets ``status`` and
    adds ``failure`` and keeps everything else (the rounds recorded so far). With
    no ``metrics.json`` (the ServerApp died before round 0, or runs on another
    machine), it writes one with no rounds. Atomic, like the ServerApp's writes.

    Parameters
    ----------
    run_dir : Path
        The run folder (the run's ``results-dir``).
    status : str
        How the run ended: ``failed`` or ``interrupted``.
    failure : str
        Why, in one line (Flower's status and details, for a failed run).

    Raises
    ------
    ValueError
        If ``metrics.json`` is there but not a JSON object (then it is left as it is).
    """
    path = run_dir / METRICS
    written = _read_metrics(path)
    content = {"status": status, "failure": failure}
    if written is None:
        content["rounds"] = []
    else:
        content.update((k, v) for k, v in written.items() if k not in content)
    partial = path.with_name(".metrics.json.launcher.partial")
    partial.write_text(json.dumps(content, indent=2))
    os.replace(partial, path)


def _settle_metrics(run_dir: Path, outcome: str, failure: str) -> None:
    """Make ``metrics.json`` agree with Flower's final status of the run."""
    path = run_dir / METRICS
    try:
        content = _read_metrics(path)
    except (OSError, ValueError) as err:  # not what the ServerApp writes: leave it be
        log.warning("%s is not a readable metrics file (%s); left as it is", path, err)
        return
    # None: no file here, as when a deployment's ServerApp writes on another machine.
    written = content.get("status") if content is not None else None
    if outcome == "completed":
        if content is not None and written != "completed":
            log.warning("Flower says the run completed, but %s says %r", path, written)
    elif written == "completed":
        log.warning("%s says completed, but Flower says %s; left as it is", path, failure)
    else:
        try:
            mark_metrics(run_dir, outcome, failure)
        except OSError as err:  # status.json still gets written
            log.warning("Could not mark %s %s: %s", path, outcome, err)
            return
        log.info("Marked %s %s: %s", path, outcome, failure)


def _read_metrics(path: Path) -> dict[str, Any] | None:
    """``metrics.json`` as a dict; ``None`` if there is none. Raises on anything else."""
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    if not isinstance(content, dict):
        raise ValueError("not a JSON object")
    return content


def _write_status(
    output_dir: Path, outcome: str, run_id: int | None, status: RunStatus | None, wall: float
) -> None:
    content = {
        "status": outcome,
        "run_id": run_id,
        "flower_status": status.status if status else None,
        "details": status.details if status else None,
        "wall_time": wall,
    }
    (output_dir / "status.json").write_text(json.dumps(content, indent=2))
    log.info("Run %s: %s (%.0f s). Status in %s", run_id, outcome, wall, output_dir / "status.json")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _job(cfg: DictConfig) -> None:
    _run_job(cfg, Path(HydraConfig.get().runtime.output_dir))


class SweepSummary(Callback):
    """At the end of a multirun, write ``summary.csv`` and ``accuracy.png`` and log the table.

    ``target_accuracy`` (``hydra.callbacks.sweep_summary.target_accuracy``), when > 0, adds
    the first round each job's server accuracy reached it.
    """

    def __init__(self, target_accuracy: float = 0.0) -> None:
        check_target_accuracy(target_accuracy)
        self.target_accuracy = target_accuracy

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Summarise the sweep folder Hydra just filled."""
        csv_path, png_path = summarize_sweep(Path(config.hydra.sweep.dir), self.target_accuracy)
        log.info("Sweep summary: %s, plot: %s\n%s", csv_path, png_path, summary_table(csv_path))


def main() -> None:
    """Console entry point: check every job, then hand over to Hydra."""
    error = precheck(sys.argv[1:])
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        _job()
    except KeyboardInterrupt:
        print(
            "interrupted: the run and the processes the launcher started were stopped",
            file=sys.stderr,
        )
        sys.exit(130)
    # No outcome at all is fine: --cfg, --info and the like run no job.
    if any(outcome != "completed" for outcome in _outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
