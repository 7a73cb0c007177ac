"""``fl-app``: every operations command of fl_app in one place.

``fl-app deploy ...`` and ``fl-app local ...`` (`fl_app.deploy.cli`, `local_cli`), ``fl-app data
prepare``, ``fl-app predict`` and ``fl-app sweep summarize``. Experiments run with
``fl-app-experiment`` (Hydra); the benchmarks are the repository's scripts/, not commands.
Bad input is exactly one ``error:`` line on stderr and exit code 2; ``--help`` never imports
Keras or TensorFlow.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import click
import typer

from fl_app.deploy.cli import deploy
from fl_app.deploy.local_cli import local

app = typer.Typer(
    help="Operate fl_app: deployments, a local federation, data, predictions, sweeps.",
    add_completion=False,
)
app.add_typer(deploy, name="deploy")
app.add_typer(local, name="local")
data = typer.Typer(help="Data for deployments.", add_completion=False)
app.add_typer(data, name="data")
sweep = typer.Typer(help="Hydra multirun sweeps.", add_completion=False)
app.add_typer(sweep, name="sweep")
# What `main` reports as one `error:` line: our own failures (DeploymentError,
# FlowerCLIError, ProcessExitedError, ...) are RuntimeErrors; files and values raise the others.
USER_ERRORS = (RuntimeError, OSError, ValueError)


@data.command("prepare")
def prepare(
    out: Annotated[Path, typer.Option(help="folder for the node-<i>/ folders")],
    nodes: Annotated[int, typer.Option(min=1, help="number of SuperNodes")],
    dataset: Annotated[str, typer.Option(help="a dataset fl_app knows")] = "fashion_mnist",
    partitioner: Annotated[str, typer.Option(help="iid or dirichlet")] = "iid",
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration")] = 0.5,
    seed: Annotated[int, typer.Option(help="seed of the split")] = 0,
    max_examples: Annotated[int, typer.Option(min=0, help="cap per node (0 = none)")] = 0,
) -> int:
    """Split a dataset into one data folder per SuperNode, for deployment demos.

    Each OUT/node-<i>/ gets partition.npz (uint8 images x, labels y); start a
    SuperNode on it with --node-config 'data-dir="/abs/OUT/node-0"'. Existing
    node data is never overwritten.
    """
    from fl_app.data import PARTITION_FILE, prepare_node_dirs
    from fl_app.values import DATASETS, PARTITIONERS

    for option, value, allowed in (
        ("--dataset", dataset, DATASETS),
        ("--partitioner", partitioner, PARTITIONERS),
    ):
        if value not in allowed:
            raise click.BadParameter(
                f"{value!r} is not one of {', '.join(allowed)}", param_hint=f"'{option}'"
            )
    existing = sorted(out.glob(f"node-*/{PARTITION_FILE}"))
    if existing:
        raise FileExistsError(f"{existing[0]} exists: refusing to overwrite node data")
    folders = prepare_node_dirs(out, nodes, dataset, partitioner, alpha, seed, max_examples)
    for folder in folders:
        print(f"--node-config 'data-dir=\"{folder.resolve()}\"'")
    return 0


@sweep.command("summarize")
def summarize(
    sweep_dir: Annotated[
        Path, typer.Argument(help="the sweep folder, e.g. multirun/2026-11-25/12-00-00")
    ],
    target_accuracy: Annotated[
        str,
        typer.Option(
            help="also report the first round whose server accuracy reached this "
            "(0 < a <= 1; 0: no target)"
        ),
    ] = "0",
) -> int:
    """Summarise a Hydra multirun sweep: SWEEP_DIR/summary.csv and accuracy.png.

    summary.csv has one row per job (overrides, status, rounds, final and best
    server accuracy, wall time, bytes sent/received, and the first round at
    --target-accuracy); accuracy.png plots server accuracy per round, one line
    per job. Prints both paths and a markdown table.
    """
    from fl_app.launch.sweep import main as summarize_main

    return summarize_main([str(sweep_dir), "--target-accuracy", target_accuracy])


# Where `fl-app predict` writes the predictions of a folder when --out is not given.
PREDICTIONS_CSV = "predictions.csv"


@app.command("predict")
def predict_images(
    model: Annotated[
        Path, typer.Argument(help="a .keras file saved by fl_app, e.g. outputs/.../final.keras")
    ],
    images: Annotated[
        list[Path], typer.Argument(help="PNG/JPEG files, or folders of them (recursively)")
    ],
    top_k: Annotated[int, typer.Option(min=1, help="classes per image, most probable first")] = 3,
    out: Annotated[
        Path | None,
        typer.Option(help=f"CSV file to write (for a folder, default: {PREDICTIONS_CSV})"),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="images decoded at a time")] = 32,
) -> int:
    """Predict the classes of images with a saved model; class names come from the model file.

    MODEL is a .keras file fl_app saved (e.g. outputs/.../final.keras); IMAGES
    are PNG/JPEG files or folders of them. For image files alone, prints one line
    per image: 'path: class 0.873, class 0.101, ...'. With a folder (walked
    recursively) or --out, writes a CSV instead (path, class_1, probability_1,
    ..., class_k, probability_k; by default predictions.csv in the current
    folder) and prints where. An image that does not decode is skipped with a
    warning: 'path: unreadable', or no CSV row.
    """
    from fl_app.predict import format_line, predict, write_csv

    predictions = predict(model, images, top_k, batch_size)
    if out is None and not any(path.is_dir() for path in images):
        for prediction in predictions:
            print(format_line(prediction))
        return 0
    out = out or Path(PREDICTIONS_CSV)
    written, left_out = write_csv(predictions, out)
    skipped = f" (skipped {left_out} unreadable)" if left_out else ""
    print(f"wrote {written} predictions to {out}{skipped}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fl-app``; return its exit code.

    Bad input (a usage error or a failed input check) is one ``error:`` line on
    stderr and exit code 2.
    """
    command = typer.main.get_command(app)
    try:
        code = command.main(
            list(sys.argv[1:] if argv is None else argv), prog_name="fl-app", standalone_mode=False
        )
    except click.UsageError as err:
        hint = f" (see {err.ctx.command_path} --help)" if err.ctx is not None else ""
        return _error(f"{err.format_message().rstrip('.')}{hint}")
    except click.ClickException as err:
        return _error(err.format_message())
    except USER_ERRORS as err:
        return _error(err)
    return code if isinstance(code, int) else 0


def _error(message: object) -> int:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
