"""Class predictions of a saved classifier for image files, streamed a batch at a time.

The images are decoded by the code training uses (`fl_app.data.images`), so a file
that trains also predicts; the model does its own preprocessing. An image that does
not decode is skipped with the usual one-line warning and comes out with no classes.
"""

from __future__ import annotations

import csv
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from fl_app.data.images import IMAGE_SUFFIXES, FileSource, images_under
from fl_app.data.split import Split

if TYPE_CHECKING:
    import keras

MODEL_SUFFIX = ".keras"
ALLOWED = f"a PNG or JPEG file ({', '.join(IMAGE_SUFFIXES)}) or a folder of them"


class Prediction(NamedTuple):
    """One image's most probable classes, best first; empty when it does not decode."""

    path: Path
    top: list[tuple[str, float]]


class Predictions:
    """What `predict` returns: iterate it (once) for a `Prediction` per image.

    Parameters
    ----------
    rows : Iterator of Prediction
        The predictions, computed as they are taken.
    classes : tuple of str
        The model's class names, in output order.
    top_k : int
        Classes per readable image: the ``top_k`` asked for, at most ``len(classes)``.
    """

    def __init__(self, rows: Iterator[Prediction], classes: tuple[str, ...], top_k: int) -> None:
        self.rows, self.classes, self.top_k = rows, classes, top_k

    def __iter__(self) -> Iterator[Prediction]:
        return self.rows


def image_files(inputs: Sequence[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """The image files of ``inputs``: files as given, folders walked recursively.

    A folder contributes its PNG/JPEG files (any depth, hidden files and folders
    left out), sorted; files given by name are kept in their order.

    Parameters
    ----------
    inputs : Sequence of str or os.PathLike, or one of them
        Image files and folders.

    Returns
    -------
    list of Path
        The files to predict, in order.

    Raises
    ------
    ValueError
        If an input does not exist, is a file that is not PNG/JPEG, or is a
        folder without any PNG/JPEG file (a mistyped folder, most likely).

    """
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]  # one path, not a sequence of characters
    files: list[Path] = []
    for given in map(Path, inputs):
        if given.is_dir():
            found = images_under(given)
            if not found:
                raise ValueError(f"{given} holds no PNG or JPEG file ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif not given.exists():
            raise ValueError(f"{given} does not exist: give {ALLOWED}")
        elif given.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{given} is not {ALLOWED}")
        else:
            files.append(given)
    return files


def predict(
    model_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    top_k: int = 3,
    batch_size: int = 32,
) -> Predictions:
    """Predict the ``top_k`` classes of every image of ``inputs`` with a saved classifier.

    The inputs and the model are checked, and the model loaded, when this is
    called; the predictions then come one batch of images at a time, so memory
    is bounded by ``batch_size`` however many images there are.

    Parameters
    ----------
    model_path : str or os.PathLike
        A ``.keras`` file saved by fl_app (``final.keras``, ``best.keras``); one
        without class names predicts ``"0"``, ``"1"``, ...
    inputs : Sequence of str or os.PathLike, or one of them
        Image files and folders (see `image_files`).
    top_k : int
        How many classes per image, most probable first (at most the model's classes).
    batch_size : int
        Images decoded and predicted at a time.

    Returns
    -------
    Predictions
        Iterates ``(path, [(class, probability), ...])`` per image, in the order
        of `image_files`; ``top`` is empty for an image that does not decode.

    Raises
    ------
    ValueError
        If ``top_k`` or ``batch_size`` is below 1, an input is not an image or a
        folder of them, or ``model_path`` is not a ``.keras`` file of a model
        that takes images of a fixed size.
    FileNotFoundError
        If ``model_path`` does not exist.

    """
    for name, value in (("top-k", top_k), ("batch-size", batch_size)):
        if value < 1:
            raise ValueError(f"{name}={value}: must be at least 1")
    model_file = Path(model_path)
    if not model_file.exists():
        raise FileNotFoundError(f"model {model_file} does not exist")
    if model_file.suffix != MODEL_SUFFIX or not zipfile.is_zipfile(model_file):
        # Keras' own message for a file that is not a zip says "File not found".
        raise ValueError(f"model {model_file} is not a {MODEL_SUFFIX} file")
    files = image_files(inputs)
    # Deferred: the checks above answer before the seconds Keras takes to import.
    from fl_app.model.classifier import load_classifier

    model, classes = load_classifier(model_file)
    shape = tuple(model.input.shape[1:])
    if len(shape) != 3 or shape[0] is None or shape[2] not in (1, 3):
        raise ValueError(
            f"model {model_file} takes inputs of shape {shape}: not an fl_app classifier"
            " (images of a fixed size with 1 or 3 channels)"
        )
    # FileSource decodes square images; fl_app's models take square ones (the height).
    source = FileSource([str(f) for f in files], np.zeros(len(files)), shape[0], shape[2])
    top_k = min(top_k, len(classes))
    return Predictions(_predictions(model, classes, source, top_k, batch_size), classes, top_k)


def _predictions(
    model: keras.Model, classes: Sequence[str], source: FileSource, top_k: int, batch_size: int
) -> Iterator[Prediction]:
    from fl_app.data.batches import predict_rows, readable

    files = [Path(path) for path in source.paths]
    for start in range(0, len(files), batch_size):
        # One batch per Split, so that only this batch's outputs are held.
        rows = np.arange(start, min(start + batch_size, len(files)))
        outputs = predict_rows(model, Split(source, rows), batch_size)
        for row, probs, ok in zip(rows, outputs, readable(outputs), strict=True):
            best = np.argsort(-probs, kind="stable")[:top_k] if ok else []
            yield Prediction(files[row], [(classes[i], float(probs[i])) for i in best])


def format_line(prediction: Prediction) -> str:
    """``path: class 0.873, class 0.101, ...``, or ``path: unreadable``."""
    top = ", ".join(f"{name} {prob:.3f}" for name, prob in prediction.top) or "unreadable"
    return f"{prediction.path}: {top}"


def write_csv(predictions: Predictions, path: str | os.PathLike) -> tuple[int, int]:
    """Write ``path,class_1,probability_1,...,class_k,probability_k`` rows, one per image.

    Images that do not decode are left out (their warning names them). The file
    appears only when complete (written under a temporary name, then renamed).

    Returns
    -------
    tuple of int
        How many rows were written, and how many unreadable images were left out.

    Raises
    ------
    FileNotFoundError
        If the folder of ``path`` does not exist (checked before any prediction).

    """
    final = Path(path)
    if not final.parent.is_dir():
        raise FileNotFoundError(f"{final.parent} does not exist: cannot write {final}")
    partial = final.with_name(f".{final.name}.partial")
    header = ["path"]
    for i in range(1, predictions.top_k + 1):
        header += [f"class_{i}", f"probability_{i}"]
    written = left_out = 0
    try:
        with partial.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for prediction in predictions:
                if not prediction.top:
                    left_out += 1
                    continue
                row = [str(prediction.path)]
                for name, prob in prediction.top:
                    row += [name, f"{prob:.6f}"]
                writer.writerow(row)
                written += 1
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)  # what an interrupted run had written
    return written, left_out
