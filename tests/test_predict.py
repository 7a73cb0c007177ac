"""Predictions with class names: `fl_app.predict` and `fl-app predict`, on a tiny trained model."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from fl_app.cli import main
from fl_app.model.classifier import build_model, compile_model, load_classifier, save_classifier
from fl_app.predict import Prediction, Predictions, image_files, predict, write_csv

REPO = Path(__file__).resolve().parents[1]
# Names with a space and a non-ASCII letter, as a user's class folders have.
CLASSES = ("dark", "bright é", "striped")
# Each test image: (side, Pillow mode, suffix), so that predicting meets grey and RGB,
# PNG and JPEG, and a size other than the model's 32 px.
VARIANTS = [(32, "L", ".png"), (48, "RGB", ".png"), (32, "RGB", ".jpg"), (48, "L", ".jpg")]
LINE = re.compile(r"^(\S+): (.+ \d\.\d{3})(, .+ \d\.\d{3})*$")


def pattern(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A noisy grey image of a class: all dark, all bright, or vertical stripes."""
    if label == 0:
        image = rng.integers(0, 40, (size, size))
    elif label == 1:
        image = rng.integers(215, 256, (size, size))
    else:
        image = np.where((np.arange(size) // (size // 8)) % 2 == 1, 255, 0)[None, :]
        image = image + rng.integers(-20, 20, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def known(tmp_path_factory) -> Path:
    """A folder of 24 images (8 per class), named ``<label>-<i><suffix>``, in a subfolder."""
    root = tmp_path_factory.mktemp("known")
    (root / "nested").mkdir()
    rng = np.random.default_rng(1)
    for label in range(len(CLASSES)):
        for i, (size, mode, suffix) in enumerate(VARIANTS * 2):
            image = Image.fromarray(pattern(label, size, rng)).convert(mode)
            image.save(root / "nested" / f"{label}-{i}{suffix}")
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The same trained model saved with class names (``named``) and without (``plain``)."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    per_class = 16
    x = np.stack([pattern(label, 32, rng) for label in range(3) for _ in range(per_class)])
    y = np.repeat(np.arange(3), per_class)
    model = build_model(3, (32, 32, 3), 32, None, "resnet50")
    # A random backbone's features are large: a small step keeps the head from overshooting.
    compile_model(model, 1e-4)
    model.fit(np.repeat(x[..., None], 3, axis=-1), y, epochs=10, batch_size=16, verbose=0)
    folder = tmp_path_factory.mktemp("models")
    save_classifier(model, folder / "named.keras", CLASSES)
    model.save(folder / "plain.keras")
    return {"named": folder / "named.keras", "plain": folder / "plain.keras"}


def true_class(path: Path) -> str:
    return CLASSES[int(path.name.split("-")[0])]


# --- finding the images


def test_image_files_walks_folders_sorted_and_keeps_files_as_given(tmp_path: Path) -> None:
    for folder in ["b/deeper", "b/.thumbnails"]:
        (tmp_path / folder).mkdir(parents=True)
    hidden = ["b/.hidden.png", "b/.thumbnails/2.png"]
    for name in ["b/2.png", "b/deeper/1.JPG", "b/a.jpeg", "b/notes.txt", "x.png", *hidden]:
        (tmp_path / name).write_bytes(b"")

    files = image_files([tmp_path / "x.png", tmp_path / "b"])

    folder = tmp_path / "b"
    assert files == [
        tmp_path / "x.png",
        folder / "2.png",
        folder / "a.jpeg",
        folder / "deeper/1.JPG",
    ]
    assert image_files(str(tmp_path / "x.png")) == [tmp_path / "x.png"]  # one path


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing.png", r"missing\.png does not exist: give a PNG or JPEG file"),
        ("photo.gif", r"photo\.gif is not a PNG or JPEG file \(\.png, \.jpg, \.jpeg\) or a folder"),
        ("empty", r"empty holds no PNG or JPEG file"),
    ],
    ids=["missing", "not-an-image", "empty-folder"],
)
def test_image_files_refuses_what_is_not_an_image(tmp_path: Path, name: str, message: str) -> None:
    (tmp_path / "photo.gif").write_bytes(b"GIF89a")
    (tmp_path / "empty").mkdir()

    with pytest.raises(ValueError, match=message):
        image_files([tmp_path / name])


# --- predicting


def test_load_classifier_returns_the_class_names(models: dict[str, Path]) -> None:
    assert load_classifier(models["named"]).classes == CLASSES


def test_predictions_name_the_learned_classes(models: dict[str, Path], known: Path) -> None:
    predictions = predict(models["named"], [known])
    rows = list(predictions)

    assert (predictions.classes, predictions.top_k) == (CLASSES, 3)
    assert [row.path for row in rows] == image_files([known])
    for row in rows:
        assert sorted(name for name, _ in row.top) == sorted(CLASSES)
        probs = [prob for _, prob in row.top]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1, abs=1e-5)
    accuracy = np.mean([row.top[0][0] == true_class(row.path) for row in rows])
    assert accuracy >= 0.8  # chance is 1/3: the model learned dark, bright and stripes

    # Streamed in batches of 5 (the last one of 4): the same predictions.
    streamed = list(predict(models["named"], [known], batch_size=5))
    assert [row.path for row in streamed] == [row.path for row in rows]
    for a, b in zip(streamed, rows, strict=True):
        assert [name for name, _ in a.top] == [name for name, _ in b.top]
        np.testing.assert_allclose([p for _, p in a.top], [p for _, p in b.top], atol=1e-5)


