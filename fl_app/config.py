"""Every run-config key, declared once, and its parse into a frozen `RunConfig`.

A key is a field of `RunConfig`: its Flower name is the field name with
hyphens (``num_server_rounds`` is ``num-server-rounds``), its type the field's,
its default the one ``[tool.flwr.app.config]`` in pyproject.toml carries, and
its metadata say what is allowed, its one-line help and where it lives in the
Hydra config (``conf/``). ``tests/test_config.py`` fails when pyproject or a
Hydra group adds, drops or mistypes a key. The rules of single values are
`fl_app.values`'s, the checks across keys and of the server's files
`fl_app.config_checks`'s.

This module imports no Keras: the launcher validates with it before any
process starts, and the ServerApp and ClientApp parse their run config with it.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_app import config_checks, values
from fl_app.backbones import BACKBONES, MIN_INPUT_SIZE
from fl_app.values import ANY, Rule, above, at_least, between, one_of, type_ok

# The Hydra group of keys the launcher sets per job rather than the user.
LAUNCHER = "launcher"


def key(
    default: Any, help: str, rule: Rule = ANY, group: str | None = None, leaf: str | None = None
) -> Any:
    """Declare a run-config key: a dataclass field with its rule, help and Hydra place.

    ``group`` is its Hydra config group (``None``: top level); ``leaf`` its name
    there when not the field's own (``dataset.name`` is the key ``dataset``).
    """
    return field(
        default=default, metadata={"rule": rule, "help": help, "group": group, "leaf": leaf}
    )


# `key` for the keys of one Hydra config group (``conf/<group>/``).
strategy_key = functools.partial(key, group="strategy")
dp_key = functools.partial(key, group="dp")
secagg_key = functools.partial(key, group="secure_aggregation")
model_key = functools.partial(key, group="model")
dataset_key = functools.partial(key, group="dataset")
partitioner_key = functools.partial(key, group="partitioner")


@dataclass(frozen=True)
class RunConfig:
    """The parsed run config: every key, typed and checked."""

    num_server_rounds: int = key(3, "Federated rounds.", at_least(1))
    fraction_train: float = strategy_key(
        1.0, "Share of available nodes sampled to train each round.", between(0, 1, "(]")
    )
    fraction_evaluate: float = strategy_key(
        1.0,
        "Share of available nodes sampled to evaluate each round (0 = none).",
        between(0, 1, "[]"),
    )
    min_train_nodes: int = strategy_key(
        2,
        "Fewest valid train replies that update the model; with fewer, the round keeps the "
        "previous model.",
        at_least(1),
    )
    min_evaluate_nodes: int = strategy_key(2, "Fewest nodes sampled for evaluation.", at_least(0))
    min_available_nodes: int = strategy_key(2, "Nodes to wait for before round 1.", at_least(1))
    round_timeout: int = strategy_key(
        1800,
        "Seconds a train or evaluate round waits for replies; late and missing nodes are logged "
        "and counted (`missing_replies`), and the replies that came are used. A node's first "
        "round pays the frozen-part pass over its data: size it for that.",
        at_least(1),
    )
    wait_for_nodes_timeout: int = strategy_key(
        600,
        "Seconds to wait for `min-available-nodes` connected nodes before a round; fewer after "
        "that fails the run with one line.",
        at_least(1),
    )
    # What travels.
    exchange: str = strategy_key(
        "trainable",
        "`trainable`: a node gets the full model once, then only the arrays that train, both ways;"
        " `full`: every array every round.",
        one_of(values.EXCHANGES),
    )
    compression: str = strategy_key(
        "none",
        "`none`, `float16` or `int8` for the arrays of every round, both directions.",
        one_of(values.COMPRESSIONS),
    )
    # The federated algorithm.
    strategy: str = strategy_key(
        "fedavg",
        "`fedavg`, `fedprox` (nodes add μ/2·‖w - w_global‖² to their loss), or a server "
        "optimiser on the combined update: `fedavgm` (momentum), `fedadam`, `fedyogi`, "
        "`fedadagrad`.",
        one_of(values.STRATEGIES),
        leaf="name",
    )
    server_learning_rate: float = strategy_key(
        0.0,
        "fedavgm/fedadam/fedyogi/fedadagrad: the server's step size η (0 = Flower's default: "
        "1.0 fedavgm, 0.1 fedadam and fedadagrad, 0.01 fedyogi).",
        at_least(0, "a number"),
    )
    server_momentum: float = strategy_key(
        0.9, "fedavgm: momentum of the server's update.", between(0, 1, "[)")
    )
    beta_1: float = strategy_key(
        0.9, "fedadam/fedyogi: decay of the first moment.", between(0, 1, "[)")
    )
    beta_2: float = strategy_key(
        0.99, "fedadam/fedyogi: decay of the second moment.", between(0, 1, "[)")
    )
    tau: float = strategy_key(
        0.0,
        "fedadam/fedyogi/fedadagrad: the adaptivity τ added to √v (0 = Flower's default: 1e-9, "
        "1e-3 fedyogi).",
        at_least(0, "a number"),
    )
    proximal_mu: float = strategy_key(
        0.01, "fedprox: μ of the proximal term (0 = FedAvg).", at_least(0, "a number")
    )
    # Robust aggregation.
    aggregation: str = strategy_key(
        "mean",
        "How a round's validated updates combine: `mean` (weighted by `num-examples`), or "
        "coordinate-wise `trimmed-mean` or `median` (unweighted; robust to a few bad nodes).",
        one_of(values.AGGREGATIONS),
    )
    trim_fraction: float = strategy_key(
        0.2,
        "`trimmed-mean`: share of the updates cut from each end, per coordinate.",
        between(0, 0.5, "[)"),
    )
    max_update_norm_ratio: float = strategy_key(
        10.0,
        "Reject an update whose L2 norm exceeds this multiple of the round's median update norm "
        "(0 = off; needs 3+ replies to catch anything; off under DP, whose clip bounds every "
        "update).",
        Rule(lambda v: v == 0 or v > 1, "0 (off) or a number > 1"),
    )
    max_examples_ratio: float = strategy_key(
        10.0,
        "`mean`: a reply's weight (`num-examples`) is capped at this multiple of the round's "
        "median claim, so one node cannot outweigh the rest by claiming more (0 = no cap).",
        Rule(lambda v: v == 0 or v >= 1, "0 (no cap) or a number >= 1"),
    )
    # Client-level differential privacy.
    dp: str = dp_key(
        "none",
        "Client-level DP-FedAvg: `server` clips each update on the server, `client` on the node "
        "before it leaves; both add Gaussian noise to the average on the server "
        "([privacy](docs/privacy.md)).",
        one_of(values.DP_MODES),
        leaf="mode",
    )
    dp_clip: float = dp_key(
        1.0, "L2 norm each node's update is clipped to (the sensitivity).", above(0), leaf="clip"
    )
    dp_noise_multiplier: float = dp_key(
        1.0,
        "Noise standard deviation over `dp-clip`, on the sum of the clipped updates.",
        above(0),
        leaf="noise_multiplier",
    )
    dp_delta: float = dp_key(
        1e-5,
        "δ of the (ε, δ) reported each round; keep it well below 1 / number of nodes.",
        between(0, 1, "()"),
        leaf="delta",
    )
    dp_target_epsilon: float = dp_key(
        0.0,
        "Privacy budget: the run stops before a round that would take ε past it (0 = no limit).",
        at_least(0, "a number"),
        leaf="target_epsilon",
    )
    # Secure aggregation (Flower's SecAgg+): the server learns only the sum of the updates.
    secure_aggregation: str = secagg_key(
        "none",
        "`secagg+`: each node masks its clipped update with Flower's SecAgg+ protocol, so the "
        "server learns only the weighted sum ([privacy](docs/privacy.md#secure-aggregation)).",
        one_of(values.SECURE_AGGREGATIONS),
        leaf="mode",
    )
    secagg_num_shares: int = secagg_key(
        0,
        "secagg+: shares each node's secrets are split into, one per neighbour and its own, "
        "odd (0 = every sampled node is a neighbour).",
        Rule(
            lambda v: v == 0 or (v >= 3 and v % 2 == 1),
            "0 (all sampled nodes) or an odd integer >= 3 (the neighbours lie on both sides)",
        ),
        leaf="num_shares",
    )
    secagg_threshold: int = secagg_key(
        0,
        "secagg+: shares that reconstruct a secret; a node needs this many neighbours to stay, "
        "and this many must collude with the server to unmask it (0 = two thirds of the shares).",
        Rule(lambda v: v == 0 or v >= 2, "0 (two thirds of the shares) or an integer >= 2"),
        leaf="threshold",
    )
    secagg_clipping_range: float = secagg_key(
        8.0,
        "secagg+: each node clips its update to this L2 norm (`dp-clip` with `dp=client`), so "
        "every coordinate lies within ±it, where it is quantized to 2^22 levels.",
        above(0),
        leaf="clipping_range",
    )
    secagg_max_weight: float = secagg_key(
        10000.0,
        "secagg+: the largest `num-examples` a node may weigh its update by (a node with more "
        "refuses to send); smaller is more precise. Unused with `dp=client` (all weigh 1).",
        above(0),
        leaf="max_weight",
    )
    secagg_timeout: int = secagg_key(
        0,
        "secagg+: seconds each of the protocol's four stages waits for replies, training "
        "included: at least the slowest node's training (0 = round-timeout).",
        at_least(0),
        leaf="timeout",
    )
    # Local training.
    local_epochs: int = key(1, "Epochs each node trains per round.", at_least(1))
    batch_size: int = key(32, "Batch size of local training and evaluation.", at_least(1))
    # Transfer schedule.
    learning_rate: float = key(0.001, "Adam learning rate of the head rounds.", above(0))
    head_rounds: int = key(
        2, "Rounds 1..head-rounds train the head with the backbone frozen.", at_least(0)
    )
    fine_tune_layers: int = model_key(
        32,
        "Backbone layers unfrozen afterwards (32 = ResNet50's conv5 block, 0 = never).",
        at_least(0),
    )
    fine_tune_learning_rate: float = key(0.0001, "Learning rate after `head-rounds`.", above(0))
    # Model.
    backbone: str = model_key(
        "resnet50",
        "`resnet50` or `efficientnet_lite0` ([EfficientNet-Lite0](docs/efficientnet_lite0.md)).",
        one_of(BACKBONES),
    )
    input_size: int = model_key(
        32,
        "Side of the square image the backbone sees (≥ 32; ImageNet models like 224, at ~30x the "
        "cost).",
        at_least(MIN_INPUT_SIZE),
    )
    weights: str = model_key(
        "imagenet",
        "`imagenet`, `none`, or a file: a no-top backbone `.h5`, or a `.keras`/`.weights.h5` of "
        "the whole model (e.g. a previous `final.keras`).",
        Rule(
            values.weights_ok, "imagenet, none, or an existing .keras/.weights.h5/.h5 weights file"
        ),
    )
    strict_weights: bool = model_key(
        False,
        "Make unavailable ImageNet weights an error instead of a warning and random "
        "initialisation.",
    )
    augmentation: str = model_key(
        "none",
        "Training-time `shift` (up to 10% each way) or `flip-shift` (also a left-right mirror; "
        "wrong for digits); bypasses the feature cache.",
        one_of(values.AUGMENTATIONS),
    )
    feature_cache: bool = model_key(
        True,
        "Nodes compute the frozen part's output once and train and evaluate the rest on it; "
        "the server does the same for its test set (exact).",
    )
    feature_cache_mb: int = model_key(
        1024,
        "Memory (and, deployed, disk) for cached activations, in MB: on each node, and on "
        "the server for its test set.",
        at_least(1),
    )
    personalize_epochs: int = key(
        0,
        "Evaluation also fine-tunes a copy of the head on the node's train split for this many "
        "epochs and reports `personalized_accuracy` (the global model is unchanged; 0 = off).",
        at_least(0),
    )
    # Data.
    dataset: str = dataset_key(
        "fashion_mnist",
        "A simulation's data (deployed nodes bring their own): `fashion_mnist`, `mnist`, "
        "`cifar10`, an absolute folder path (class subfolders of PNG/JPEG images, optionally "
        "under `train/` and `test/`; parquet files; a `save_to_disk` dataset), or a Hugging Face "
        "hub id such as `uoft-cs/cifar10`.",
        Rule(values.dataset_ok, values.DATASET_ALLOWED),
        leaf="name",
    )
    classes: str = dataset_key(
        "",
        "The run's class names, which fix each class's output index on every node: "
        "`normal,pneumonia` or a `.txt` file with one per line; empty: the dataset's own.",
        Rule(values.classes_ok, "at least two distinct names, comma-separated, or a .txt file"),
    )
    image_column: str = dataset_key(
        "", "Hugging Face datasets: the image column (empty: the one `Image` column)."
    )
    label_column: str = dataset_key(
        "",
        "Hugging Face datasets: the label column (empty: the one `ClassLabel` column, else "
        "`label`).",
    )
    test_data: str = dataset_key(
        values.OWN_TEST_SPLIT,
        "The server's test set for centralised evaluation: empty = the dataset's test split if "
        "it has one, `none`, or a dataset as for `dataset`; without one, `best.keras` follows "
        "federated evaluation.",
        Rule(
            lambda v: v in (values.OWN_TEST_SPLIT, values.NO_TEST_DATA) or values.dataset_ok(v),
            f"empty, none, {values.DATASET_ALLOWED}",
        ),
    )
    partitioner: str = partitioner_key(
        "iid",
        "`iid` (stride split `x[i::n]`) or `dirichlet` (flwr-datasets' `DirichletPartitioner` on "
        "the labels).",
        one_of(values.PARTITIONERS),
        leaf="name",
    )
    dirichlet_alpha: float = partitioner_key(
        0.5, "Concentration of the Dirichlet label mix (smaller = more skewed).", above(0)
    )
    seed: int = key(
        42, "Partitions, node subsets, weight initialisation, local shuffling.", at_least(0)
    )
    max_examples_per_node: int = dataset_key(
        600, "Cap on each node's partition, for quick runs (0 = all).", at_least(0)
    )
    val_fraction: float = dataset_key(
        0.1, "Share of each node's data kept for federated evaluation.", between(0, 1, "[)")
    )
    max_test_examples: int = dataset_key(
        2000, "Cap on the server's test set (0 = all).", at_least(0)
    )
    resume: str = key(
        "",
        "A run folder to continue: its last checkpoint's round + 1 up to `num-server-rounds`, "
        "appending to its `metrics.json` (empty: a new run).",
    )
    results_dir: str = key(
        "outputs/{time}-run{run_id}",
        "The run folder; `{time}` and `{run_id}` are filled in; a relative path starts from where "
        "the SuperLink was started.",
        Rule(values.template_ok, "a folder path, optionally with {time} and {run_id} placeholders"),
        LAUNCHER,
    )

    @classmethod
    def parse(
        cls,
        values: Mapping[str, Any],
        name: Callable[[str], str] | None = None,
        check_files: bool = True,
    ) -> RunConfig:
        """Check a Flower run config and return it typed.

        Raises ``ValueError`` with one line naming the first bad key, its value and
        what is allowed. ``name`` turns a Flower key into the name the user wrote
        (e.g. the Hydra path); ``check_files`` also checks what the server reads and
        writes (not on nodes): the dataset and test-data folders, the classes file, a
        readable HDF5/zip weights file, and a results-dir that can be made.
        """
        name = name or (lambda flower: flower)
        parsed: dict[str, Any] = {}
        for spec in fields():
            flower = flower_key(spec)
            if flower not in values:
                raise ValueError(f"{name(flower)} is missing: expected {_allowed(spec)}")
            value = values[flower]
            if not type_ok(value, spec.type) or not spec.metadata["rule"].ok(value):
                raise ValueError(
                    f"{name(flower)}={value!r} is not allowed: expected {_allowed(spec)}"
                )
            parsed[spec.name] = spec.type(value)
        config = cls(**parsed)
        config_checks.check_together(config, name)
        if check_files:
            config_checks.check_files(config, name)
        return config

    @property
    def weights_file(self) -> Path | None:
        """The start weights' file, or ``None`` for ``imagenet`` and ``none``."""
        if self.weights in ("imagenet", "none"):
            return None
        return Path(self.weights).expanduser().resolve()

    def to_flower(self) -> dict[str, Any]:
        """The Flower run config: ``{flower key: value}``."""
        return {flower_key(spec): getattr(self, spec.name) for spec in fields()}


def fields() -> tuple[dataclasses.Field, ...]:
    """The declared keys, in declaration order, with their types resolved."""
    return _FIELDS


def flower_key(spec: dataclasses.Field) -> str:
    """The Flower name of a key: ``num_server_rounds`` → ``num-server-rounds``."""
    return spec.name.replace("_", "-")


def defaults() -> dict[str, Any]:
    """Every key's default, by Flower name (what pyproject.toml declares)."""
    return {flower_key(spec): spec.default for spec in fields()}


def _allowed(spec: dataclasses.Field) -> str:
    allowed = spec.metadata["rule"].allowed
    if allowed:
        return allowed
    return "true or false" if spec.type is bool else f"a {spec.type.__name__}"


def _resolved_fields() -> tuple[dataclasses.Field, ...]:
    hints = typing.get_type_hints(RunConfig)
    specs = dataclasses.fields(RunConfig)
    for spec in specs:
        spec.type = hints[spec.name]
    return specs


_FIELDS = _resolved_fields()
