"""Class-folder image trees written from Fashion-MNIST, as a user's own photos would be.

Names have a space and a non-ASCII letter; images are grey or RGB, PNG or JPEG,
at two sizes, so every test of image folders meets what real folders hold.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from fl_app.data.builtin import load_builtin

# Class folder name -> Fashion-MNIST label: three classes that look unlike each other.
DEMO_CLASSES = {"ankle boot": 9, "sac à main": 8, "trouser": 1}
CORRUPT_NAME = "corrupt.png"


def write_tree(
    root: Path,
    per_class: int,
    classes: Iterable[str] = DEMO_CLASSES,
    offset: int = 0,
    split: str = "train",
    corrupt: bool = False,
) -> Path:
    """Write ``root/<class>/*.png|jpg``: ``per_class`` Fashion-MNIST images of each class.

    ``offset`` picks which images of each class (disjoint trees for disjoint
    offsets); ``split`` which Fashion-MNIST split. Every third image is RGB, every
    second is 40 px instead of 28, every fifth a JPEG. ``corrupt`` adds one file that
    is not an image to the first class.
    """
    data = getattr(load_builtin("fashion_mnist"), split)
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        rows = np.flatnonzero(data.y == DEMO_CLASSES[name])[offset : offset + per_class]
        for i, row in enumerate(rows):
            image = Image.fromarray(data.x[row, :, :, 0], "L")
            if i % 3 == 0:
                image = image.convert("RGB")
            if i % 2 == 0:
                image = image.resize((40, 40))
            suffix = ".jpg" if i % 5 == 0 else ".png"
            image.save(folder / f"{row}{suffix}")
    if corrupt:
        first = sorted(classes)[0]
        (root / first / CORRUPT_NAME).write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    return root
