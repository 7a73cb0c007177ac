"""ServerApp: initial weights, centralised evaluation and the federated run.

Only the server loads pretrained weights; ClientApps build the bare
architecture and receive every weight from here, so nodes need no internet.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import flwr
import keras
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fl_app.data import DATASETS, NUM_CLASSES, PARTITIONERS, Split, load_test_set
from fl_app.model import (
    BACKBONE_LAYERS,
    CONV5_LAYERS,
    MIN_INPUT_SIZE,
    build_model,
    compile_model,
    load_arrayrecord,
    to_arrayrecord,
)
from fl_app.strategy import TransferFedAvg, TransferSchedule

app = ServerApp()

WEIGHT_CHOICES = "imagenet, none, or the path of a .keras/.weights.h5/.h5 weights file"

# key: (type, test, what is allowed). Flower already refuses unknown keys.
_RULES: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    "num-server-rounds": (int, lambda v: v >= 1, "an integer >= 1"),
    "fraction-train": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "fraction-evaluate": (float, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "min-train-nodes": (int, lambda v: v >= 1, "an integer >= 1"),
    "min-evaluate-nodes": (int, lambda v: v >= 0, "an integer >= 0"),
    "min-available-nodes": (int, lambda v: v >= 1, "an integer >= 1"),
    "local-epochs": (int, lambda v: v >= 1, "an integer >= 1"),
    "batch-size": (int, lambda v: v >= 1, "an integer >= 1"),
    "learning-rate": (float, lambda v: v > 0, "a number > 0"),
    "head-rounds": (int, lambda v: v >= 0, "an integer >= 0"),
    "fine-tune-layers": (
        int,
        lambda v: 0 <= v <= BACKBONE_LAYERS,
        f"an integer in 0..{BACKBONE_LAYERS} (ResNet50's layers; {CONV5_LAYERS} = conv5)",
    ),
    "fine-tune-learning-rate": (float, lambda v: v > 0, "a number > 0"),
    "input-size": (int, lambda v: v >= MIN_INPUT_SIZE, f"an integer >= {MIN_INPUT_SIZE}"),
    "weights": (
        str,
        lambda v: v in ("imagenet", "none") or Path(v).expanduser().is_file(),
        WEIGHT_CHOICES,
    ),
    "strict-weights": (bool, lambda v: True, "true or false"),
    "dataset": (str, lambda v: v in DATASETS, "one of " + ", ".join(DATASETS)),
    "partitioner": (str, lambda v: v in PARTITIONERS, "one of " + ", ".join(PARTITIONERS)),
    "dirichlet-alpha": (float, lambda v: v > 0, "a number > 0"),
    "seed": (int, lambda v: v >= 0, "an integer >= 0"),
    "max-examples-per-node": (int, lambda v: v >= 0, "an integer >= 0 (0 = no cap)"),
    "val-fraction": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "max-test-examples": (int, lambda v: v >= 0, "an integer >= 0 (0 = the whole test set)"),
    "results-dir": (str, lambda v: bool(v), "a folder path"),
}


def validate_run_config(run_config: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first bad key, its value and what is allowed."""
    for key, (kind, ok, allowed) in _RULES.items():
        if key not in run_config:
            raise ValueError(f"run config is missing '{key}' ({allowed})")
        value = run_config[key]
        # TOML and --run-config give ints for whole numbers; they are valid floats.
        type_ok = (
            isinstance(value, bool)
            if kind is bool
            else isinstance(value, kind if kind is not float else (int, float))
            and not isinstance(value, bool)
        )
        if not type_ok or not ok(value):
            raise ValueError(f"{key}={value!r} is not allowed: expected {allowed}")
    if run_config["val-fraction"] == 0 and run_config["fraction-evaluate"] > 0:
        raise ValueError(
            "val-fraction=0 leaves nodes nothing to evaluate on: "
            "set val-fraction > 0 or fraction-evaluate=0"
        )


