"""Image files: decoding every PNG/JPEG flavour, skipping broken files, class-folder trees."""

from __future__ import annotations

import io
import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fl_app.config import RunConfig, defaults
from fl_app.data import load_data_dir, load_test_set, run_classes
from fl_app.data.images import (
    FileSource,
    folder_classes,
    read_image,
    scan_class_folders,
    split_folders,
    to_array,
)
from fl_app.data.split import ArraySource, Split
from tests.image_trees import CORRUPT_NAME, DEMO_CLASSES, write_tree

# DEMO_CLASSES' folders renamed, so that two nodes can hold different subsets of cat, dog, fox.
ANIMALS = {"ankle boot": "cat", "sac à main": "dog", "trouser": "fox"}


def _animal_tree(root: Path, animals: list[str], per_class: int = 2) -> Path:
    """A node folder holding ``animals`` (a subset of cat, dog, fox) from write_tree's classes."""
    demo = [name for name, animal in ANIMALS.items() if animal in animals]
    write_tree(root, per_class, classes=demo)
    for name in demo:
        (root / name).rename(root / ANIMALS[name])
    return root


def _labels_by_folder(paths: list[str], labels: np.ndarray) -> dict[str, set[int]]:
    found: dict[str, set[int]] = {}
    for path, label in zip(paths, labels.tolist(), strict=True):
        found.setdefault(Path(path).parent.name, set()).add(label)
    return found


def _opened(path: str | Path) -> Image.Image:
    """A file's header as Pillow reads it (mode, size), the file closed again."""
    with Image.open(path) as image:
        return image


def _save(image: Image.Image, path: Path, **params) -> Path:
    image.save(path, **params)
    return path


# --- one global class list: the same class has the same index on every node ---------------


def test_a_class_has_the_same_index_on_nodes_that_hold_different_classes(tmp_path):
    classes = ("cat", "dog", "fox")
    node_a = _animal_tree(tmp_path / "a", ["cat", "fox"])
    node_b = _animal_tree(tmp_path / "b", ["cat", "dog", "fox"])

    # Ranking each node's own folders gave fox 1 on node A and 2 on node B.
    assert _labels_by_folder(*scan_class_folders(node_a, classes)) == {"cat": {0}, "fox": {2}}
    assert _labels_by_folder(*scan_class_folders(node_b, classes)) == {
        "cat": {0},
        "dog": {1},
        "fox": {2},
    }
    a, b = load_data_dir(node_a, classes, 32), load_data_dir(node_b, classes, 32)
    assert sorted(a.y.tolist()) == [0, 0, 2, 2]
    assert sorted(b.y.tolist()) == [0, 0, 1, 1, 2, 2]
    # The label follows the folder, so both nodes' fox images are the same trousers.
    fox_a = a.x[a.y == 2]
    fox_b = b.x[b.y == 2]
    np.testing.assert_array_equal(fox_a, fox_b)


def test_numeric_folder_names_stay_distinct_classes_named_exactly_so(tmp_path):
    names = {"ankle boot": "3", "sac à main": "7", "trouser": "07"}
    write_tree(tmp_path, 1)
    for name, number in names.items():
        (tmp_path / name).rename(tmp_path / number)
    write_tree(tmp_path, 1, classes=["ankle boot"], offset=5)
    (tmp_path / "ankle boot").rename(tmp_path / "cat")

    classes = folder_classes(tmp_path)
    assert classes == ["07", "3", "7", "cat"]
    paths, labels = scan_class_folders(tmp_path, classes)
    assert _labels_by_folder(paths, labels) == {"07": {0}, "3": {1}, "7": {2}, "cat": {3}}


def test_folder_classes_are_the_union_of_both_splits(tmp_path):
    write_tree(tmp_path / "train", 1, classes=["ankle boot", "trouser"])
    write_tree(tmp_path / "test", 1, classes=["sac à main", "trouser"], split="test")
    assert folder_classes(tmp_path) == sorted(DEMO_CLASSES)


