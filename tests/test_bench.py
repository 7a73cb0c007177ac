"""The benchmarks end to end at their smallest size: real `flwr run`s, every row reported.

Timings are never asserted (other processes share the cores); only that every row
of the table is there with finite numbers.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from helpers import REPO, run_script

pytestmark = pytest.mark.e2e
COMPRESSIONS = ("none", "float16", "int8")
ROWS = [
    "head-phase client time per train message",
    "head-phase round time",
    *(f"upload per client per round, compression={c}" for c in COMPRESSIONS),
    *(f"final server accuracy, compression={c} " for c in COMPRESSIONS),
    "training throughput, ClientApp",
    "peak RSS of the process tree",
]


# 2.5 minutes of two real simulations: outside make test (CI), in make test-faults.
@pytest.mark.slow
def test_smallest_bench_prints_and_writes_every_row(tmp_path):
    out = tmp_path / "bench.json"
    log = run_script("bench_client", tmp_path, "--smallest", "--json", str(out))

    result = json.loads(out.read_text())
    assert result["machine"]["cpu_count"] >= 1
    rows = result["rows"]
    assert len(rows) == len(ROWS)
    for expected, row in zip(ROWS, rows, strict=True):
        assert row["metric"].startswith(expected)
        assert f"| {row['metric']} |" in log
        for key in ("value", "baseline", "ratio"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (key, row)
        assert row["met"] in (True, False) or not row["target"]
    # Uploads: the compressed runs really send less than the uncompressed one.
    uploads = {r["metric"].rsplit("=", 1)[1]: r["value"] for r in rows if "upload" in r["metric"]}
    assert uploads["int8"] < uploads["float16"] < uploads["none"]


def test_data_memory_bench_at_its_smallest_reports_finite_positive_numbers(tmp_path):
    out = tmp_path / "data_memory.json"
    done = subprocess.run(
        [
            *(sys.executable, REPO / "scripts" / "measure_data_memory.py"),
            *("--images", "32", "64", "--input-size", "32", "--contrast"),
            *("--root", str(tmp_path / "images"), "--json", str(out)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["images"] for r in results] == [32, 64]
    for r in results:
        # Every image trains or validates; none is skipped.
        assert r["num_examples"] + round(r["images"] * 0.1) == r["images"] == r["feature_images"]
        assert r["skipped_images"] == 0
        # The first size is the reference of the deltas: 0 there, so finite only.
        assert math.isfinite(r["peak_delta_mb"])
        for key, value in r.items():
            if key not in ("peak_delta_mb", "skipped_images"):
                assert isinstance(value, int | float) and math.isfinite(value), (key, value)
                assert value > 0 or key == "generate_seconds", (key, value)
        assert r["baseline_rss_mb"] <= r["after_features_rss_mb"] <= r["peak_rss_mb"]
        assert f"| {r['images']} |" in done.stdout


# Two small simulations, plain and SecAgg+, ~2 minutes: in make test-faults.
@pytest.mark.slow
def test_smallest_secagg_bench_under_client_dp_reports_both_phases(tmp_path):
    out = tmp_path / "secagg.json"
    log = run_script("secagg_cost", tmp_path, "--smallest", "--dp-clip", "1.0", "--json", str(out))

    result = json.loads(out.read_text())
    assert result["args"]["dp_clip"] == 1.0 and "dp=client with clip 1" in log
    for mode in ("plain", "secagg+"):
        assert list(result["costs"][mode]) == ["head", "fine-tune"]
        for phase in result["costs"][mode].values():
            assert all(math.isfinite(v) and v > 0 for v in phase.values()), phase
    for phase in ("head", "fine-tune"):
        plain, secure = result["costs"]["plain"][phase], result["costs"]["secagg+"][phase]
        # The masked upload is int64: twice the float32 bytes.
        assert 1.9 < secure["bytes_up"] / plain["bytes_up"] < 2.1
        assert f"| {phase} |" in log
    for run in result["runs"].values():
        assert all(r["dp_epsilon"] > 0 for r in run["rounds"])
