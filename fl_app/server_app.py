"""ServerApp: initial weights, centralised evaluation and the federated run.

Only the server loads pretrained weights; ClientApps build the bare
architecture and receive every weight from here, so nodes need no internet.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from logging import ERROR, INFO, WARNING
from pathlib import Path

import flwr
import keras
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fl_app.aggregation import Combiner
from fl_app.config import DATASETS, RunConfig
from fl_app.data import CLASSES_KEY, load_test_set, model_image_shape, run_classes
from fl_app.evaluation import CentralEvaluation
from fl_app.grid import PromptGrid
from fl_app.model.backbones import BACKBONES, EFFICIENTNET_LITE0
from fl_app.model.classifier import (
    build_model,
    compile_model,
    load_arrayrecord,
    save_classifier,
    to_arrayrecord,
    trainable_keys,
)
from fl_app.model.efficientnet_lite import imagenet_weights_file
from fl_app.privacy import PrivacyBudget
from fl_app.run_folder import RunFolder, load_checkpoint
from fl_app.schedule import TransferSchedule
from fl_app.secagg import SecAggPlusRound
from fl_app.server_opt import ServerOptimizer
from fl_app.strategy import TransferFedAvg
from fl_app.wire.exchange import ServerExchange

app = ServerApp()
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
# The input size ImageNet backbones were trained at: what photos want.
PHOTO_INPUT_SIZE = 224


def initial_model(
    config: RunConfig, image_shape: tuple[int, ...], num_classes: int
) -> tuple[keras.Model, str]:
    """Build the global model and say how its weights started.

    Returns the model and ``"imagenet"``, ``"random"`` or ``"file:<path>"``.
    EfficientNet-Lite0's ImageNet weights come from an installed package (converted
    on first use), so they need no download. What is not loaded (the head, or a
    random start) follows the run's seed, drawn right before the model is built.
    """
    weights, strict, backbone = config.weights, config.strict_weights, config.backbone

    def build(backbone_weights: str | None = None) -> keras.Model:
        if backbone_weights == "imagenet" and backbone == EFFICIENTNET_LITE0.name:
            # Converting the shipped checkpoint on first use builds a model, which draws
            # random numbers: convert before seeding, so the head starts the same
            # whether or not this machine had converted it before.
            imagenet_weights_file()
        keras.utils.set_random_seed(config.seed)
        return build_model(num_classes, image_shape, config.input_size, backbone_weights, backbone)

    if weights == "none":
        return build(), "random"
    if weights == "imagenet":
        try:
            return build("imagenet"), "imagenet"
        except Exception as err:  # keras raises bare Exception when a download fails
            if strict:
                raise RuntimeError(
                    f"weights=imagenet: ImageNet {BACKBONES[backbone].title} weights are "
                    f"unavailable ({err}) and strict-weights=true forbids random initialisation"
                ) from err
            log(
                WARNING,
                "!!! ImageNet weights are unavailable (%s): training starts from RANDOM "
                "initialisation, not transfer learning. %s, pass weights=<file>, or set "
                "strict-weights=true to make this an error.",
                err,
                BACKBONES[backbone].weights_hint,
            )
            return build(), "random"
    path = config.weights_file
    if path.name.endswith((".keras", ".weights.h5")):
        model = build()
        model.load_weights(path)
    else:
        model = build(str(path))
    return model, f"file:{path}"


def _saver(model: keras.Model, classes: tuple[str, ...]):
    def save(arrays: ArrayRecord, path: Path) -> None:
        load_arrayrecord(model, arrays)
        save_classifier(model, path, classes)

    return save


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


def _strategy_settings(config: RunConfig, optimizer: ServerOptimizer) -> str:
    """The hyper-parameters the run's strategy uses, for its log line."""
    if config.strategy == "fedprox":
        return f": proximal mu {config.proximal_mu:g} on the nodes"
    if config.strategy == "fedavgm":
        return (
            f": server learning rate {optimizer.learning_rate:g}, momentum {optimizer.momentum:g}"
        )
    if config.strategy in ("fedadam", "fedyogi"):
        return (
            f": server learning rate {optimizer.learning_rate:g}, beta_1 {optimizer.beta_1:g}, "
            f"beta_2 {optimizer.beta_2:g}, tau {optimizer.tau:g}"
        )
    if config.strategy == "fedadagrad":
        return f": server learning rate {optimizer.learning_rate:g}, tau {optimizer.tau:g}"
    return ""


def _check_resumable(config: RunConfig, classes: tuple[str, ...], run_dir: Path) -> None:
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