def test_a_folder_name_in_another_unicode_normalisation_is_the_same_class(tmp_path):
    # macOS (HFS+) and zip files written there spell "à" as "a" + combining accent.
    write_tree(tmp_path, 1)
    decomposed = unicodedata.normalize("NFD", "sac à main")
    (tmp_path / "sac à main").rename(tmp_path / decomposed)
    assert decomposed != "sac à main"

    classes = ("trouser", "sac à main", "ankle boot")
    found = _labels_by_folder(*scan_class_folders(tmp_path, classes))
    assert found == {"trouser": {0}, decomposed: {1}, "ankle boot": {2}}
    assert folder_classes(tmp_path) == sorted(DEMO_CLASSES)


# --- one clear line for every folder that cannot be used ----------------------------------


def test_an_unknown_class_folder_is_one_line_naming_it_and_the_known_classes(tmp_path):
    node = _animal_tree(tmp_path / "node", ["cat", "dog"])
    with pytest.raises(ValueError) as err:
        load_data_dir(node, ("cat", "fox"), 32)
    message = str(err.value)
    assert "\n" not in message
    assert str(node / "dog") in message and "not a known class" in message
    assert message.endswith("the run's classes are: cat, fox")

    with pytest.raises(ValueError, match="dog' is not a known class") as err:
        scan_class_folders(node, ("cat", "fox"), key="dataset")
    assert str(err.value).startswith("dataset: ") and "\n" not in str(err.value)


def test_an_empty_node_folder_is_one_line(tmp_path):
    (tmp_path / "cat").mkdir()  # a class folder without images is no example either
    with pytest.raises(ValueError) as err:
        load_data_dir(tmp_path, ("cat", "dog"), 32)
    message = str(err.value)
    assert "\n" not in message and "holds no examples" in message and "cat, dog" in message


def test_a_partition_label_beyond_the_run_classes_is_one_line(tmp_path):
    np.savez(tmp_path / "partition.npz", x=np.zeros((3, 8, 8, 1), np.uint8), y=[0, 2, 3])
    with pytest.raises(ValueError) as err:
        load_data_dir(tmp_path, ("cat", "dog", "fox"), 32)
    message = str(err.value)
    assert "\n" not in message and "labels 0..3 outside 0..2" in message


def test_a_truncated_partition_file_is_one_line(tmp_path):
    # An interrupted copy: np.load raises zipfile.BadZipFile, which is no OSError.
    path = tmp_path / "partition.npz"
    np.savez(path, x=np.zeros((20, 8, 8, 1), np.uint8), y=np.zeros(20, np.int64))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError) as err:
        load_data_dir(tmp_path, ("cat", "dog"), 32)
    assert "\n" not in str(err.value) and "partition.npz cannot be read" in str(err.value)


# --- decoding: any PNG/JPEG comes out uint8 (size, size, channels) ------------------------


