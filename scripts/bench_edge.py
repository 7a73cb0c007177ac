#!/usr/bin/env python3
"""Edge-device cost of each backbone: peak RSS and images per second, on this CPU.

Each case runs in its own process (peak RSS only grows): import Keras/TensorFlow,
build the classifier (architecture only, random weights: speed and memory do not
depend on the values), then either

* ``inference``: ``predict`` on 28x28 grey uint8 images,
* ``frozen``: one ``fit`` epoch of the head phase, backbone frozen (the first phase of
  the transfer schedule, run through the backbone as a node without a cache does),
* ``fine-tune``: one ``fit`` epoch with the backbone's last 32 layers unfrozen
  (ResNet50: the conv5 block; Lite0: block6b's projection to the head conv),

after one untimed warm-up pass over the same images (it traces the step; a one-batch
warm-up left the first timed call up to 1.6x slower). Batch 32; img/s over ``--images``
images; peak RSS of the whole process (Python, TensorFlow, model, training). With
``--repeat N`` every case runs N times, the backbones alternating, and the fastest run
counts (other processes on a shared machine only ever slow a run down).

Usage: python scripts/bench_edge.py [--sizes 32 96] [--images 512] [--repeat 2] [--json out.json]
"""

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

BACKBONES = ("resnet50", "efficientnet_lite0")
MODES = ("inference", "frozen", "fine-tune")
BATCH = 32


def measure(backbone: str, mode: str, size: int, images: int) -> dict:
    """Run one case in this process; return img/s and peak RSS (MB)."""
    import keras
    import numpy as np

    from fl_app.model.classifier import build_model, compile_model, set_phase
    from fl_app.schedule import FINE_TUNE, HEAD

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (images, 28, 28, 1), dtype=np.uint8)
    y = np.arange(images) % 10
    model = build_model(10, (28, 28, 1), size, None, backbone)
    params = model.count_params()
    if mode == "inference":
        model.predict(x, batch_size=BATCH, verbose=0)
        start = time.perf_counter()
        model.predict(x, batch_size=BATCH, verbose=0)
    else:
        set_phase(model, HEAD if mode == "frozen" else FINE_TUNE, 32)
        compile_model(model, 1e-3)
        model.fit(x, y, batch_size=BATCH, verbose=0)
        start = time.perf_counter()
        model.fit(x, y, batch_size=BATCH, verbose=0)
    seconds = time.perf_counter() - start
    return {
        "backbone": backbone,
        "mode": mode,
        "input_size": size,
        "images_per_second": images / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters": params,
        "trainable_parameters": int(sum(np.prod(v.shape) for v in model.trainable_weights)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the fastest counts")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--one", nargs=3, metavar=("BACKBONE", "MODE", "SIZE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], int(args.one[2]), args.images)))
        return 0
    results = []
    print("| backbone | input px | mode | img/s | peak RSS (MB) | trainable params |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        for mode in MODES:
            runs: dict[str, list[dict]] = {backbone: [] for backbone in BACKBONES}
            for _, backbone in itertools.product(range(args.repeat), BACKBONES):
                done = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--one",
                        backbone,
                        mode,
                        str(size),
                        "--images",
                        str(args.images),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs[backbone].append(json.loads(done.stdout.strip().splitlines()[-1]))
            for backbone in BACKBONES:
                r = max(runs[backbone], key=lambda run: run["images_per_second"])
                r["all_images_per_second"] = [run["images_per_second"] for run in runs[backbone]]
                results.append(r)
                print(
                    f"| {backbone} | {size} | {mode} | {r['images_per_second']:.0f} | "
                    f"{r['peak_rss_mb']:.0f} | {r['trainable_parameters']:,} |",
                    flush=True,
                )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                    "batch_size": BATCH,
                    "images": args.images,
                    "repeat": args.repeat,
                    "load_average": os.getloadavg(),
                    "results": results,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
