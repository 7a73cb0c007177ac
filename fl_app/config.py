"""Every run-config key, declared once, and its parse into a frozen `RunConfig`.

A key is a field of `RunConfig`: its Flower name is the field name with
hyphens (``num_server_rounds`` is ``num-server-rounds``), its type the field's,
its default the one ``[tool.flwr.app.config]`` in pyproject.toml carries, and
its metadata say what is allowed, its one-line help and where it lives in the
Hydra config (``conf/``). ``tests/test_config.py`` fails when pyproject or a
Hydra group adds, drops or mistypes a key.

This module imports no Keras: the launcher validates with it before any
process starts, and the ServerApp and ClientApp parse their run config with it.
"""

from __future__ import annotations

import dataclasses
import re
import string
import tempfile
import typing
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_app.model.backbones import BACKBONES, MIN_INPUT_SIZE

DATASETS = ("fashion_mnist", "mnist", "cifar10")
PARTITIONERS = ("iid", "dirichlet")
EXCHANGES = ("trainable", "full")
COMPRESSIONS = ("none", "float16", "int8")
# Random changes that keep the label: a shift by up to 10% of the side, and for
# datasets whose mirror images are the same class, a left-right flip.
AUGMENTATIONS = ("none", "shift", "flip-shift")
# What the server does with the round's combined update (Flower's rules, on our arrays).
STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
# How the validated updates of a round are combined (coordinate-wise but for `mean`).
AGGREGATIONS = ("mean", "trimmed-mean", "median")
# Client-level differential privacy: off, clipped on the server, or on the node.
DP_MODES = ("none", "server", "client")
# Secure aggregation of the train replies: off, or Flower's SecAgg+ protocol.
SECURE_AGGREGATIONS = ("none", "secagg+")
WEIGHT_FILE_SUFFIXES = (".keras", ".weights.h5", ".h5")
# A Hugging Face hub dataset id: owner/name.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
DATASET_ALLOWED = (
    f"{', '.join(DATASETS)}, a folder (class subfolders of images, parquet files or a "
    "save_to_disk dataset), or a Hugging Face hub id such as uoft-cs/cifar10"
)
# `test-data` values besides a dataset: the dataset's own test split, or none.
OWN_TEST_SPLIT, NO_TEST_DATA = "", "none"
CLASSES_FILE_SUFFIX = ".txt"
# What a run folder holds after every round: the records (the ServerApp's, read by the
# launcher and sweeps), and the checkpoint `resume` continues from.
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.json"
# The HDF5 signature, at the start of every file Keras and h5py write (a user
# block would move it to offset 512, 1024, ...; neither writes one).
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
RESULTS_DIR_FIELDS = ("time", "run_id")
# The Hydra group of keys the launcher sets per job rather than the user.
LAUNCHER = "launcher"
# A deployed node's own setting (--node-config), not the run's: whether its messages go
# to a warm worker (`fl_app.node_worker`).
WARM_WORKER_KEY = "warm-worker"


@dataclass(frozen=True)
class Rule:
    """What a value must satisfy, and how the error message says it."""

    ok: Callable[[Any], bool]
    allowed: str


def at_least(low: float, what: str = "an integer") -> Rule:
    """``value >= low``."""
    return Rule(lambda v: v >= low, f"{what} >= {low:g}")


def above(low: float) -> Rule:
    """``value > low``."""
    return Rule(lambda v: v > low, f"a number > {low:g}")


def one_of(choices: typing.Iterable[str]) -> Rule:
    """``value in choices``."""
    allowed = tuple(choices)
    return Rule(lambda v: v in allowed, "one of " + ", ".join(allowed))


ANY = Rule(lambda v: True, "")


def _weights_ok(value: str) -> bool:
    # Whether the file exists is checked where it is read (`RunConfig.parse`'s check_files).
    return value in ("imagenet", "none") or value.endswith(WEIGHT_FILE_SUFFIXES)


