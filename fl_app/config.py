"""Run configuration: the rules of Flower's run-config keys, and the Hydra schema.

``[tool.flwr.app.config]`` in pyproject.toml is the single source of defaults.
The Hydra config in ``conf/`` carries the same keys by one rule:

* a top-level leaf ``num_server_rounds`` is the Flower key ``num-server-rounds``
  (underscores become hyphens);
* a leaf inside a group, ``strategy.fraction_train``, is ``fraction-train``: the
  group is dropped;
* a group's ``name`` leaf is the key named after the group: ``dataset.name`` is
  ``dataset``, ``partitioner.name`` is ``partitioner``;
* the ``federation`` group says where a run goes, not how it trains: it is not
  part of the run config, and ``results-dir`` is set by the launcher.

``tests/test_config.py`` fails when the two drift apart.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from fl_app.wire.compression import METHODS
from fl_app.data import DATASETS, PARTITIONERS
from fl_app.wire.exchange import EXCHANGES
from fl_app.model.classifier import (
    AUGMENTATIONS,
    BACKBONE_LAYER_COUNTS,
    BACKBONE_LAYERS,
    BACKBONES,
    CONV5_LAYERS,
    MIN_INPUT_SIZE,
)

LAUNCHER_GROUPS = ("federation",)
LAUNCHER_KEYS = ("results-dir",)
RESULTS_DIR_FIELDS = ("time", "run_id")
WEIGHT_CHOICES = "imagenet, none, or an existing .keras/.weights.h5/.h5 weights file"


def _template_ok(value: str) -> bool:
    fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    return bool(value) and fields <= set(RESULTS_DIR_FIELDS)


# Flower key: (type, test, what is allowed). Flower itself refuses unknown keys.
RULES: dict[str, tuple[type, Callable[[Any], bool], str]] = {
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
    "backbone": (str, lambda v: v in BACKBONES, "one of " + ", ".join(BACKBONES)),
    "input-size": (int, lambda v: v >= MIN_INPUT_SIZE, f"an integer >= {MIN_INPUT_SIZE}"),
    "weights": (
        str,
        lambda v: v in ("imagenet", "none") or Path(v).expanduser().is_file(),
        WEIGHT_CHOICES,
    ),
    "strict-weights": (bool, lambda v: True, "true or false"),
    "exchange": (str, lambda v: v in EXCHANGES, "one of " + ", ".join(EXCHANGES)),
    "compression": (str, lambda v: v in METHODS, "one of " + ", ".join(METHODS)),
    "augmentation": (str, lambda v: v in AUGMENTATIONS, "one of " + ", ".join(AUGMENTATIONS)),
    "feature-cache": (bool, lambda v: True, "true or false"),
    "feature-cache-mb": (int, lambda v: v >= 1, "an integer >= 1 (megabytes)"),
    "dataset": (str, lambda v: v in DATASETS, "one of " + ", ".join(DATASETS)),
    "partitioner": (str, lambda v: v in PARTITIONERS, "one of " + ", ".join(PARTITIONERS)),
    "dirichlet-alpha": (float, lambda v: v > 0, "a number > 0"),
    "seed": (int, lambda v: v >= 0, "an integer >= 0"),
    "max-examples-per-node": (int, lambda v: v >= 0, "an integer >= 0 (0 = no cap)"),
    "val-fraction": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "max-test-examples": (int, lambda v: v >= 0, "an integer >= 0 (0 = the whole test set)"),
    "results-dir": (
        str,
        _template_ok,
        "a folder path, optionally with {time} and {run_id} placeholders",
    ),
}


def _type_ok(value: Any, kind: type) -> bool:
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    # TOML and --run-config give ints for whole numbers; they are valid floats.
    return isinstance(value, (int, float) if kind is float else kind)


def validate_run_config(
    run_config: Mapping[str, Any], name: Callable[[str], str] = lambda key: key
) -> None:
    """Raise ``ValueError`` naming the first bad key, its value and what is allowed.

    ``name`` turns a Flower key into the name the user wrote (e.g. a Hydra path).
    """
    for key, (kind, ok, allowed) in RULES.items():
        if key not in run_config:
            raise ValueError(f"{name(key)} is missing: expected {allowed}")
        value = run_config[key]
        if not _type_ok(value, kind) or not ok(value):
            raise ValueError(f"{name(key)}={value!r} is not allowed: expected {allowed}")
    backbone, layers = run_config["backbone"], run_config["fine-tune-layers"]
    if layers > BACKBONE_LAYER_COUNTS[backbone]:
        raise ValueError(
            f"{name('fine-tune-layers')}={layers} is not allowed with "
            f"{name('backbone')}={backbone!r}: expected an integer in "
            f"0..{BACKBONE_LAYER_COUNTS[backbone]} ({backbone}'s layers)"
        )
    if run_config["val-fraction"] == 0 and run_config["fraction-evaluate"] > 0:
        raise ValueError(
            f"{name('val-fraction')}=0 leaves nodes nothing to evaluate on: "
            f"expected {name('val-fraction')} > 0 or {name('fraction-evaluate')}=0"
        )


def flower_key(path: str) -> str:
    """The Flower run-config key of a Hydra leaf path (see the module docstring)."""
    *groups, leaf = path.split(".")
    if groups and leaf == "name":
        leaf = groups[-1]
    return leaf.replace("_", "-")


def to_run_config(cfg: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """Map a composed Hydra config onto Flower keys: ``{key: (hydra path, value)}``."""
    out: dict[str, tuple[str, Any]] = {}
    for top, value in cfg.items():
        if top in LAUNCHER_GROUPS or top == "hydra":
            continue
        leaves = value.items() if isinstance(value, Mapping) else [(None, value)]
        for leaf, leaf_value in leaves:
            path = top if leaf is None else f"{top}.{leaf}"
            key = flower_key(path)
            if key in out:
                raise ValueError(f"{path} and {out[key][0]} both map to Flower key '{key}'")
            out[key] = (path, leaf_value)
    return out


# ---- Hydra schema: types come from here, values from conf/*.yaml -------------


@dataclass
class FederationConfig:
    """Where a run goes: a local simulation or a SuperLink of a deployment."""

    kind: str = MISSING
    # simulation
    num_supernodes: int = 2
    client_num_cpus: int = 2
    client_num_gpus: float = 0.0
    # deployment
    address: str | None = None
    insecure: bool = False
    root_certificates: str | None = None


@dataclass
class ModelConfig:
    """The model group."""

    backbone: str = MISSING
    input_size: int = MISSING
    weights: str = MISSING
    strict_weights: bool = MISSING
    fine_tune_layers: int = MISSING
    augmentation: str = MISSING
    feature_cache: bool = MISSING
    feature_cache_mb: int = MISSING


@dataclass
class DatasetConfig:
    """The dataset group."""

    name: str = MISSING
    max_examples_per_node: int = MISSING
    val_fraction: float = MISSING
    max_test_examples: int = MISSING


@dataclass
class PartitionerConfig:
    """The partitioner group."""

    name: str = MISSING
    dirichlet_alpha: float = MISSING


@dataclass
class StrategyConfig:
    """The strategy group (FedAvg sampling)."""

    fraction_train: float = MISSING
    fraction_evaluate: float = MISSING
    min_train_nodes: int = MISSING
    min_evaluate_nodes: int = MISSING
    min_available_nodes: int = MISSING
    exchange: str = MISSING
    compression: str = MISSING


@dataclass
class ExperimentConfig:
    """The whole experiment: groups plus top-level run settings."""

    federation: FederationConfig = field(default_factory=FederationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    partitioner: PartitionerConfig = field(default_factory=PartitionerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    num_server_rounds: int = MISSING
    local_epochs: int = MISSING
    batch_size: int = MISSING
    learning_rate: float = MISSING
    head_rounds: int = MISSING
    fine_tune_learning_rate: float = MISSING
    seed: int = MISSING
