"""Image files: decoding any PNG/JPEG to the model's input, and class-folder trees.

A tree is ``<root>/<class>/**/*.{png,jpg,jpeg}``, or that under ``<root>/train``
and ``<root>/test`` (the layout of Keras' and Hugging Face's image folders). A
folder's name is its class name, matched exactly (in Unicode's composed form)
against the run's global class list: a node that lacks some classes still labels
the rest as every other node does. Hidden files and folders are not images.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections.abc import Callable, Sequence
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import log
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Subfolders that make a tree a train/test layout instead of class folders.
SPLIT_FOLDERS = ("train", "test")
# What Pillow raises for a file that is not a whole, decodable image.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def to_array(image: Image.Image, size: int | None, channels: int) -> np.ndarray:
    """One image as ``uint8`` ``(size, size, channels)``, from any mode Pillow opens.

    16-bit and 32-bit grey (``I;16``, ``I``, ``F``) are scaled to 8 bits, palette
    and alpha images are flattened to RGB or grey, EXIF rotation is applied, and
    the image is squashed to a square (as Keras' ``image_dataset_from_directory``
    does by default). ``size`` ``None`` keeps the image's own size.
    """
    if size is not None and image.format in ("JPEG", "MPO"):
        # Lets libjpeg decode a large photo at a fraction of its size: far cheaper. MPO is
        # the JPEG with a second picture in it that many phone cameras write.
        image.draft("RGB" if channels == 3 else "L", (size, size))
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, np.float64)
        top = 65535.0 if image.mode != "F" else max(float(values.max()), 1.0)
        image = Image.fromarray(np.clip(values * (255.0 / top), 0, 255).astype(np.uint8), "L")
    image = image.convert("RGB" if channels == 3 else "L")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(image, np.uint8)
    return array[..., None] if array.ndim == 2 else array


def read_image(path: str | os.PathLike, size: int | None, channels: int) -> np.ndarray:
    """Decode one image file with `to_array`; raises one of ``DECODE_ERRORS``."""
    with Image.open(path) as image:
        return to_array(image, size, channels)


def warn_unreadable(name: Any, err: BaseException) -> None:
    """The one warning line for an image that is skipped, naming it once."""
    if isinstance(err, UnidentifiedImageError):
        # Pillow's message ends with the file again (or a BytesIO's repr): `name` says which.
        reason = "cannot identify image file"
    elif isinstance(err, OSError) and err.filename is not None and err.strerror:
        reason = err.strerror  # "[Errno 2] No such file or directory: '<the file>'" less the file
    else:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    log(WARNING, "Skipped unreadable image %s (%s)", name, reason)


def read_rows(
    rows: np.ndarray,
    decode: Callable[[int], np.ndarray],
    name: Callable[[int], Any],
    failed: set[int],
    image_shape: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """The images of ``rows`` that decode, and a mask of which rows did.

    ``decode(i)`` and ``name(i)`` decode and name the ``i``-th of ``rows``; a row
    that raises one of ``DECODE_ERRORS`` is left out, added to ``failed`` and
    warned about the first time.
    """
    images, ok = [], np.zeros(len(rows), bool)
    for i, row in enumerate(rows):
        try:
            images.append(decode(i))
            ok[i] = True
        except DECODE_ERRORS as err:
            if int(row) not in failed:
                failed.add(int(row))
                warn_unreadable(name(i), err)
    if not images:
        return np.zeros((0, *image_shape), np.uint8), ok
    return np.stack(images), ok


class FileSource:
    """Image files with their global labels, decoded a batch of rows at a time.

    Parameters
    ----------
    paths : Sequence[str]
        The image files.
    labels : numpy.ndarray
        Each file's global class index.
    size : int
        Side of the square images read (the model's ``input-size``).
    channels : int
        3 (RGB) or 1 (grey).
    """

    def __init__(
        self, paths: Sequence[str], labels: np.ndarray, size: int, channels: int = 3
    ) -> None:
        self.paths = np.asarray(paths, dtype=object)
        self.labels = np.asarray(labels, np.int64)
        self.size, self.channels = size, channels
        self.image_shape = (size, size, channels)
        self.failed: set[int] = set()

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decode the files of ``rows``; an unreadable one is skipped with one warning."""
        return read_rows(
            rows,
            lambda i: read_image(self.paths[rows[i]], self.size, self.channels),
            lambda i: self.paths[rows[i]],
            self.failed,
            self.image_shape,
        )

    def digest(self, rows: np.ndarray) -> str:
        """A digest of each file's path, size and modification time, and the decode size."""
        digest = hashlib.blake2b(digest_size=20)
        digest.update(f"files|{self.size}|{self.channels}".encode())
        for row in rows:
            path = self.paths[row]
            try:
                stat = os.stat(path)
                digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{path}|missing\n".encode())
        return digest.hexdigest()


def images_under(folder: Path) -> list[Path]:
    """The PNG/JPEG files below ``folder``, at any depth, sorted.

    Hidden files and folders are left out: they hold a tool's copies (thumbnails,
    checkpoints), not more images.
    """
    return sorted(
        f
        for f in folder.rglob("*")
        if f.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in f.relative_to(folder).parts)
        and f.is_file()
    )


def _subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_name(name: str) -> str:
    # macOS (HFS+) and zip files made there spell "à" as "a" + combining grave: compare the
    # composed form, so that a folder copied from a Mac is the class everyone else names.
    return unicodedata.normalize("NFC", name)


def split_folders(root: Path) -> dict[str, Path]:
    """``{"train": ..., "test": ...}`` of a tree: its train/test subfolders, or itself."""
    names = {d.name for d in _subfolders(root)}
    if "train" in names and names <= set(SPLIT_FOLDERS):
        return {name: root / name for name in SPLIT_FOLDERS if name in names}
    return {"train": root}


def folder_classes(root: Path) -> list[str]:
    """The sorted class-folder names of a tree (both splits of a train/test layout)."""
    return sorted(
        {_class_name(d.name) for split in split_folders(root).values() for d in _subfolders(split)}
    )


def scan_class_folders(
    folder: Path, classes: Sequence[str], key: str = "data-dir"
) -> tuple[list[str], np.ndarray]:
    """The image files under ``folder/<class>/`` and their indices in ``classes``.

    A subfolder whose name is not in ``classes`` is an error naming it and the
    known classes; classes without a subfolder are simply absent. ``key`` is the
    config key that named the folder, for the error message.
    """
    index = {_class_name(name): i for i, name in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    for class_dir in _subfolders(folder):
        name = _class_name(class_dir.name)
        if name not in index:
            raise ValueError(
                f"{key}: folder {str(class_dir)!r} is not a known class; the run's classes are: "
                + ", ".join(classes)
            )
        files = [str(f) for f in images_under(class_dir)]
        paths.extend(files)
        labels.extend([index[name]] * len(files))
    return paths, np.asarray(labels, np.int64)
