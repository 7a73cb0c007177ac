"""The run-config checks beyond one key's rule: keys that must agree, and the server's files.

`RunConfig.parse` calls them once every key has passed its own rule. Each raises
``ValueError`` with one line naming the keys (as ``name`` spells them), their
values and what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fl_app import values
from fl_app.backbones import BACKBONES

if TYPE_CHECKING:
    from fl_app.config import RunConfig

# Turns a Flower key into the name the user wrote (e.g. its Hydra path).
Name = Callable[[str], str]


def check_together(config: RunConfig, name: Name) -> None:
    """Refuse keys whose values do not go together (the backbone's layers, DP, SecAgg+)."""
    layers = BACKBONES[config.backbone].layers
    if config.fine_tune_layers > layers:
        raise ValueError(
            f"{name('fine-tune-layers')}={config.fine_tune_layers} is not allowed with "
            f"{name('backbone')}={config.backbone!r}: expected an integer in 0..{layers} "
            f"({BACKBONES[config.backbone].title}'s layers)"
        )
    if config.val_fraction == 0 and config.fraction_evaluate > 0:
        raise ValueError(
            f"{name('val-fraction')}=0 leaves nodes nothing to evaluate on: "
            f"expected {name('val-fraction')} > 0 or {name('fraction-evaluate')}=0"
        )
    if config.dp != "none":
        if config.aggregation != "mean":
            raise ValueError(
                f"{name('aggregation')}={config.aggregation!r} is not allowed with "
                f"{name('dp')}={config.dp!r}: expected 'mean' (clipping already bounds every "
                "update, and the privacy analysis holds for the plain average)"
            )
        if config.exchange != "trainable":
            raise ValueError(
                f"{name('exchange')}={config.exchange!r} is not allowed with {name('dp')}="
                f"{config.dp!r}: expected 'trainable' (noise is added to what travels, and "
                "the frozen backbone must not get any)"
            )
    if config.secure_aggregation != "none":
        _check_secure_aggregation(config, name)


def check_files(config: RunConfig, name: Name) -> None:
    """Refuse what the server cannot read or write.

    The dataset and test-data folders, the classes file, the resumed run folder, a
    readable HDF5/zip weights file, and a results-dir that can be made (nothing is
    made).
    """
    for spec_name, value in (("dataset", config.dataset), ("test-data", config.test_data)):
        if values.is_path(value) and not Path(value).expanduser().is_dir():
            raise ValueError(f"{name(spec_name)}={value!r} is not allowed: {value} is not a folder")
    if config.classes:
        try:
            values.parse_classes(config.classes)
        except ValueError as err:
            raise ValueError(str(err).replace("classes=", f"{name('classes')}=", 1)) from None
    if config.resume and not (Path(config.resume).expanduser() / values.CHECKPOINT_FILE).is_file():
        raise ValueError(
            f"{name('resume')}={config.resume!r} is not allowed: expected a run folder holding "
            f"{values.CHECKPOINT_FILE} (one written by fl_app after round 0)"
        )
    # Resuming, the weights come from the checkpoint.
    if config.weights_file is not None and not config.resume:
        problem = values.weights_file_problem(config.weights_file)
        if problem:
            raise ValueError(f"{name('weights')}={config.weights!r} is not allowed: {problem}")
    results_dir = Path(config.results_dir.format(time="x", run_id=0)).expanduser()
    folder = values.first_existing(results_dir)
    if not values.writable_folder(folder):
        raise ValueError(
            f"{name('results-dir')}={config.results_dir!r} is not allowed: "
            f"{folder} is not a writable folder"
        )


def _check_secure_aggregation(config: RunConfig, name: Name) -> None:
    mode = f"{name('secure-aggregation')}={config.secure_aggregation!r}"
    refusals = {
        "compression": (
            config.compression != "none",
            "'none' (a masked upload is integers the server cannot decompress)",
        ),
        "aggregation": (
            config.aggregation != "mean",
            "'mean' (under masking only the sum exists; no coordinate-wise rule can run)",
        ),
        "dp": (
            config.dp == "server",
            "'client' or 'none' (the server never sees a single update to clip)",
        ),
    }
    for key_name, (refused, expected) in refusals.items():
        if refused:
            value = getattr(config, key_name.replace("-", "_"))
            raise ValueError(
                f"{name(key_name)}={value!r} is not allowed with {mode}: expected {expected}"
            )
    if config.secagg_num_shares and config.secagg_threshold >= config.secagg_num_shares:
        raise ValueError(
            f"{name('secagg-threshold')}={config.secagg_threshold} is not allowed with "
            f"{name('secagg-num-shares')}={config.secagg_num_shares}: expected fewer "
            "shares to reconstruct a secret than there are"
        )
    if config.dp == "client" and config.secagg_clipping_range < config.dp_clip:
        raise ValueError(
            f"{name('secagg-clipping-range')}={config.secagg_clipping_range:g} is not allowed "
            f"with {name('dp-clip')}={config.dp_clip:g}: expected at least dp-clip (a "
            "clipped update's coordinates lie within ±dp-clip)"
        )
