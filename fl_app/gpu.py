"""Several processes on one GPU: the ServerApp and every ClientApp actor of a machine.

By default JAX takes 75 % of a GPU's memory in the first process that uses it and
TensorFlow all of it, so a second ClientApp actor on the same GPU (a simulation's
``client_num_gpus`` < 1) fails to allocate. `share_gpus` makes each process allocate
what it uses as it goes. It sets environment variables, which both libraries read when
they first touch a GPU, so it must run before any Keras computation: ``fl_app`` calls
it on import (every ServerApp, ClientApp and Ray actor imports the package first). A
value already in the environment wins, e.g. ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.2`` with
``XLA_PYTHON_CLIENT_PREALLOCATE=true`` for a fixed share per process.
"""

from __future__ import annotations

import os

# JAX: allocate on demand instead of 75 % up front; TensorFlow: grow as needed.
SHARED_GPU_ENV = {
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    "TF_FORCE_GPU_ALLOW_GROWTH": "true",
}


def share_gpus() -> None:
    """Let processes share a GPU; environment values set before take precedence."""
    for key, value in SHARED_GPU_ENV.items():
        os.environ.setdefault(key, value)