def _new_run_dir(config: RunConfig, context: Context, classes: tuple[str, ...], init: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.results_dir.format(time=stamp, run_id=context.run_id))
    run_dir = run_dir.expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(
        json.dumps(
            {
                "run_id": context.run_id,
                "run_config": config.to_flower(),
                "classes": list(classes),
                "init": init,
                "versions": {"flwr": flwr.__version__, "keras": keras.__version__},
            },
            indent=2,
        )
    )
    return run_dir


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run federated transfer learning (or continue one) and write the run folder."""
    try:
        config = RunConfig.parse(context.run_config)
        classes = run_classes(config)
        test, test_source = load_test_set(config, classes)
        checkpoint = None
        if config.resume:
            checkpoint = load_checkpoint(config.resume)
            _check_resumable(config, classes, Path(config.resume).expanduser())
    except ValueError as err:
        log(ERROR, "Invalid run config: %s", err)
        raise
    log(INFO, "%d classes: %s", len(classes), ", ".join(classes))
    best_by = _best_by(test_source, test is not None, config)
    image_shape = model_image_shape(config, test)
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
    if checkpoint is None:
        model, init = initial_model(config, image_shape, len(classes))
        run_dir, initial_arrays, done = _new_run_dir(config, context, classes, init), None, 0
    else:
        # The weights come from the checkpoint: no need to fetch pretrained ones.
        model, _ = initial_model(replace(config, weights="none"), image_shape, len(classes))
        run_dir, initial_arrays, done = (
            Path(config.resume).expanduser().resolve(),
            checkpoint.arrays,
            checkpoint.round,
        )
        init = f"resume:{run_dir}@{done}"
        log(INFO, "Resuming %s after round %d of %d", run_dir, done, config.num_server_rounds)
    compile_model(model, config.learning_rate)
    log(INFO, "Results of this run go to %s", run_dir)

    folder = RunFolder(
        run_dir,
        _saver(model, classes),
        {"init": init, "classes": list(classes), "best_by": best_by},
        tensorboard=True,
        best_by=best_by,
    )
    wire = ServerExchange(
        config.exchange, config.compression, trainable_keys(model, config.fine_tune_layers)
    )
    if checkpoint is not None:
        folder.continue_from(checkpoint)
        folder.run_info.setdefault("resumed", []).append(
            {"after_round": done, "run_id": context.run_id}
        )
        wire.restore(checkpoint.holders, checkpoint.bases)
    privacy = None
    if config.dp != "none":
        privacy = PrivacyBudget(
            config.dp_noise_multiplier, config.dp_delta, config.dp_target_epsilon
        )
        if checkpoint is not None:
            privacy.rounds = int(checkpoint.state.get("privacy", {}).get("rounds", 0))
        log(
            INFO,
            "Client-level DP (dp=%s): clip %g, noise multiplier %g, δ %g, ε target %s",
            config.dp,
            config.dp_clip,
            config.dp_noise_multiplier,
            config.dp_delta,
            f"{config.dp_target_epsilon:g}" if config.dp_target_epsilon else "none",
        )
        if config.max_update_norm_ratio:
            log(
                INFO,
                "dp=%s: no norm screen (max-update-norm-ratio); the clip bounds updates",
                config.dp,
            )
    server_optimizer = ServerOptimizer(
        config.strategy,
        config.server_learning_rate,
        config.server_momentum,
        config.beta_1,
        config.beta_2,
        config.tau,
    )
    if checkpoint is not None:
        server_optimizer.load_state(checkpoint.state_arrays)
    log(INFO, "Strategy %s%s", config.strategy, _strategy_settings(config, server_optimizer))
    secure = None
    if config.secure_aggregation == "secagg+":
        secure = SecAggPlusRound(config)
        log(
            INFO,
            "Secure aggregation: SecAgg+, updates clipped to L2 %g on the nodes, max weight %g, "
            "each secret split into %s, %s of them reconstruct it, %g s per stage; the server "
            "sees only their weighted mean, so max-update-norm-ratio and max-examples-ratio do "
            "not apply",
            secure.bound,
            secure.workflow.max_weight,
            f"{config.secagg_num_shares} shares"
            if config.secagg_num_shares
            else "one share per sampled node",
            config.secagg_threshold or "two thirds",
            secure.timeout,
        )
    strategy = TransferFedAvg(
        schedule=TransferSchedule.from_config(config),
        folder=folder,
        wire=wire,
        wait_for_nodes_timeout=config.wait_for_nodes_timeout,
        rounds_done=done,
        resumed=checkpoint is not None,
        seed=config.seed,
        combiner=Combiner(
            config.aggregation,
            config.trim_fraction,
            config.max_update_norm_ratio,
            config.max_examples_ratio,
        ),
        dp_clip=config.dp_clip,
        privacy=privacy,
        server_optimizer=server_optimizer,
        secure=secure,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=config.min_train_nodes,
        min_evaluate_nodes=config.min_evaluate_nodes,
        min_available_nodes=config.min_available_nodes,
    )
    if done >= config.num_server_rounds:
        log(INFO, "Nothing to resume: %s already did %d rounds", run_dir, done)
        return
    strategy.start(
        # Replies picked up as they come, not on Flower's 3 s beat (fl_app.grid).
        grid=PromptGrid(grid),
        initial_arrays=initial_arrays if initial_arrays is not None else to_arrayrecord(model),
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        train_config=ConfigRecord({CLASSES_KEY: list(classes)}),
        evaluate_config=ConfigRecord({CLASSES_KEY: list(classes)}),
        evaluate_fn=None
        if test is None
        else CentralEvaluation(
            model,
            test,
            config.batch_size,
            config.backbone,
            config.feature_cache_mb * 2**20 if config.feature_cache else 0,
        ),
    )
    log(INFO, "Run finished: metrics, best.keras and final.keras are in %s", run_dir)
