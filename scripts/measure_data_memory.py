#!/usr/bin/env python3
"""Peak RSS of a deployed node training on its own image folder, by number of images.

Writes (once; an existing folder is reused) a synthetic class-folder tree per size:
``--images`` JPEG files of 256x256 px (smooth random gradients, a disc and a little
noise, quality 85, ~15 KB each) in 4 classes. For each size, ONE node's head-phase
``client_task.train`` runs in a fresh process (peak RSS only grows), as a SuperNode's
ClientApp process would: a real train Message carrying a random-weight global model,
``data-dir`` the tree, feature cache on (its folder in a temporary directory),
``max-examples-per-node=0`` (every image), batch 32. The process reports

* its peak RSS after imports and building the global model (the baseline),
* its peak RSS after the feature pass (``predict_rows`` over the training and the
  validation images, a batch at a time) and at the end of ``train``,
* the wall time of the ``train`` call and the images/s of the feature pass.

Streaming keeps the data-dependent memory at the activations (2048 float32 per image
for ResNet50: 8 KB) instead of the images; ``--contrast`` adds what decoding every
image into one uint8 array would take (arithmetic, not measured).

Usage: python scripts/measure_data_memory.py [--images 1000 20000] [--input-size 32] [--contrast]
       [--root outputs/data-memory] [--json docs/data_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Not benchmarking's: the measured node process imports this module, and nothing more.
REPO = Path(__file__).resolve().parents[1]

IMAGE_PX = 256
CLASSES = ("class a", "class b", "class c", "class d")
JPEG_QUALITY = 85
# Grey noise sigma: enough texture that files are ~15 KB, as photos are not trivially small.
NOISE = 8.0
BATCH = 32
# Written last into a finished tree: a tree without it is completed, not trusted.
COMPLETE = ".complete"
MB = 2**20


def synthetic_image(class_index: int, index: int) -> np.ndarray:
    """One 256x256 RGB ``uint8`` image: a gradient, a disc and noise, seeded by its index."""
    rng = np.random.default_rng([class_index, index])
    y, x = np.mgrid[0:IMAGE_PX, 0:IMAGE_PX].astype(np.float32) / IMAGE_PX
    # A base colour per class, so the classes differ as real ones would.
    base = np.array(
        [(class_index * 67) % 256, (class_index * 131 + 60) % 256, (class_index * 29 + 120) % 256],
        np.float32,
    )
    slope = rng.uniform(-120, 120, (2, 3)).astype(np.float32)
    image = base + x[..., None] * slope[0] + y[..., None] * slope[1]
    cx, cy = rng.uniform(0.2, 0.8, 2)
    radius = rng.uniform(0.08, 0.3)
    image[(x - cx) ** 2 + (y - cy) ** 2 < radius**2] += rng.uniform(-90, 90, 3)
    image += rng.normal(0, NOISE, (IMAGE_PX, IMAGE_PX, 1)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_tree(folder: Path, images: int) -> float:
    """Write ``folder/<class>/<i>.jpg`` for ``images`` images; return the seconds it took.

    Image ``i`` belongs to class ``i % 4`` and is the same in every tree, so a smaller
    tree holds the first images of a larger one. A finished tree is reused (0 s); an
    unfinished one is completed, each file written under a hidden name and renamed, so
    a killed run leaves no half image that a node would read.
    """
    from PIL import Image

    if (folder / COMPLETE).is_file():
        return 0.0
    start = time.perf_counter()
    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i in range(images):
        path = folder / CLASSES[i % len(CLASSES)] / f"{i:06d}.jpg"
        if path.is_file():
            continue
        partial = path.with_name(f".{path.name}.partial")
        Image.fromarray(synthetic_image(i % len(CLASSES), i)).save(
            partial, "JPEG", quality=JPEG_QUALITY
        )
        os.replace(partial, path)
    (folder / COMPLETE).write_text(f"{images}\n")
    return time.perf_counter() - start


def disk_mb(folder: Path) -> float:
    """Size of the image files of a tree, in MB."""
    return sum(f.stat().st_size for f in folder.glob("*/*.jpg")) / MB


def peak_rss_mb() -> float:
    """This process's peak RSS so far (``ru_maxrss`` is in KB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_node(data_dir: Path, input_size: int, cache_dir: Path) -> dict[str, Any]:
    """One head-phase ``client_task.train`` on ``data_dir`` in this process; its costs."""
    import keras
    import psutil
    from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

    from fl_app import client_task
    from fl_app.config import defaults
    from fl_app.data import CLASSES_KEY
    from fl_app.model import features as activations
    from fl_app.model.classifier import build_model, to_arrayrecord
    from fl_app.schedule import HEAD

    after_imports = peak_rss_mb()
    keras.utils.set_random_seed(0)
    # The server's global model (random weights: memory does not depend on the values).
    # The node builds its own copy, as a fresh ClientApp process does; this one goes.
    model = build_model(len(CLASSES), (input_size, input_size, 3), input_size)
    arrays = to_arrayrecord(model)
    del model
    baseline = peak_rss_mb()

    # Time the feature pass (training, then validation split) by the name the activation
    # cache calls it by.
    feature: dict[str, float] = {"seconds": 0.0, "images": 0, "bytes": 0}
    predict_rows = activations.predict_rows

    def timed_predict_rows(*args: Any, **kwargs: Any) -> np.ndarray:
        start = time.perf_counter()
        out = predict_rows(*args, **kwargs)
        feature["seconds"] += time.perf_counter() - start
        feature["images"] += len(out)
        feature["bytes"] += out.nbytes
        feature["peak_rss_mb"] = peak_rss_mb()
        return out

    activations.predict_rows = timed_predict_rows
    config = {"server-round": 1, "phase": HEAD, "learning-rate": 1e-3, CLASSES_KEY: list(CLASSES)}
    metadata = Metadata(
        run_id=1,
        message_id="0-1",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=MessageType.TRAIN,
    )
    msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), metadata=metadata)
    run_config = defaults() | {
        "input-size": input_size,
        "batch-size": BATCH,
        "max-examples-per-node": 0,
        "feature-cache": True,
        "weights": "none",
    }
    node_config = {"data-dir": str(data_dir), "cache-dir": str(cache_dir)}
    context = Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config
    )
    start = time.perf_counter()
    reply = client_task.train(msg, context)
    seconds = time.perf_counter() - start
    metrics = reply.content["metrics"]
    return {
        "after_imports_rss_mb": after_imports,
        "baseline_rss_mb": baseline,
        "after_features_rss_mb": feature.get("peak_rss_mb", baseline),
        "peak_rss_mb": peak_rss_mb(),
        "end_rss_mb": psutil.Process().memory_info().rss / MB,
        "train_seconds": seconds,
        "fit_seconds": float(metrics["train_time"]),
        "feature_seconds": feature["seconds"],
        "feature_images": int(feature["images"]),
        "feature_images_per_second": feature["images"] / feature["seconds"],
        "activations_mb": feature["bytes"] / MB,
        "num_examples": int(metrics["num-examples"]),
        "skipped_images": int(metrics["skipped_images"]),
    }