def test_a_model_without_class_names_predicts_indices(models: dict[str, Path], known: Path) -> None:
    predictions = predict(models["plain"], [known], top_k=1)

    assert (predictions.classes, predictions.top_k) == (("0", "1", "2"), 1)
    rows = list(predictions)
    assert {len(row.top) for row in rows} == {1}
    accuracy = np.mean([CLASSES[int(row.top[0][0])] == true_class(row.path) for row in rows])
    assert accuracy >= 0.8


def test_an_unreadable_image_has_no_classes_and_one_warning(
    models: dict[str, Path], known: Path, tmp_path: Path, flwr_warnings
) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    good = image_files([known])[:2]

    # top_k 10 is clipped to the model's 3 classes.
    rows = list(predict(models["named"], [good[0], corrupt, good[1]], top_k=10, batch_size=2))

    assert [row.path for row in rows] == [good[0], corrupt, good[1]]
    assert [len(row.top) for row in rows] == [3, 0, 3]
    warnings = [r.getMessage() for r in flwr_warnings]
    assert warnings == [f"Skipped unreadable image {corrupt} (cannot identify image file)"]


def test_bad_arguments_are_refused(models: dict[str, Path], known: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model .*nope\.keras does not exist"):
        predict(tmp_path / "nope.keras", [known])
    not_zip = tmp_path / "broken.keras"
    not_zip.write_text("not a zip")
    with pytest.raises(ValueError, match=r"model .*broken\.keras is not a \.keras file"):
        predict(not_zip, [known])
    with pytest.raises(ValueError, match="top-k=0: must be at least 1"):
        predict(models["named"], [known], top_k=0)
    not_images = tmp_path / "dense.keras"
    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(not_images)
    with pytest.raises(ValueError, match=r"shape \(4,\): not an fl_app classifier"):
        predict(not_images, [known])


def test_write_csv_leaves_no_file_when_the_folder_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist: cannot write"):
        rows = iter([Prediction(tmp_path / "a.png", [("a", 1.0)])])
        write_csv(Predictions(rows, ("a",), 1), tmp_path / "no" / "p.csv")
    assert list(tmp_path.iterdir()) == []


# --- fl-app predict


def test_cli_prints_a_line_per_image_file(
    models: dict[str, Path], known: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = image_files([known])[::6]

    code = main(["predict", str(models["named"]), *map(str, files), "--top-k", "2"])

    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(files) == 4
    right = 0
    for line, path in zip(lines, files, strict=True):
        assert LINE.match(line), line
        assert line.startswith(f"{path}: ")
        assert len(line.split(", ")) == 2  # --top-k 2
        right += line.startswith(f"{path}: {true_class(path)} ")
    assert right >= 3


def test_cli_writes_a_csv_for_a_folder_and_skips_a_corrupt_image(
    models: dict[str, Path],
    known: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flwr_warnings,
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in image_files([known]):
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    monkeypatch.chdir(tmp_path)

    code = main(["predict", str(models["named"]), "photos", "--batch-size", "7"])

    assert code == 0
    out = capsys.readouterr().out
    assert out == "wrote 24 predictions to predictions.csv (skipped 1 unreadable)\n"
    assert [r.getMessage() for r in flwr_warnings] == [
        "Skipped unreadable image photos/corrupt.jpg (cannot identify image file)"
    ]
    with (tmp_path / "predictions.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == [
        "path",
        *[f"{column}_{i}" for i in (1, 2, 3) for column in ("class", "probability")],
    ]
    assert len(rows) == 1 + 24
    assert {row[1] for row in rows[1:]} <= set(CLASSES)
    right = sum(row[1] == true_class(Path(row[0])) for row in rows[1:])
    assert right >= 0.8 * 24
    assert not list(tmp_path.glob(".*partial"))


def test_cli_out_writes_a_csv_for_files_too(
    models: dict[str, Path], known: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "few.csv"
    files = image_files([known])[:2]

    code = main(
        ["predict", str(models["named"]), *map(str, files), "--top-k", "9", "--out", str(out)]
    )

    assert code == 0
    assert capsys.readouterr().out == f"wrote 2 predictions to {out}\n"
    rows = out.read_text(encoding="utf-8").splitlines()
    assert rows[0] == "path,class_1,probability_1,class_2,probability_2,class_3,probability_3"
    assert len(rows) == 3


def fl_app_without_keras(*args: str) -> subprocess.CompletedProcess:
    """`fl-app ARGS` in a fresh process that fails if Keras or TensorFlow got imported."""
    check = (
        "import sys; from fl_app.cli import main; code = main(sys.argv[1:]);"
        " heavy = {'keras', 'tensorflow'} & set(sys.modules); assert not heavy, heavy;"
        " sys.exit(code)"
    )
    return subprocess.run(
        [sys.executable, "-c", check, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["MODEL", "missing.png"], "error: missing.png does not exist: give a PNG or JPEG file"),
        (["nope.keras", "IMAGES"], "error: model nope.keras does not exist"),
        (["MODEL", "IMAGES", "--top-k", "0"], "error: Invalid value for '--top-k': 0 is not in"),
    ],
    ids=["missing-image", "missing-model", "top-k-0"],
)
def test_cli_error_is_one_line_exit_2_before_keras(
    models: dict[str, Path], known: Path, args: list[str], message: str
) -> None:
    args = [{"MODEL": str(models["named"]), "IMAGES": str(known)}.get(a, a) for a in args]

    done = fl_app_without_keras("predict", *args)

    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith(message)


def test_cli_help_explains_the_outputs_without_keras() -> None:
    done = fl_app_without_keras("predict", "--help")

    assert done.returncode == 0, done.stderr
    assert "--top-k" in done.stdout and "predictions.csv" in done.stdout
