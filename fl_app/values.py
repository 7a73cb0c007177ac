"""What one run-config value may be: the rules, the allowed names, the checks of one value.

A `Rule` is how `fl_app.config` declares what a key allows: a test of the value
alone, and the words the error message says it in. Here too are the names a
choice allows, the form of a dataset, class list, weights or results-dir value,
and, where the server reads or writes it, what a value names on disk (an HDF5 or
``.keras`` weights file, a folder a run can be made in). This module imports
nothing of fl_app, and no Keras.
"""

from __future__ import annotations

import re
import string
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
RESULTS_DIR_FIELDS = ("time", "run_id")
# What a run folder holds after every round for `resume` to continue from.
CHECKPOINT_FILE = "checkpoint.json"
# The HDF5 signature, at the start of every file Keras and h5py write (a user
# block would move it to offset 512, 1024, ...; neither writes one).
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


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


def between(low: float, high: float, ends: str = "[]") -> Rule:
    """``low <= value <= high``; an end written ``(`` or ``)`` is left out."""

    def ok(value: float) -> bool:
        above_low = value > low if ends[0] == "(" else value >= low
        return above_low and (value < high if ends[1] == ")" else value <= high)

    return Rule(ok, f"a number in {ends[0]}{low:g}, {high:g}{ends[1]}")


def one_of(choices: Iterable[str]) -> Rule:
    """``value in choices``."""
    allowed = tuple(choices)
    return Rule(lambda v: v in allowed, "one of " + ", ".join(allowed))


ANY = Rule(lambda v: True, "")


def type_ok(value: Any, kind: type) -> bool:
    """Whether ``value`` is of a key's type ``kind`` (a bool is no number, an int is a float)."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    # TOML and --run-config give ints for whole numbers; they are valid floats.
    return isinstance(value, (int, float) if kind is float else kind)


def weights_ok(value: str) -> bool:
    """Whether a ``weights`` value names start weights: ``imagenet``, ``none`` or a weights file.

    Whether the file exists is checked where it is read (`RunConfig.parse`'s check_files).
    """
    return value in ("imagenet", "none") or value.endswith(WEIGHT_FILE_SUFFIXES)


def is_path(value: str) -> bool:
    """Whether a dataset value is written as a path rather than a name or hub id."""
    return value.startswith(("/", "~", ".")) or "\\" in value


def dataset_ok(value: str) -> bool:
    """Whether a ``dataset`` value is a built-in name, a path or a hub id."""
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


def classes_ok(value: str) -> bool:
    """Whether a ``classes`` value is a list of two or more distinct names, or a class file."""
    if value.endswith(CLASSES_FILE_SUFFIX):
        return True  # read where the classes are decided (`RunConfig.parse`'s check_files)
    try:
        parse_classes(value)
    except ValueError:
        return False
    return True


def template_ok(value: str) -> bool:
    """Whether a ``results-dir`` value is a path, its only placeholders ``{time}``, ``{run_id}``."""
    fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    return bool(value) and fields <= set(RESULTS_DIR_FIELDS)


def weights_file_problem(path: Path) -> str | None:
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


def first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (``.`` ends a relative path's)."""
    return next((p for p in (path, *path.parents) if p.exists()), path)


def writable_folder(path: Path) -> bool:
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