def measure(folder: Path, input_size: int) -> dict[str, Any]:
    """`run_node` on ``folder`` in a fresh Python process; its result."""
    with tempfile.TemporaryDirectory(prefix="fl_app-data-memory-") as cache_dir:
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--node",
                str(folder),
                cache_dir,
                "--input-size",
                str(input_size),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the node on {folder} failed (exit {done.returncode}): {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict[str, Any]], contrast: bool) -> str:
    """The results as a markdown table."""
    header = (
        "| images | on disk (MB) | baseline RSS (MB) | peak RSS (MB) | peak - baseline (MB) "
        "| peak vs first (MB) | activations (MB) | train call (s) | feature pass (img/s) |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    if contrast:
        lines[0] += " all decoded at 256 px (MB) |"
        lines[1] += "---|"
    for r in results:
        line = (
            f"| {r['images']:,} | {r['disk_mb']:.0f} | {r['baseline_rss_mb']:.0f} "
            f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} "
            f"| {r['peak_delta_mb']:+.0f} | {r['activations_mb']:.0f} "
            f"| {r['train_seconds']:.1f} | {r['feature_images_per_second']:.0f} |"
        )
        if contrast:
            line += f" {r['all_decoded_mb']:,.0f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--images", type=int, nargs="+", default=[1000, 20000], help="sizes of the node's folder"
    )
    parser.add_argument("--input-size", type=int, default=32, help="the model's input-size")
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("outputs/data-memory"),
        help="where the image trees are written (and reused): ROOT/images-<N>/",
    )
    parser.add_argument(
        "--json", type=Path, default=REPO / "docs" / "data_memory.json", help="results file"
    )
    parser.add_argument(
        "--contrast",
        action="store_true",
        help="also report what decoding every image into one uint8 array would take",
    )
    parser.add_argument(
        "--node", nargs=2, metavar=("DATA_DIR", "CACHE_DIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.node:
        print(json.dumps(run_node(Path(args.node[0]), args.input_size, Path(args.node[1]))))
        return 0
    sizes = sorted(set(args.images))
    if sizes[0] < 1:
        parser.error(f"--images {sizes[0]}: a node needs at least one image")

    results: list[dict[str, Any]] = []
    for images in sizes:
        folder = args.root / f"images-{images}"
        written = write_tree(folder, images)
        if written:
            print(f"wrote {images:,} images into {folder} in {written:.0f} s", flush=True)
        result = {"images": images, "disk_mb": disk_mb(folder), "generate_seconds": written}
        result |= measure(folder, args.input_size)
        result["peak_delta_mb"] = result["peak_rss_mb"] - (results or [result])[0]["peak_rss_mb"]
        # What loading the whole folder into memory would take instead of streaming it.
        result["all_decoded_mb"] = images * IMAGE_PX * IMAGE_PX * 3 / MB
        result["all_decoded_at_input_size_mb"] = images * args.input_size**2 * 3 / MB
        results.append(result)
        print(
            f"{images:,} images: peak RSS {result['peak_rss_mb']:.0f} MB, "
            f"train {result['train_seconds']:.1f} s",
            flush=True,
        )
    print(table(results, args.contrast))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    partial = args.json.with_name(f".{args.json.name}.partial")
    partial.write_text(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                "command": "python scripts/measure_data_memory.py "
                + " ".join(
                    [f"--images {' '.join(map(str, sizes))}", f"--input-size {args.input_size}"]
                    + (["--contrast"] if args.contrast else [])
                ),
                "image_px": IMAGE_PX,
                "classes": list(CLASSES),
                "jpeg_quality": JPEG_QUALITY,
                "input_size": args.input_size,
                "batch_size": BATCH,
                "load_average": os.getloadavg(),
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    os.replace(partial, args.json)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