def is_path(value: str) -> bool:
    """Whether a dataset value is written as a path rather than a name or hub id."""
    return value.startswith(("/", "~", ".")) or "\\" in value


def _dataset_ok(value: str) -> bool:
    return value in DATASETS or is_path(value) or HUB_ID.fullmatch(value) is not None


def parse_classes(value: str) -> tuple[str, ...]:
    """The class names of a ``classes`` value: ``"a,b,c"``, or a ``.txt`` file, one per line.

    ``""`` (derive them from the dataset) gives ``()``. Raises ``ValueError`` with
    one line when there are fewer than two or a name repeats.
    """
    if not value:
        return ()
    if value.endswith(CLASSES_FILE_SUFFIX):
        path = Path(value).expanduser()
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except OSError as err:
            raise ValueError(
                f"classes={value!r} cannot be read ({err.strerror}): expected a file of class "
                "names, one per line"
            ) from err
    else:
        names = [name.strip() for name in value.split(",")]
    names = [name for name in names if name]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if len(names) < 2 or repeated:
        problem = f"{repeated[0]!r} repeats" if repeated else f"{len(names)} name(s)"
        raise ValueError(
            f"classes={value!r} is not allowed ({problem}): expected at least two distinct "
            "names, comma-separated or one per line of a .txt file"
        )
    return tuple(names)


def _classes_ok(value: str) -> bool:
    if value.endswith(CLASSES_FILE_SUFFIX):
        return True  # read where the classes are decided (`RunConfig.parse`'s check_files)
    try:
        parse_classes(value)
    except ValueError:
        return False
    return True


def _template_ok(value: str) -> bool:
    fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    return bool(value) and fields <= set(RESULTS_DIR_FIELDS)


def key(
    default: Any,
    help: str,
    rule: Rule = ANY,
    group: str | None = None,
    leaf: str | None = None,
) -> Any:
    """Declare a run-config key: a dataclass field with its rule, help and Hydra place.

    ``group`` is its Hydra config group (``None``: top level); ``leaf`` its name
    there when not the field's own (``dataset.name`` is the key ``dataset``).
    """
    return field(
        default=default, metadata={"rule": rule, "help": help, "group": group, "leaf": leaf}
    )


