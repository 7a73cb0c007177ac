"""scripts/time_to_accuracy.py: time to target and ratios from round records, and the
benchmark end to end at its smallest size (two real `flwr run`s).

Timings are never asserted (other processes share the cores): only that every number is
there and that the ratios are the two runs' own numbers divided.
"""

from __future__ import annotations

import json

import pytest
from helpers import run_script
from time_to_accuracy import (
    AGAIN,
    BASELINE,
    OURS,
    TITLES,
    ratios,
    summary,
    time_to_target,
)


def run(accuracy: list[float], round_time: list[float], wall_time: float) -> dict:
    """What `benchmarking.run_app` returns, as far as the summary reads it."""
    rounds = [
        {"round": n, "server_accuracy": a, "round_time": t}
        for n, (a, t) in enumerate(zip(accuracy, round_time, strict=True), start=1)
    ]
    return {"rounds": rounds, "wall_time": wall_time}


def test_time_to_target_is_the_wall_time_less_the_later_rounds():
    finished = run([0.7, 0.86, 0.88], [30.0, 2.0, 3.0], 50.0)
    assert time_to_target(finished, 0.85) == (47.0, 2)
    assert time_to_target(finished, 0.7) == (45.0, 1)
    assert time_to_target(finished, 0.9) is None


def test_ratios_divide_the_baseline_by_ours():
    ours = summary(run([0.86, 0.88], [30.0, 2.0], 50.0), 0.85)
    baseline = summary(run([0.86, 0.88], [60.0, 50.0], 160.0), 0.85)
    to_target, rounds = ratios(ours, baseline, 0.85)
    assert to_target.ratio == pytest.approx(110 / 48)
    assert to_target.met is False
    assert rounds.ratio == pytest.approx(25) and rounds.met is True
    assert "| 2.29x | >= 10x | no |" in to_target.markdown()


def test_a_baseline_that_never_reaches_the_target_gives_a_lower_bound():
    ours = summary(run([0.86, 0.88], [3.0, 1.0], 10.0), 0.85)
    slow = summary(run([0.5, 0.6], [60.0, 50.0], 160.0), 0.85)
    to_target = ratios(ours, slow, 0.85)[0]
    # More than its whole run over our 9 s.
    assert to_target.ratio == pytest.approx(160 / 9) and to_target.met is True
    assert "| > 17.8x |" in to_target.markdown()
    # A bound under the target decides nothing.
    assert ratios(summary(run([0.86, 0.88], [50.0, 1.0], 60.0), 0.85), slow, 0.85)[0].met is None
    # Ours never there: no ratio, not met.
    never = ratios(slow, ours, 0.85)[0]
    assert never.ratio is None and never.met is False
    assert "| n/a | >= 10x | no |" in never.markdown()


# 1.5-3 minutes of two real simulations: a benchmark smoke run, in make test-faults.
@pytest.mark.e2e
@pytest.mark.slow
def test_smallest_time_to_accuracy_reports_both_runs_and_their_ratios(tmp_path):
    out = tmp_path / "time_to_accuracy.json"
    log = run_script("time_to_accuracy", tmp_path, "--smallest", "--json", str(out))

    result = json.loads(out.read_text())
    assert result["machine"]["cpu_count"] >= 1
    runs, summaries = result["runs"], result["summaries"]
    assert set(runs) == set(summaries) == {OURS, AGAIN, BASELINE}
    for name, finished in runs.items():
        assert [r["round"] for r in finished["rounds"]] == [1, 2]
        # --smallest's target 0 is reached in round 1: all but round 2 counts.
        assert summaries[name]["target_round"] == 1
        assert summaries[name]["time_to_target"] == pytest.approx(
            finished["wall_time"] - finished["rounds"][1]["round_time"]
        )
    # The baseline is quickstart-style on the server too; ours runs with the defaults.
    assert runs[BASELINE]["run_config"]["exchange"] == "full"
    assert runs[BASELINE]["run_config"]["feature-cache"] is False
    assert "exchange" not in runs[OURS]["run_config"]
    assert runs[AGAIN]["run_config"] == runs[OURS]["run_config"]
    # Every weight against the head's.
    sent = [runs[name]["rounds"][1]["bytes_received"] for name in (OURS, BASELINE)]
    assert sent[0] < sent[1]

    to_target, rounds, again = result["ratios"]
    assert to_target["ratio"] == pytest.approx(
        summaries[BASELINE]["time_to_target"] / summaries[OURS]["time_to_target"]
    )
    assert rounds["ratio"] == pytest.approx(
        runs[BASELINE]["rounds"][1]["round_time"] / runs[OURS]["rounds"][1]["round_time"]
    )
    assert again["ratio"] == pytest.approx(
        summaries[BASELINE]["time_to_target"] / summaries[AGAIN]["time_to_target"]
    )
    for ratio in (to_target, rounds, again):
        assert ratio["met"] is (ratio["ratio"] >= ratio["target"])
        assert f"| {ratio['metric']} | {ratio['ratio']:.3g}x |" in log
    for title in TITLES.values():
        row = next(line for line in log.splitlines() if line.startswith(f"| {title} |"))
        assert " | round 1 | " in row
    for finished_round in (1, 2):
        assert f"\n| {finished_round} | " in log
