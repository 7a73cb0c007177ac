"""The run folder: ``metrics.json``, ``best.keras``/``final.keras``, checkpoints, TensorBoard.

Everything is written as the run goes, each file atomically (a temporary name,
then a rename), so a run killed at any moment leaves readable files behind. A
checkpoint after every round (``checkpoint.json`` naming its arrays file) is
what ``resume`` continues from.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common import log

from fl_app.values import CHECKPOINT_FILE as CHECKPOINT

SaveModel = Callable[[ArrayRecord, Path], None]
# The run's records after every round (read by the launcher and sweeps too).
METRICS = "metrics.json"


class Checkpoint(NamedTuple):
    """A run folder's last completed round: enough to continue the run."""

    round: int
    arrays: ArrayRecord
    run_info: dict[str, Any]
    rounds: list[dict[str, Any]]
    holders: dict[int, str]
    bases: dict[str, ArrayRecord]
    # The strategy's own state across rounds: JSON (the privacy budget spent) and arrays
    # (a server optimiser's moments).
    state: dict[str, Any]
    state_arrays: dict[str, np.ndarray]


class RunFolder:
    """Records each round of a run and keeps its best and final models.

    Parameters
    ----------
    path : Path
        The folder (created).
    save_model : Callable[[ArrayRecord, Path], None]
        Writes a model file from global arrays (the server owns the Keras model).
    run_info : Mapping[str, Any]
        Extra top-level entries of ``metrics.json`` (e.g. how the weights started).
    tensorboard : bool
        Also write each round's numbers as TensorBoard scalars, when TensorBoard is there.
    best_by : str
        The round record's accuracy that picks ``best.keras``: ``server_accuracy``
        (centralised evaluation) or ``eval_accuracy`` (federated evaluation).
    """

    def __init__(
        self,
        path: Path,
        save_model: SaveModel,
        run_info: Mapping[str, Any] | None = None,
        tensorboard: bool = False,
        best_by: str = "server_accuracy",
    ) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.save_model = save_model
        self.run_info = dict(run_info or {})
        self.rounds: list[dict[str, Any]] = []
        self.best_by = best_by
        self.best_accuracy = -math.inf
        self._tensorboard = _tensorboard_writer(self.path) if tensorboard else None

    def continue_from(self, checkpoint: Checkpoint) -> None:
        """Carry on an earlier run's records and best model (``resume``)."""
        self.rounds = list(checkpoint.rounds)
        self.run_info = {**checkpoint.run_info, **self.run_info}
        best = checkpoint.run_info.get("best") or {}
        self.best_accuracy = best.get(self.best_by, -math.inf)

    def record(
        self,
        record: dict[str, Any],
        arrays: ArrayRecord,
        wire_state: tuple[Mapping[int, str], Mapping[str, ArrayRecord]] | None = None,
        state: Mapping[str, Any] | None = None,
        state_arrays: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Add a finished round (``record["round"]``; 0 is the start) and log its summary.

        With ``wire_state`` (which base each node holds, and the bases), the
        round's checkpoint, with the strategy's ``state`` and ``state_arrays``, is
        written before ``metrics.json`` shows the round.
        """
        self.rounds.append(record)
        accuracy = record.get(self.best_by)
        is_best = accuracy is not None and accuracy > self.best_accuracy
        if is_best:
            self.best_accuracy = accuracy
            self.run_info["best"] = {"round": record["round"], self.best_by: accuracy}
            self.save(arrays, "best.keras")
        if wire_state is not None:
            self.checkpoint(
                record["round"], arrays, *wire_state, state=state, state_arrays=state_arrays
            )
        self.write_metrics("running")
        if self._tensorboard is not None:
            self._tensorboard(record)
        log(INFO, "Round %d summary: %s", record["round"], summary(record, is_best))

    def save(self, arrays: ArrayRecord, name: str) -> None:
        """Write a model file; an interrupted save never leaves a broken file."""
        final = self.path / name
        partial = final.with_name(f".{final.stem}.partial{final.suffix}")
        self.save_model(arrays, partial)
        os.replace(partial, final)

    def write_metrics(self, status: str) -> None:
        """Write ``metrics.json``: the status, the run info and every round so far."""
        content = {"status": status, **self.run_info, "rounds": self.rounds}
        _write_text(self.path / METRICS, json.dumps(content, indent=2))

    def checkpoint(
        self,
        server_round: int,
        arrays: ArrayRecord,
        holders: Mapping[int, str],
        bases: Mapping[str, ArrayRecord],
        state: Mapping[str, Any] | None = None,
        state_arrays: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Write the checkpoint of a completed round: the global arrays and the wire's state.

        The arrays file is written first and named by its round, then
        ``checkpoint.json`` (with the rounds' records and the run info so far) is
        renamed into place: a crash in between leaves the previous checkpoint
        whole. ``holders`` says which base each node holds; each base is written
        once (``base-<hash>.npz``), so that nodes keep theirs across a resume.
        ``state`` (JSON) and ``state_arrays`` are the strategy's own, given back by
        `load_checkpoint`.
        """
        name = f"checkpoint-r{server_round:04d}.npz"
        _write_arrays(self.path / name, arrays)
        state_file = None
        if state_arrays:
            state_file = f"state-r{server_round:04d}.npz"
            _write_arrays(
                self.path / state_file,
                ArrayRecord({key: Array(np.asarray(v)) for key, v in state_arrays.items()}),
            )
        base_files = {}
        for base in set(holders.values()):
            base_files[base] = f"base-{base}.npz"
            if not (self.path / base_files[base]).is_file():
                _write_arrays(self.path / base_files[base], bases[base])
        content = {
            "round": server_round,
            "arrays": name,
            "keys": list(arrays.keys()),
            "holders": {str(node): base for node, base in holders.items()},
            "bases": base_files,
            "run_info": self.run_info,
            "rounds": self.rounds,
            "state": dict(state or {}),
            "state_arrays": state_file,
        }
        _write_text(self.path / CHECKPOINT, json.dumps(content, indent=2))
        for old in [*self.path.glob("checkpoint-r*.npz"), *self.path.glob("state-r*.npz")]:
            if old.name not in (name, state_file):
                old.unlink(missing_ok=True)
        for old in self.path.glob("base-*.npz"):
            if old.name not in base_files.values():
                old.unlink(missing_ok=True)


def load_checkpoint(folder: str | os.PathLike, key: str = "resume") -> Checkpoint:
    """The last checkpoint of a run folder; one ``ValueError`` line when there is none."""
    path = Path(folder).expanduser()
    try:
        content = json.loads((path / CHECKPOINT).read_text())
        arrays = _read_arrays(path / content["arrays"], content["keys"])
        bases = {name: _read_arrays(path / file) for name, file in content["bases"].items()}
        state_file = content.get("state_arrays")
        state_arrays = (
            {k: a.numpy() for k, a in _read_arrays(path / state_file).items()} if state_file else {}
        )
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"{key}={str(folder)!r} is not allowed: expected a run folder with a readable "
            f"{CHECKPOINT} ({err})"
        ) from err
    holders = {int(node): base for node, base in content["holders"].items()}
    return Checkpoint(
        int(content["round"]),
        arrays,
        content["run_info"],
        content["rounds"],
        holders,
        bases,
        content.get("state", {}),
        state_arrays,
    )


