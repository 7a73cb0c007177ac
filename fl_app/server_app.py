"""ServerApp: the global model, centralised evaluation and the federated run.

Only the server loads pretrained weights (`fl_app.model.initial`); ClientApps
build the bare architecture and receive every weight from here, so nodes need
no internet. A run writes its run folder as it goes, or continues one
(`fl_app.resume`).
"""

from __future__ import annotations

from dataclasses import replace
from logging import ERROR, INFO, WARNING
from pathlib import Path

import keras
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fl_app.aggregation import Combiner
from fl_app.config import RunConfig
from fl_app.data import CLASSES_KEY, load_test_set, model_image_shape, run_classes
from fl_app.data.split import Split
from fl_app.evaluation import CentralEvaluation
from fl_app.grid import PromptGrid
from fl_app.model.classifier import (
    compile_model,
    load_arrayrecord,
    save_classifier,
    to_arrayrecord,
    trainable_keys,
)
from fl_app.model.initial import initial_model
from fl_app.privacy import PrivacyBudget
from fl_app.resume import resume, resume_point, run_dir_of
from fl_app.run_folder import RunFolder
from fl_app.schedule import TransferSchedule
from fl_app.secagg.protocol import SecAggPlusRound
from fl_app.server_opt import ServerOptimizer
from fl_app.strategy import TransferFedAvg
from fl_app.values import DATASETS
from fl_app.wire.exchange import ServerExchange

app = ServerApp()
# The input size ImageNet backbones were trained at: what photos want.
PHOTO_INPUT_SIZE = 224


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run federated transfer learning (or continue one) and write the run folder."""
    try:
        config = RunConfig.parse(context.run_config)
        classes = run_classes(config)
        test, test_source = load_test_set(config, classes)
        checkpoint = resume_point(config, classes)
    except ValueError as err:
        log(ERROR, "Invalid run config: %s", err)
        raise
    log(INFO, "%d classes: %s", len(classes), ", ".join(classes))
    best_by = _best_by(test_source, test is not None, config)
    image_shape = model_image_shape(config, test)
    _warn_if_small_photos(config)
    # Resuming, the weights come from the checkpoint: no need to fetch pretrained ones.
    start = config if checkpoint is None else replace(config, weights="none")
    model, init = initial_model(start, image_shape, len(classes))
    run_dir, init = run_dir_of(config, context.run_id, classes, init, checkpoint)
    compile_model(model, config.learning_rate)
    log(INFO, "Results of this run go to %s", run_dir)

    info = {"init": init, "classes": list(classes), "best_by": best_by}
    folder = RunFolder(run_dir, _saver(model, classes), info, tensorboard=True, best_by=best_by)
    keys = trainable_keys(model, config.fine_tune_layers)
    strategy = build_strategy(
        config, folder, ServerExchange(config.exchange, config.compression, keys)
    )
    if checkpoint is None:
        initial_arrays = to_arrayrecord(model)
    else:
        initial_arrays = resume(strategy, checkpoint, context.run_id)
        if checkpoint.round >= config.num_server_rounds:
            log(INFO, "Nothing to resume: %s already did %d rounds", run_dir, checkpoint.round)
            return
    strategy.start(
        # Replies picked up as they come, not on Flower's 3 s beat (fl_app.grid).
        grid=PromptGrid(grid),
        initial_arrays=initial_arrays,
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        train_config=ConfigRecord({CLASSES_KEY: list(classes)}),
        evaluate_config=ConfigRecord({CLASSES_KEY: list(classes)}),
        evaluate_fn=None if test is None else _central_evaluation(config, model, test),
    )
    log(INFO, "Run finished: metrics, best.keras and final.keras are in %s", run_dir)


def build_strategy(config: RunConfig, folder: RunFolder, wire: ServerExchange) -> TransferFedAvg:
    """The run's strategy, as ``config`` sets it up (a resumed run's state comes after)."""
    privacy = None
    if config.dp != "none":
        privacy = PrivacyBudget(
            config.dp_noise_multiplier, config.dp_delta, config.dp_target_epsilon
        )
    return TransferFedAvg(
        schedule=TransferSchedule.from_config(config),
        folder=folder,
        wire=wire,
        wait_for_nodes_timeout=config.wait_for_nodes_timeout,
        seed=config.seed,
        combiner=Combiner(
            config.aggregation,
            config.trim_fraction,
            config.max_update_norm_ratio,
            config.max_examples_ratio,
        ),
        dp_clip=config.dp_clip,
        privacy=privacy,
        server_optimizer=ServerOptimizer(
            config.strategy,
            config.server_learning_rate,
            config.server_momentum,
            config.beta_1,
            config.beta_2,
            config.tau,
        ),
        secure=SecAggPlusRound(config) if config.secure_aggregation == "secagg+" else None,
        run_config=config,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=config.min_train_nodes,
        min_evaluate_nodes=config.min_evaluate_nodes,
        min_available_nodes=config.min_available_nodes,
    )


def _saver(model: keras.Model, classes: tuple[str, ...]):
    def save(arrays: ArrayRecord, path: Path) -> None:
        load_arrayrecord(model, arrays)
        save_classifier(model, path, classes)

    return save


def _central_evaluation(config: RunConfig, model: keras.Model, test: Split) -> CentralEvaluation:
    """The server's evaluation of each round's model on its test set."""
    cache_bytes = config.feature_cache_mb * 2**20 if config.feature_cache else 0
    return CentralEvaluation(model, test, config.batch_size, config.backbone, cache_bytes)


def _best_by(test_source: str, has_test: bool, config: RunConfig) -> str:
    """The accuracy that picks best.keras, said in the log."""
    if has_test:
        log(INFO, "Centralised evaluation on %s; best.keras follows its accuracy", test_source)
        return "server_accuracy"
    log(
        INFO,
        "No server test set (%s): centralised evaluation is skipped; best.keras follows "
        "the federated evaluation accuracy",
        test_source,
    )
    if config.fraction_evaluate == 0:
        log(WARNING, "fraction-evaluate=0 and no test set: no best.keras, only final.keras")
    return "eval_accuracy"


def _warn_if_small_photos(config: RunConfig) -> None:
    """Warn when photos (not a built-in dataset) are shrunk below what backbones want."""
    if config.input_size < PHOTO_INPUT_SIZE and config.dataset not in DATASETS:
        log(
            WARNING,
            "input-size=%d: images are shrunk to %d px; ImageNet backbones see photos best at "
            "%d (input-size=%d, or the Hydra preset dataset=images)",
            config.input_size,
            config.input_size,
            PHOTO_INPUT_SIZE,
            PHOTO_INPUT_SIZE,
        )