def _flavours(folder: Path) -> list[Path]:
    """One file per image mode a user's folder may hold, at sizes that are not square."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (30, 20), dtype=np.uint8)
    rgb = rng.integers(0, 256, (17, 40, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (25, 25, 4), dtype=np.uint8)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    return [
        _save(Image.fromarray(grey), folder / "grey.png"),
        _save(Image.fromarray(rgb), folder / "rgb.png"),
        _save(Image.fromarray(rgba, "RGBA"), folder / "rgba.png"),
        _save(palette, folder / "palette.png"),
        _save(transparent, folder / "transparent.png", transparency=0),
        _save(Image.fromarray(grey).convert("LA"), folder / "grey_alpha.png"),
        _save(Image.fromarray(grey > 128), folder / "bilevel.png"),
        _save(Image.fromarray(grey.astype(np.uint16) * 257), folder / "grey16.png"),
        _save(Image.fromarray(rgb), folder / "rgb.jpg", quality=90),
        _save(Image.fromarray(grey), folder / "grey.jpeg"),
        _save(Image.fromarray(rgb).convert("CMYK"), folder / "cmyk.jpg"),
    ]


@pytest.mark.parametrize("channels", [1, 3])
def test_every_image_mode_decodes_to_uint8_squares(tmp_path, channels):
    paths = _flavours(tmp_path)
    modes = {_opened(path).mode for path in paths}
    assert modes >= {"L", "RGB", "RGBA", "P", "LA", "1", "I;16", "CMYK"}

    for path in paths:
        image = read_image(path, 24, channels)
        assert image.shape == (24, 24, channels) and image.dtype == np.uint8, path.name

    source = FileSource([str(p) for p in paths], np.zeros(len(paths)), 24, channels)
    images, ok = Split(source).read(np.arange(len(paths)))
    assert ok.all() and source.failed == set()
    assert images.shape == (len(paths), 24, 24, channels) and images.dtype == np.uint8


def test_size_none_keeps_the_image_size_and_grey_is_copied_to_rgb(tmp_path):
    grey = np.arange(30 * 20, dtype=np.uint16).reshape(30, 20).astype(np.uint8)
    path = _save(Image.fromarray(grey), tmp_path / "grey.png")
    np.testing.assert_array_equal(read_image(path, None, 1)[..., 0], grey)
    np.testing.assert_array_equal(read_image(path, None, 3), np.repeat(grey[..., None], 3, -1))


def test_16_bit_grey_is_scaled_to_8_bits(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "grey16.png")
    assert _opened(path).mode == "I;16"
    pixels = read_image(path, None, 1)[0, :, 0].tolist()
    assert pixels[0] == 0 and pixels[1] == 1 and pixels[3] == 255
    assert pixels[2] in (127, 128)
    assert read_image(path, None, 3)[0, 3].tolist() == [255, 255, 255]


def test_jpeg_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide by 20 high, dark left half; orientation 6: shown turned 90° clockwise.
    pixels = np.full((20, 40), 230, np.uint8)
    pixels[:, :20] = 20
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(Image.fromarray(pixels), tmp_path / "phone.jpg", exif=exif, quality=95)

    upright = read_image(path, None, 1)[..., 0]
    assert upright.shape == (40, 20)
    assert upright[:18].mean() < 40 and upright[22:].mean() > 210  # dark half on top
    square = read_image(path, 16, 3)
    assert square.shape == (16, 16, 3)
    assert square[:7].mean() < 40 and square[9:].mean() > 210


@pytest.mark.parametrize("kind", ["JPEG", "MPO"])
def test_a_large_photo_is_decoded_at_a_fraction_of_its_size(tmp_path, kind):
    # MPO: the JPEG with a second, smaller picture that many phone cameras write.
    photo = Image.fromarray(np.full((1200, 1600, 3), 90, np.uint8))
    path = tmp_path / "photo.jpg"
    if kind == "MPO":
        photo.save(path, format=kind, save_all=True, append_images=[photo.resize((160, 120))])
    else:
        photo.save(path, format=kind)
    with Image.open(path) as image:
        assert image.format == kind
        pixels = to_array(image, 32, 3)
        assert image.size == (200, 150)  # libjpeg's 1/8 scale, still above 32 px
    assert pixels.shape == (32, 32, 3) and abs(int(pixels.mean()) - 90) <= 2


def test_a_write_tree_with_mixed_sizes_and_formats_reads_as_one_array(tmp_path):
    paths, labels = scan_class_folders(write_tree(tmp_path, 6), sorted(DEMO_CLASSES))
    assert {Path(p).suffix for p in paths} == {".png", ".jpg"}
    assert {_opened(p).size for p in paths} == {(28, 28), (40, 40)}
    for channels in (1, 3):
        split = Split(FileSource(paths, labels, 32, channels))
        assert split.x.shape == (18, 32, 32, channels) and split.x.dtype == np.uint8
        assert split.skipped == 0


# --- broken files: skipped, one warning each, counted ------------------------------------


def _truncated_png(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 30), np.uint8)).save(
        buffer, "PNG"
    )
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def test_broken_files_are_skipped_with_one_warning_each_and_counted(tmp_path, flwr_warnings):
    tree = write_tree(tmp_path, 3, corrupt=True)
    first = sorted(DEMO_CLASSES)[0]
    truncated = _truncated_png(tmp_path / "trouser" / "truncated.png")
    paths, labels = scan_class_folders(tree, sorted(DEMO_CLASSES))
    bad = {paths.index(str(tree / first / CORRUPT_NAME)), paths.index(str(truncated))}
    split = Split(FileSource(paths, labels, 32))
    assert len(split) == 11

    for _ in range(2):  # the second read warns no more
        images, ok = split.read(np.arange(len(split)))
        assert ok.tolist() == [i not in bad for i in range(len(split))]
        assert images.shape == (9, 32, 32, 3)
        good = np.flatnonzero(ok)
        np.testing.assert_array_equal(images[1], read_image(paths[good[1]], 32, 3))
    assert split.skipped == 2 and split.source.failed == bad
    assert split.take(np.arange(3, 9)).skipped == 1  # the corrupt file's row only
    assert split.take(np.arange(4)[::-1]).skipped == 1

    warnings = [r.getMessage() for r in flwr_warnings if "Skipped unreadable image" in r.message]
    assert len(warnings) == 2
    for path, reason in ((tree / first / CORRUPT_NAME, "cannot identify"), (truncated, "trunc")):
        (line,) = [w for w in warnings if str(path) in w]
        assert line.count(str(path)) == 1 and reason in line and "\n" not in line


def test_a_missing_file_is_skipped_with_one_line_naming_it_once(tmp_path, flwr_warnings):
    path = str(tmp_path / "gone.png")
    images, ok = FileSource([path], np.zeros(1), 16).read(np.array([0]))
    assert images.shape == (0, 16, 16, 3) and ok.tolist() == [False]
    (line,) = [r.getMessage() for r in flwr_warnings]
    assert line.count(path) == 1 and "No such file or directory" in line


def test_a_split_whose_images_all_fail_reads_an_empty_batch(tmp_path):
    tree = write_tree(tmp_path, 1, corrupt=True)
    path = str(tree / sorted(DEMO_CLASSES)[0] / CORRUPT_NAME)
    split = Split(FileSource([path, path], np.array([0, 0]), 8, 1))
    images, ok = split.read(np.array([1]))
    assert images.shape == (0, 8, 8, 1) and not ok.any()
    assert split.skipped == 1 and split.take(np.array([0])).skipped == 0


# --- tree layouts ---------------------------------------------------------------------------


def test_train_test_layout_is_detected(tmp_path):
    write_tree(tmp_path / "train", 1)
    write_tree(tmp_path / "test", 1, split="test")
    (tmp_path / ".cache").mkdir()  # hidden folders are not part of the layout
    assert split_folders(tmp_path) == {"train": tmp_path / "train", "test": tmp_path / "test"}

    only_train = tmp_path / "only"
    write_tree(only_train / "train", 1)
    assert split_folders(only_train) == {"train": only_train / "train"}


def test_a_class_named_test_without_train_is_a_class_tree(tmp_path):
    write_tree(tmp_path, 1, classes=["trouser"])
    (tmp_path / "trouser").rename(tmp_path / "test")
    write_tree(tmp_path, 1, classes=["ankle boot"])
    assert split_folders(tmp_path) == {"train": tmp_path}
    assert folder_classes(tmp_path) == ["ankle boot", "test"]

    just_test = tmp_path / "just"
    write_tree(just_test, 1, classes=["trouser"])
    (just_test / "trouser").rename(just_test / "test")
    assert split_folders(just_test) == {"train": just_test}


def test_files_are_found_in_nested_folders_and_hidden_or_other_files_are_not(tmp_path):
    write_tree(tmp_path / "trouser" / "2024" / "may", 2, classes=["trouser"])
    (tmp_path / "trouser" / ".thumb.png").write_bytes(b"")
    write_tree(tmp_path / "trouser" / ".thumbnails", 1, classes=["trouser"])
    (tmp_path / "trouser" / "notes.txt").write_text("not an image")
    (tmp_path / "trouser" / "folder.png").mkdir()
    paths, labels = scan_class_folders(tmp_path, ["ankle boot", "trouser"])
    assert len(paths) == 2 and labels.tolist() == [1, 1]
    assert all(Path(p).parent.name == "trouser" for p in paths)


# --- digests: part of the activation cache's keys ------------------------------------------


def test_the_digest_changes_when_a_file_changes_and_only_then(tmp_path):
    paths, labels = scan_class_folders(write_tree(tmp_path, 2), sorted(DEMO_CLASSES))
    source = FileSource(paths, labels, 32)
    rows = np.arange(len(paths))
    before = source.digest(rows)
    assert FileSource(paths, labels, 32).digest(rows) == before  # not per object
    assert source.digest(rows) == before  # reading does not change it
    assert source.digest(rows[:-1]) != before
    assert FileSource(paths, labels, 40).digest(rows) != before  # decode size
    assert FileSource(paths, labels, 32, 1).digest(rows) != before  # channels

    # Same size, new modification time (as a re-export of a photo).
    stat = os.stat(paths[0])
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = source.digest(rows)
    assert touched != before

    # Same modification time, new content and size.
    stat = os.stat(paths[1])
    Path(paths[1]).write_bytes(Path(paths[1]).read_bytes() + b"\0")
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source.digest(rows) not in (before, touched)


def test_a_split_digest_is_its_source_digest_of_its_rows(tmp_path):
    paths, labels = scan_class_folders(write_tree(tmp_path, 2), sorted(DEMO_CLASSES))
    split = Split(FileSource(paths, labels, 32))
    part = split.take(np.array([4, 1]))
    assert part.digest() == split.source.digest(np.array([4, 1]))
    assert part.digest() != split.take(np.array([1, 4])).digest()
    assert part.y.tolist() == [labels[4], labels[1]]


# --- in-memory arrays ----------------------------------------------------------------------


def test_array_splits_read_take_and_digest_their_rows():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)  # grey without a channel axis
    split = Split.of_arrays(x, np.arange(6).reshape(6, 1))
    assert split.image_shape == (5, 4, 1) and split.y.tolist() == list(range(6))
    part = split.take(np.array([5, 0, 3]))
    images, ok = part.read(np.array([2, 0]))
    assert ok.all()
    np.testing.assert_array_equal(images[..., 0], x[[3, 5]])
    assert part.y.tolist() == [5, 0, 3] and part.skipped == 0
    np.testing.assert_array_equal(part.x[..., 0], x[[5, 0, 3]])

    assert part.digest() == Split(ArraySource(x.copy(), np.zeros(6)), part.rows).digest()
    changed = x.copy()
    changed[3, 0, 0] ^= 1
    assert part.digest() != Split(ArraySource(changed, np.zeros(6)), part.rows).digest()
    assert part.digest() != split.take(np.array([5, 0])).digest()


# --- the run's class list -------------------------------------------------------------------


def _config(**values) -> RunConfig:
    return RunConfig.parse({**defaults(), **values})


def test_run_classes_explicit_wins_folders_are_sorted_builtin_test_needs_all(tmp_path):
    write_tree(tmp_path, 1)
    assert run_classes(_config(dataset=str(tmp_path), classes="b,a")) == ("b", "a")
    assert run_classes(_config(dataset=str(tmp_path))) == tuple(sorted(DEMO_CLASSES))
    assert len(run_classes(_config())) == 10

    # A deployment names its own classes; the built-in default dataset is then unused...
    private = _config(classes="shirt,bag,boot", **{"test-data": "none"})
    assert run_classes(private) == ("shirt", "bag", "boot")
    assert load_test_set(private, run_classes(private))[0] is None
    # ...unless its test split is asked for: then the counts must agree, in one line.
    with pytest.raises(ValueError) as err:
        load_test_set(_config(classes="shirt,bag,boot"), ("shirt", "bag", "boot"))
    assert "\n" not in str(err.value) and "dataset=fashion_mnist has 10 classes" in str(err.value)
    assert "test-data" in str(err.value)


def test_run_classes_of_a_single_class_folder_is_one_line(tmp_path):
    write_tree(tmp_path, 1, ["trouser"])
    with pytest.raises(ValueError, match=r"has one class \('trouser'\): a classifier needs") as err:
        run_classes(_config(dataset=str(tmp_path)))
    assert "\n" not in str(err.value)


def test_run_classes_of_a_folder_without_class_folders_is_one_line(tmp_path):
    with pytest.raises(ValueError) as err:
        run_classes(_config(dataset=str(tmp_path)))
    assert "\n" not in str(err.value) and "holds no class subfolders" in str(err.value)