def _write_text(final: Path, text: str) -> None:
    partial = final.with_name(f".{final.name}.partial")
    partial.write_text(text)
    os.replace(partial, final)


def _write_arrays(final: Path, arrays: ArrayRecord) -> None:
    partial = final.with_name(f".{final.stem}.partial.npz")
    with partial.open("wb") as file:
        # Positional names: array keys hold "/" and must keep their order.
        np.savez(file, *(array.numpy() for array in arrays.values()), keys=np.array(list(arrays)))
    os.replace(partial, final)


def _read_arrays(path: Path, keys: list[str] | None = None) -> ArrayRecord:
    with np.load(path) as stored:
        names = [str(k) for k in stored["keys"]]
        if keys is not None and names != list(keys):
            raise ValueError(f"{path.name} holds other arrays than its checkpoint names")
        return ArrayRecord({k: Array(stored[f"arr_{i}"]) for i, k in enumerate(names)})


def summary(record: Mapping[str, Any], is_best: bool) -> str:
    """One log line of a round: accuracies, time, bytes, rejected replies."""
    parts = []
    for key, label in (
        ("train_accuracy", "train acc"),
        ("eval_accuracy", "val acc"),
        ("personalized_accuracy", "personalised val acc"),
        ("server_accuracy", "server acc"),
    ):
        if key in record:
            parts.append(f"{label} {record[key]:.4f}")
    if is_best:
        parts.append("new best")
    if "round_time" in record:
        parts.append(f"{record['round_time']:.1f} s")
    if "bytes_sent" in record:
        sent, received = record["bytes_sent"] / 1e6, record["bytes_received"] / 1e6
        parts.append(f"sent {sent:.1f} MB, received {received:.1f} MB")
    if "dp_epsilon" in record:
        parts.append(f"ε {record['dp_epsilon']:.3g} (δ {record['dp_delta']:g})")
    if record.get("rejected_replies"):
        parts.append(f"{record['rejected_replies']} replies rejected")
    if record.get("secagg_dropped"):
        parts.append(f"{record['secagg_dropped']} nodes left SecAgg+")
    if record.get("skipped_images"):
        parts.append(f"{record['skipped_images']} unreadable images skipped")
    return " | ".join(parts) or "no metrics"


def _tensorboard_writer(run_dir: Path) -> Callable[[Mapping[str, Any]], None]:
    """Write each round's numbers as TensorBoard scalars into the run folder.

    TensorBoard's own writer: it needs no TensorFlow, so the JAX backend keeps it.
    """
    from tensorboard.summary import Writer

    writer = Writer(str(run_dir))

    def write(record: Mapping[str, Any]) -> None:
        for key, value in record.items():
            if key != "round" and isinstance(value, int | float):
                writer.add_scalar(key, float(value), int(record["round"]))
        writer.flush()

    return write