@dataclass(frozen=True)
class RunConfig:
    """The parsed run config: every key, typed and checked."""

    # Rounds and sampling (FedAvg).
    num_server_rounds: int = key(3, "Federated rounds.", at_least(1))
    fraction_train: float = key(
        1.0,
        "Share of available nodes sampled to train each round.",
        Rule(lambda v: 0 < v <= 1, "a number in (0, 1]"),
        "strategy",
    )
    fraction_evaluate: float = key(
        1.0,
        "Share of available nodes sampled to evaluate each round (0 = none).",
        Rule(lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        "strategy",
    )
    min_train_nodes: int = key(
        2,
        "Fewest valid train replies that update the model; with fewer, the round keeps the "
        "previous model.",
        at_least(1),
        "strategy",
    )
    min_evaluate_nodes: int = key(
        2, "Fewest nodes sampled for evaluation.", at_least(0), "strategy"
    )
    min_available_nodes: int = key(2, "Nodes to wait for before round 1.", at_least(1), "strategy")
    round_timeout: int = key(
        1800,
        "Seconds a train or evaluate round waits for replies; late and missing nodes are logged "
        "and counted (`missing_replies`), and the replies that came are used. A node's first "
        "round pays the frozen-part pass over its data: size it for that.",
        at_least(1),
        "strategy",
    )
    wait_for_nodes_timeout: int = key(
        600,
        "Seconds to wait for `min-available-nodes` connected nodes before a round; fewer after "
        "that fails the run with one line.",
        at_least(1),
        "strategy",
    )
    # What travels.
    exchange: str = key(
        "trainable",
        "`trainable`: a node gets the full model once, then only the arrays that train, both ways;"
        " `full`: every array every round.",
        one_of(EXCHANGES),
        "strategy",
    )
    compression: str = key(
        "none",
        "`none`, `float16` or `int8` for the arrays of every round, both directions.",
        one_of(COMPRESSIONS),
        "strategy",
    )
    # The federated algorithm.
    strategy: str = key(
        "fedavg",
        "`fedavg`, `fedprox` (nodes add μ/2·‖w - w_global‖² to their loss), or a server "
        "optimiser on the combined update: `fedavgm` (momentum), `fedadam`, `fedyogi`, "
        "`fedadagrad`.",
        one_of(STRATEGIES),
        "strategy",
        "name",
    )
    server_learning_rate: float = key(
        0.0,
        "fedavgm/fedadam/fedyogi/fedadagrad: the server's step size η (0 = Flower's default: "
        "1.0 fedavgm, 0.1 fedadam and fedadagrad, 0.01 fedyogi).",
        at_least(0, "a number"),
        "strategy",
    )
    server_momentum: float = key(
        0.9,
        "fedavgm: momentum of the server's update.",
        Rule(lambda v: 0 <= v < 1, "a number in [0, 1)"),
        "strategy",
    )
    beta_1: float = key(
        0.9,
        "fedadam/fedyogi: decay of the first moment.",
        Rule(lambda v: 0 <= v < 1, "a number in [0, 1)"),
        "strategy",
    )
    beta_2: float = key(
        0.99,
        "fedadam/fedyogi: decay of the second moment.",
        Rule(lambda v: 0 <= v < 1, "a number in [0, 1)"),
        "strategy",
    )
    tau: float = key(
        0.0,
        "fedadam/fedyogi/fedadagrad: the adaptivity τ added to √v (0 = Flower's default: 1e-9, "
        "1e-3 fedyogi).",
        at_least(0, "a number"),
        "strategy",
    )
    proximal_mu: float = key(
        0.01, "fedprox: μ of the proximal term (0 = FedAvg).", at_least(0, "a number"), "strategy"
    )
    # Robust aggregation.
    aggregation: str = key(
        "mean",
        "How a round's validated updates combine: `mean` (weighted by `num-examples`), or "
        "coordinate-wise `trimmed-mean` or `median` (unweighted; robust to a few bad nodes).",
        one_of(AGGREGATIONS),
        "strategy",
    )
    trim_fraction: float = key(
        0.2,
        "`trimmed-mean`: share of the updates cut from each end, per coordinate.",
        Rule(lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
        "strategy",
    )
    max_update_norm_ratio: float = key(
        10.0,
        "Reject an update whose L2 norm exceeds this multiple of the round's median update norm "
        "(0 = off; needs 3+ replies to catch anything; off under DP, whose clip bounds every "
        "update).",
        Rule(lambda v: v == 0 or v > 1, "0 (off) or a number > 1"),
        "strategy",
    )
    max_examples_ratio: float = key(
        10.0,
        "`mean`: a reply's weight (`num-examples`) is capped at this multiple of the round's "
        "median claim, so one node cannot outweigh the rest by claiming more (0 = no cap).",
        Rule(lambda v: v == 0 or v >= 1, "0 (no cap) or a number >= 1"),
        "strategy",
    )
    # Client-level differential privacy.
    dp: str = key(
        "none",
        "Client-level DP-FedAvg: `server` clips each update on the server, `client` on the node "
        "before it leaves; both add Gaussian noise to the average on the server "
        "([privacy](docs/privacy.md)).",
        one_of(DP_MODES),
        "dp",
        "mode",
    )
    dp_clip: float = key(
        1.0, "L2 norm each node's update is clipped to (the sensitivity).", above(0), "dp", "clip"
    )
    dp_noise_multiplier: float = key(
        1.0,
        "Noise standard deviation over `dp-clip`, on the sum of the clipped updates.",
        above(0),
        "dp",
        "noise_multiplier",
    )
    dp_delta: float = key(
        1e-5,
        "δ of the (ε, δ) reported each round; keep it well below 1 / number of nodes.",
        Rule(lambda v: 0 < v < 1, "a number in (0, 1)"),
        "dp",
        "delta",
    )
    dp_target_epsilon: float = key(
        0.0,
        "Privacy budget: the run stops before a round that would take ε past it (0 = no limit).",
        at_least(0, "a number"),
        "dp",
        "target_epsilon",
    )
    # Secure aggregation (Flower's SecAgg+): the server learns only the sum of the updates.
    secure_aggregation: str = key(
        "none",
        "`secagg+`: each node masks its clipped update with Flower's SecAgg+ protocol, so the "
        "server learns only the weighted sum ([privacy](docs/privacy.md#secure-aggregation)).",
        one_of(SECURE_AGGREGATIONS),
        "secure_aggregation",
        "mode",
    )
    secagg_num_shares: int = key(
        0,
        "secagg+: shares each node's secrets are split into, one per neighbour and its own, "
        "odd (0 = every sampled node is a neighbour).",
        Rule(
            lambda v: v == 0 or (v >= 3 and v % 2 == 1),
            "0 (all sampled nodes) or an odd integer >= 3 (the neighbours lie on both sides)",
        ),
        "secure_aggregation",
        "num_shares",
    )
    secagg_threshold: int = key(
        0,
        "secagg+: shares that reconstruct a secret; a node needs this many neighbours to stay, "
        "and this many must collude with the server to unmask it (0 = two thirds of the shares).",
        Rule(lambda v: v == 0 or v >= 2, "0 (two thirds of the shares) or an integer >= 2"),
        "secure_aggregation",
        "threshold",
    )
    secagg_clipping_range: float = key(
        8.0,
        "secagg+: each node clips its update to this L2 norm (`dp-clip` with `dp=client`), so "
        "every coordinate lies within ±it, where it is quantized to 2^22 levels.",
        above(0),
        "secure_aggregation",
        "clipping_range",
    )
    secagg_max_weight: float = key(
        10000.0,
        "secagg+: the largest `num-examples` a node may weigh its update by (a node with more "
        "refuses to send); smaller is more precise. Unused with `dp=client` (all weigh 1).",
        above(0),
        "secure_aggregation",
        "max_weight",
    )
    secagg_timeout: int = key(
        0,
        "secagg+: seconds each of the protocol's four stages waits for replies, training "
        "included: at least the slowest node's training (0 = round-timeout).",
        at_least(0),
        "secure_aggregation",
        "timeout",
    )
    # Local training.
    local_epochs: int = key(1, "Epochs each node trains per round.", at_least(1))
    batch_size: int = key(32, "Batch size of local training and evaluation.", at_least(1))
    # Transfer schedule.
    learning_rate: float = key(0.001, "Adam learning rate of the head rounds.", above(0))
    head_rounds: int = key(
        2, "Rounds 1..head-rounds train the head with the backbone frozen.", at_least(0)
    )
    fine_tune_layers: int = key(
        32,
        "Backbone layers unfrozen afterwards (32 = ResNet50's conv5 block, 0 = never).",
        at_least(0),
        "model",
    )
    fine_tune_learning_rate: float = key(0.0001, "Learning rate after `head-rounds`.", above(0))
    # Model.
    backbone: str = key(
        "resnet50",
        "`resnet50` or `efficientnet_lite0` ([EfficientNet-Lite0](docs/efficientnet_lite0.md)).",
        one_of(BACKBONES),
        "model",
    )
    input_size: int = key(
        32,
        "Side of the square image the backbone sees (≥ 32; ImageNet models like 224, at ~30x the "
        "cost).",
        at_least(MIN_INPUT_SIZE),
        "model",
    )
    weights: str = key(
        "imagenet",
        "`imagenet`, `none`, or a file: a no-top backbone `.h5`, or a `.keras`/`.weights.h5` of "
        "the whole model (e.g. a previous `final.keras`).",
        Rule(_weights_ok, "imagenet, none, or an existing .keras/.weights.h5/.h5 weights file"),
        "model",
    )
    strict_weights: bool = key(
        False,
        "Make unavailable ImageNet weights an error instead of a warning and random "
        "initialisation.",
        group="model",
    )
    augmentation: str = key(
        "none",
        "Training-time `shift` (up to 10% each way) or `flip-shift` (also a left-right mirror; "
        "wrong for digits); bypasses the feature cache.",
        one_of(AUGMENTATIONS),
        "model",
    )
    feature_cache: bool = key(
        True,
        "Nodes compute the frozen part's output once and train and evaluate the rest on it; "
        "the server does the same for its test set (exact).",
        group="model",
    )
    feature_cache_mb: int = key(
        1024,
        "Memory (and, deployed, disk) for cached activations, in MB: on each node, and on "
        "the server for its test set.",
        at_least(1),
        "model",
    )
    personalize_epochs: int = key(
        0,
        "Evaluation also fine-tunes a copy of the head on the node's train split for this many "
        "epochs and reports `personalized_accuracy` (the global model is unchanged; 0 = off).",
        at_least(0),
    )
    # Data.
    dataset: str = key(
        "fashion_mnist",
        "A simulation's data (deployed nodes bring their own): `fashion_mnist`, `mnist`, "
        "`cifar10`, an absolute folder path (class subfolders of PNG/JPEG images, optionally "
        "under `train/` and `test/`; parquet files; a `save_to_disk` dataset), or a Hugging Face "
        "hub id such as `uoft-cs/cifar10`.",
        Rule(_dataset_ok, DATASET_ALLOWED),
        "dataset",
        "name",
    )
    classes: str = key(
        "",
        "The run's class names, which fix each class's output index on every node: "
        "`normal,pneumonia` or a `.txt` file with one per line; empty: the dataset's own.",
        Rule(_classes_ok, "at least two distinct names, comma-separated, or a .txt file"),
        "dataset",
    )
    image_column: str = key(
        "",
        "Hugging Face datasets: the image column (empty: the one `Image` column).",
        group="dataset",
    )
    label_column: str = key(
        "",
        "Hugging Face datasets: the label column (empty: the one `ClassLabel` column, else "
        "`label`).",
        group="dataset",
    )
    test_data: str = key(
        OWN_TEST_SPLIT,
        "The server's test set for centralised evaluation: empty = the dataset's test split if "
        "it has one, `none`, or a dataset as for `dataset`; without one, `best.keras` follows "
        "federated evaluation.",
        Rule(
            lambda v: v in (OWN_TEST_SPLIT, NO_TEST_DATA) or _dataset_ok(v),
            f"empty, none, {DATASET_ALLOWED}",
        ),
        "dataset",
    )
    partitioner: str = key(
        "iid",
        "`iid` (stride split `x[i::n]`) or `dirichlet` (flwr-datasets' `DirichletPartitioner` on "
        "the labels).",
        one_of(PARTITIONERS),
        "partitioner",
        "name",
    )
    dirichlet_alpha: float = key(
        0.5,
        "Concentration of the Dirichlet label mix (smaller = more skewed).",
        above(0),
        "partitioner",
    )
    seed: int = key(
        42, "Partitions, node subsets, weight initialisation, local shuffling.", at_least(0)
    )
    max_examples_per_node: int = key(
        600, "Cap on each node's partition, for quick runs (0 = all).", at_least(0), "dataset"
    )
    val_fraction: float = key(
        0.1,
        "Share of each node's data kept for federated evaluation.",
        Rule(lambda v: 0 <= v < 1, "a number in [0, 1)"),
        "dataset",
    )
    max_test_examples: int = key(
        2000,
        "Cap on the server's test set (0 = all).",
        at_least(0),
        "dataset",
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
        Rule(_template_ok, "a folder path, optionally with {time} and {run_id} placeholders"),
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
            if not _type_ok(value, spec.type) or not spec.metadata["rule"].ok(value):
                raise ValueError(
                    f"{name(flower)}={value!r} is not allowed: expected {_allowed(spec)}"
                )
            parsed[spec.name] = spec.type(value)
        config = cls(**parsed)
        config._check_together(name, check_files)
        return config

    def _check_together(self, name: Callable[[str], str], check_files: bool) -> None:
        layers = BACKBONES[self.backbone].layers
        if self.fine_tune_layers > layers:
            raise ValueError(
                f"{name('fine-tune-layers')}={self.fine_tune_layers} is not allowed with "
                f"{name('backbone')}={self.backbone!r}: expected an integer in 0..{layers} "
                f"({BACKBONES[self.backbone].title}'s layers)"
            )
        if self.val_fraction == 0 and self.fraction_evaluate > 0:
            raise ValueError(
                f"{name('val-fraction')}=0 leaves nodes nothing to evaluate on: "
                f"expected {name('val-fraction')} > 0 or {name('fraction-evaluate')}=0"
            )
        if self.dp != "none":
            if self.aggregation != "mean":
                raise ValueError(
                    f"{name('aggregation')}={self.aggregation!r} is not allowed with "
                    f"{name('dp')}={self.dp!r}: expected 'mean' (clipping already bounds every "
                    "update, and the privacy analysis holds for the plain average)"
                )
            if self.exchange != "trainable":
                raise ValueError(
                    f"{name('exchange')}={self.exchange!r} is not allowed with {name('dp')}="
                    f"{self.dp!r}: expected 'trainable' (noise is added to what travels, and "
                    "the frozen backbone must not get any)"
                )
        if self.secure_aggregation != "none":
            self._check_secure_aggregation(name)
        if not check_files:
            return
        for spec_name, value in (("dataset", self.dataset), ("test-data", self.test_data)):
            if is_path(value) and not Path(value).expanduser().is_dir():
                raise ValueError(
                    f"{name(spec_name)}={value!r} is not allowed: {value} is not a folder"
                )
        if self.classes:
            try:
                parse_classes(self.classes)
            except ValueError as err:
                raise ValueError(str(err).replace("classes=", f"{name('classes')}=", 1)) from None
        if self.resume and not (Path(self.resume).expanduser() / CHECKPOINT_FILE).is_file():
            raise ValueError(
                f"{name('resume')}={self.resume!r} is not allowed: expected a run folder holding "
                f"{CHECKPOINT_FILE} (one written by fl_app after round 0)"
            )
        # Resuming, the weights come from the checkpoint.
        if self.weights_file is not None and not self.resume:
            problem = _weights_file_problem(self.weights_file)
            if problem:
                raise ValueError(f"{name('weights')}={self.weights!r} is not allowed: {problem}")
        folder = _first_existing(Path(self.results_dir.format(time="x", run_id=0)).expanduser())
        if not _writable_folder(folder):
            raise ValueError(
                f"{name('results-dir')}={self.results_dir!r} is not allowed: "
                f"{folder} is not a writable folder"
            )

    def _check_secure_aggregation(self, name: Callable[[str], str]) -> None:
        mode = f"{name('secure-aggregation')}={self.secure_aggregation!r}"
        refusals = {
            "compression": (
                self.compression != "none",
                "'none' (a masked upload is integers the server cannot decompress)",
            ),
            "aggregation": (
                self.aggregation != "mean",
                "'mean' (under masking only the sum exists; no coordinate-wise rule can run)",
            ),
            "dp": (
                self.dp == "server",
                "'client' or 'none' (the server never sees a single update to clip)",
            ),
        }
        for key_name, (refused, expected) in refusals.items():
            if refused:
                value = getattr(self, key_name.replace("-", "_"))
                raise ValueError(
                    f"{name(key_name)}={value!r} is not allowed with {mode}: expected {expected}"
                )
        if self.secagg_num_shares and self.secagg_threshold >= self.secagg_num_shares:
            raise ValueError(
                f"{name('secagg-threshold')}={self.secagg_threshold} is not allowed with "
                f"{name('secagg-num-shares')}={self.secagg_num_shares}: expected fewer "
                "shares to reconstruct a secret than there are"
            )
        if self.dp == "client" and self.secagg_clipping_range < self.dp_clip:
            raise ValueError(
                f"{name('secagg-clipping-range')}={self.secagg_clipping_range:g} is not allowed "
                f"with {name('dp-clip')}={self.dp_clip:g}: expected at least dp-clip (a "
                "clipped update's coordinates lie within ±dp-clip)"
            )

    @property
    def weights_file(self) -> Path | None:
        """The start weights' file, or ``None`` for ``imagenet`` and ``none``."""
        if self.weights in ("imagenet", "none"):
            return None
        return Path(self.weights).expanduser().resolve()

    def to_flower(self) -> dict[str, Any]:
        """The Flower run config: ``{flower key: value}``."""
        return {flower_key(spec): getattr(self, spec.name) for spec in fields()}


def _weights_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be start weights, in a few words; ``None`` if it can."""
    if not path.is_file():
        return "expected imagenet, none, or an existing .keras/.weights.h5/.h5 weights file"
    try:
        with path.open("rb") as file:
            head = file.read(len(HDF5_SIGNATURE))
    except OSError as err:
        return f"it cannot be read ({err.strerror})"
    # The suffix says which format it must be; Keras picks its reader by suffix too.
    ok = zipfile.is_zipfile(path) if path.suffix == ".keras" else head == HDF5_SIGNATURE
    return None if ok else "it is not a Keras weights file (HDF5 / .keras zip)"


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (``.`` ends a relative path's)."""
    return next((p for p in (path, *path.parents) if p.exists()), path)


def _writable_folder(path: Path) -> bool:
    """Whether a file or folder can be made in ``path``, by trying it.

    ``os.access`` is not enough: for root it says yes to ``/proc`` and ``/sys``,
    where nothing can be made.
    """
    if not path.is_dir():
        return False
    try:
        with tempfile.TemporaryDirectory(prefix=".fl_app-write-check-", dir=path):
            return True
    except OSError:
        return False


def fields() -> tuple[dataclasses.Field, ...]:
    """The declared keys, in declaration order, with their types resolved."""
    return _FIELDS


def flower_key(spec: dataclasses.Field) -> str:
    """The Flower name of a key: ``num_server_rounds`` → ``num-server-rounds``."""
    return spec.name.replace("_", "-")


def hydra_path(spec: dataclasses.Field) -> str | None:
    """Where a key lives in the Hydra config; ``None`` for the launcher's own keys."""
    group, leaf = spec.metadata["group"], spec.metadata["leaf"] or spec.name
    if group == LAUNCHER:
        return None
    return f"{group}.{leaf}" if group else leaf


def defaults() -> dict[str, Any]:
    """Every key's default, by Flower name (what pyproject.toml declares)."""
    return {flower_key(spec): spec.default for spec in fields()}


def markdown_table() -> str:
    """The README's configuration table: every key, its default and its help."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for spec in fields():
        default = spec.default
        shown = f"`{default}`" if isinstance(default, str) else str(default).lower()
        lines.append(f"| `{flower_key(spec)}` | {shown} | {spec.metadata['help']} |")
    return "\n".join(lines)


def _allowed(spec: dataclasses.Field) -> str:
    allowed = spec.metadata["rule"].allowed
    if allowed:
        return allowed
    return "true or false" if spec.type is bool else f"a {spec.type.__name__}"


def _type_ok(value: Any, kind: type) -> bool:
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    # TOML and --run-config give ints for whole numbers; they are valid floats.
    return isinstance(value, (int, float) if kind is float else kind)


def _resolved_fields() -> tuple[dataclasses.Field, ...]:
    hints = typing.get_type_hints(RunConfig)
    specs = dataclasses.fields(RunConfig)
    for spec in specs:
        spec.type = hints[spec.name]
    return specs


_FIELDS = _resolved_fields()