def initial_model(
    image_shape: tuple[int, ...], input_size: int, weights: str, strict: bool
) -> tuple[keras.Model, str]:
    """Build the global model and say how its weights started.

    Returns the model and ``"imagenet"``, ``"random"`` or ``"file:<path>"``.
    """
    if weights == "none":
        return build_model(NUM_CLASSES, image_shape, input_size), "random"
    if weights == "imagenet":
        try:
            return build_model(NUM_CLASSES, image_shape, input_size, "imagenet"), "imagenet"
        except Exception as err:  # keras raises bare Exception when a download fails
            if strict:
                raise RuntimeError(
                    f"weights=imagenet: ImageNet ResNet50 weights are unavailable ({err}) "
                    "and strict-weights=true forbids random initialisation"
                ) from err
            log(
                WARNING,
                "!!! ImageNet weights are unavailable (%s): training starts from RANDOM "
                "initialisation, not transfer learning. Put the notop file in "
                "~/.keras/models/, pass weights=<file>, or set strict-weights=true to "
                "make this an error.",
                err,
            )
            return build_model(NUM_CLASSES, image_shape, input_size), "random"
    path = Path(weights).expanduser().resolve()
    if path.name.endswith((".keras", ".weights.h5")):
        model = build_model(NUM_CLASSES, image_shape, input_size)
        model.load_weights(path)
    else:
        model = build_model(NUM_CLASSES, image_shape, input_size, str(path))
    return model, f"file:{path}"


def _evaluator(model: keras.Model, test: Split, batch_size: int):
    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_arrayrecord(model, arrays)
        loss, accuracy = model.evaluate(test.x, test.y, batch_size=batch_size, verbose=0)
        return MetricRecord({"loss": float(loss), "accuracy": float(accuracy)})

    return evaluate


def _saver(model: keras.Model):
    def save(arrays: ArrayRecord, path: Path) -> None:
        load_arrayrecord(model, arrays)
        model.save(path)

    return save


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run federated transfer learning and write the run folder."""
    cfg = context.run_config
    try:
        validate_run_config(cfg)
    except ValueError as err:
        log(ERROR, "Invalid run config: %s", err)
        raise
    keras.utils.set_random_seed(int(cfg["seed"]))
    test = load_test_set(str(cfg["dataset"]), int(cfg["max-test-examples"]))
    model, init = initial_model(
        test.x.shape[1:], int(cfg["input-size"]), str(cfg["weights"]), bool(cfg["strict-weights"])
    )
    compile_model(model, float(cfg["learning-rate"]))

    run_dir = (
        Path(str(cfg["results-dir"])).expanduser().resolve()
        / f"{time.strftime('%Y%m%d-%H%M%S')}-run{context.run_id}"
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    log(INFO, "Results of this run go to %s", run_dir)
    (run_dir / "config.json").write_text(
        json.dumps(
            {
                "run_id": context.run_id,
                "run_config": dict(cfg),
                "init": init,
                "versions": {"flwr": flwr.__version__, "keras": keras.__version__},
            },
            indent=2,
        )
    )

    strategy = TransferFedAvg(
        schedule=TransferSchedule(
            head_rounds=int(cfg["head-rounds"]),
            learning_rate=float(cfg["learning-rate"]),
            fine_tune_learning_rate=float(cfg["fine-tune-learning-rate"]),
            fine_tune_layers=int(cfg["fine-tune-layers"]),
        ),
        run_dir=run_dir,
        save_model=_saver(model),
        run_info={"init": init},
        fraction_train=float(cfg["fraction-train"]),
        fraction_evaluate=float(cfg["fraction-evaluate"]),
        min_train_nodes=int(cfg["min-train-nodes"]),
        min_evaluate_nodes=int(cfg["min-evaluate-nodes"]),
        min_available_nodes=int(cfg["min-available-nodes"]),
    )
    strategy.start(
        grid=grid,
        initial_arrays=to_arrayrecord(model),
        num_rounds=int(cfg["num-server-rounds"]),
        train_config=ConfigRecord(
            {"local-epochs": int(cfg["local-epochs"]), "batch-size": int(cfg["batch-size"])}
        ),
        evaluate_fn=_evaluator(model, test, int(cfg["batch-size"])),
    )
    log(INFO, "Run finished: metrics, best.keras and final.keras are in %s", run_dir)
