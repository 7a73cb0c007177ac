#!/usr/bin/env python3
"""Peak RSS of one training process of the model, as a device would run it.

Each case runs in its own process (peak RSS only grows): import TensorFlow/Keras,
build and compile the model in a phase, fit one epoch of 256 random 28x28 grey
images at batch 32, print the process's peak RSS.

Usage: python scripts/measure_memory.py [--sizes 32 96]
"""

import argparse
import resource
import subprocess
import sys

PHASES = ("cached-head", "head", "fine-tune")


def measure(phase: str, size: int) -> int:
    """Train once in this process; return its peak RSS in MB."""
    import numpy as np

    from fl_app.backbones import RESNET50
    from fl_app.model.classifier import build_head, build_model, compile_model, set_phase

    rng = np.random.default_rng(0)
    y = np.arange(256) % 10
    if phase == "cached-head":
        model = build_head(10)
        inputs = rng.random((256, 2048), dtype=np.float32)
    else:
        model = build_model(10, (28, 28, 1), size)
        set_phase(model, phase, RESNET50.cut.fine_tune_layers)
        inputs = rng.integers(0, 256, (256, 28, 28, 1), dtype=np.uint8)
    compile_model(model, 1e-3)
    model.fit(inputs, y, batch_size=32, verbose=0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96])
    parser.add_argument("--one", nargs=2, metavar=("PHASE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(measure(args.one[0], int(args.one[1])))
        return 0
    print("| phase | input px | peak RSS (MB) |\n|---|---|---|")
    for phase in PHASES:
        for size in args.sizes[:1] if phase == "cached-head" else args.sizes:
            done = subprocess.run(
                [sys.executable, __file__, "--one", phase, str(size)],
                capture_output=True,
                text=True,
                check=True,
            )
            print(
                f"| {phase} | {size if phase != 'cached-head' else '-'} | "
                f"{done.stdout.split()[-1]} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
