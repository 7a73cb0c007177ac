"""GPU sharing settings reach every process that imports fl_app (no GPU needed to check)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fl_app.gpu import SHARED_GPU_ENV

PRINT_ENV = (
    "import json, os, fl_app; "
    f"print(json.dumps({{k: os.environ.get(k) for k in {list(SHARED_GPU_ENV)!r}}}))"
)


def _env_after_import(**preset: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SHARED_GPU_ENV}
    done = subprocess.run(
        [sys.executable, "-c", PRINT_ENV],
        env={**env, **preset},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def test_importing_fl_app_makes_jax_and_tensorflow_allocate_gpu_memory_on_demand():
    assert _env_after_import() == {
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
    }


def test_a_value_the_user_set_wins():
    env = _env_after_import(XLA_PYTHON_CLIENT_PREALLOCATE="true")
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
    assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
