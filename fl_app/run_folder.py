"""The run folder: ``metrics.json``, ``best.keras``/``final.keras``, TensorBoard, the log.

Everything is written as the run goes, each file atomically (a temporary name,
then a rename), so a run killed at any moment leaves readable files behind.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from flwr.common import log

SaveModel = Callable[[ArrayRecord, Path], None]


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

    def record(self, record: dict[str, Any], arrays: ArrayRecord) -> None:
        """Add a finished round (``record["round"]``; 0 is the start) and log its summary."""
        self.rounds.append(record)
        accuracy = record.get(self.best_by)
        is_best = accuracy is not None and accuracy > self.best_accuracy
        if is_best:
            self.best_accuracy = accuracy
            self.run_info["best"] = {"round": record["round"], self.best_by: accuracy}
            self.save(arrays, "best.keras")
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
        final = self.path / "metrics.json"
        partial = final.with_name(".metrics.json.partial")
        partial.write_text(json.dumps(content, indent=2))
        os.replace(partial, final)


def summary(record: Mapping[str, Any], is_best: bool) -> str:
    """One log line of a round: accuracies, time, bytes, rejected replies."""
    parts = []
    for key, label in (
        ("train_accuracy", "train acc"),
        ("eval_accuracy", "val acc"),
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
    if record.get("rejected_replies"):
        parts.append(f"{record['rejected_replies']} replies rejected")
    if record.get("skipped_images"):
        parts.append(f"{record['skipped_images']} unreadable images skipped")
    return " | ".join(parts) or "no metrics"


def _tensorboard_writer(run_dir: Path) -> Callable[[Mapping[str, Any]], None] | None:
    """Write each round's numbers as TensorBoard scalars into the run folder."""
    try:
        import tensorboard  # noqa: F401  (tf.summary needs it; tensorflow-cpu lacks it)
        import tensorflow as tf
    except ImportError:
        log(INFO, "No TensorFlow/TensorBoard: no event file (metrics.json has the numbers)")
        return None
    writer = tf.summary.create_file_writer(str(run_dir))

    def write(record: Mapping[str, Any]) -> None:
        with writer.as_default(step=int(record["round"])):
            for key, value in record.items():
                if key != "round" and isinstance(value, int | float):
                    tf.summary.scalar(key, float(value))
        writer.flush()

    return write
