"""A run's folder: a new one, or the earlier run's that ``resume`` continues.

A new run's folder starts with ``config.json`` (its run config, classes, how
the weights started, the versions). ``resume`` continues an earlier run from
its last checkpoint (`fl_app.run_folder.load_checkpoint`), refused in one line
when the config changes what decides the model, the data or the state carried
over (`RESUME_KEYS`); the strategy takes up the folder's records, the bases the
nodes hold, the privacy budget spent and the server optimiser's moments.
"""

from __future__ import annotations

import json
import time
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING

import flwr
import keras
from flwr.app import ArrayRecord
from flwr.common import log

from fl_app.config import RunConfig
from fl_app.run_folder import Checkpoint, load_checkpoint

if TYPE_CHECKING:
    from fl_app.strategy import TransferFedAvg

# Keys a resumed run must share with the run it continues: they decide the model and data.
RESUME_KEYS = (
    "backbone",
    "input-size",
    "fine-tune-layers",
    "dataset",
    "classes",
    "partitioner",
    "dirichlet-alpha",
    "seed",
    # The privacy budget spent so far was counted with these.
    "dp",
    "dp-clip",
    "dp-noise-multiplier",
    "dp-delta",
    # The server optimiser's moments continue only under the same rule.
    "strategy",
)


def check_resumable(config: RunConfig, classes: tuple[str, ...], run_dir: Path) -> None:
    """Refuse, in one line, to continue a run whose model or data this config changes."""
    earlier = json.loads((run_dir / "config.json").read_text())
    now = {**config.to_flower(), "classes": list(classes)}
    before = {**earlier["run_config"], "classes": earlier["classes"]}
    for key in RESUME_KEYS:
        if before.get(key) != now[key]:
            raise ValueError(
                f"resume={config.resume!r} is not allowed with {key}={now[key]!r}: that run "
                f"had {key}={before.get(key)!r}"
            )


def resume_point(config: RunConfig, classes: tuple[str, ...]) -> Checkpoint | None:
    """The checkpoint ``resume`` continues (``None`` without it); ``ValueError`` in one line."""
    if not config.resume:
        return None
    checkpoint = load_checkpoint(config.resume)
    check_resumable(config, classes, Path(config.resume).expanduser())
    return checkpoint


def new_run_dir(config: RunConfig, run_id: int, classes: tuple[str, ...], init: str) -> Path:
    """Create a new run's folder (``results-dir``) with its ``config.json``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.results_dir.format(time=stamp, run_id=run_id))
    run_dir = run_dir.expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(
        json.dumps(
            {
                "run_id": run_id,
                "run_config": config.to_flower(),
                "classes": list(classes),
                "init": init,
                "versions": {"flwr": flwr.__version__, "keras": keras.__version__},
            },
            indent=2,
        )
    )
    return run_dir


def run_dir_of(
    config: RunConfig,
    run_id: int,
    classes: tuple[str, ...],
    init: str,
    checkpoint: Checkpoint | None,
) -> tuple[Path, str]:
    """The run's folder and how its weights started: a new folder, or the one resumed.

    ``init`` says how the model's weights started (`fl_app.model.initial`);
    resuming, they are the checkpoint's: ``resume:<folder>@<round>``.
    """
    if checkpoint is None:
        return new_run_dir(config, run_id, classes, init), init
    run_dir = Path(config.resume).expanduser().resolve()
    log(
        INFO,
        "Resuming %s after round %d of %d",
        run_dir,
        checkpoint.round,
        config.num_server_rounds,
    )
    return run_dir, f"resume:{run_dir}@{checkpoint.round}"


def resume(strategy: TransferFedAvg, checkpoint: Checkpoint, run_id: int) -> ArrayRecord:
    """Continue ``checkpoint``'s run with ``strategy``; the global arrays to start from.

    The strategy takes up the rounds done, the folder's records and best model,
    the bases the nodes hold, the privacy budget spent and the server
    optimiser's moments.
    """
    strategy.rounds_done, strategy.resumed = checkpoint.round, True
    strategy.folder.continue_from(checkpoint)
    strategy.folder.run_info.setdefault("resumed", []).append(
        {"after_round": checkpoint.round, "run_id": run_id}
    )
    strategy.wire.restore(checkpoint.holders, checkpoint.bases)
    if strategy.privacy is not None:
        strategy.privacy.rounds = int(checkpoint.state.get("privacy", {}).get("rounds", 0))
    strategy.server_optimizer.load_state(checkpoint.state_arrays)
    return checkpoint.arrays
