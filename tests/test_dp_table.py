"""scripts/dp_table.py's arithmetic and bookkeeping, without a simulation."""

from __future__ import annotations

import argparse
import math

import dp_table
import numpy as np
import pytest

from fl_app.privacy import noise_std


def _metrics(**per_round):
    rounds = [{"round": 0, "server_accuracy": 0.1}]
    for i, accuracy in enumerate([0.3, 0.5, 0.4], start=1):
        record = {"round": i, "server_accuracy": accuracy, "train_replies": 20}
        record.update({key: values[i - 1] for key, values in per_round.items()})
        rounds.append(record)
    return {"status": "completed", "rounds": rounds}


def test_nodes_needed_puts_the_noise_norm_at_the_clip():
    d, z, clip = 165_258, 2.0, 0.7
    m = dp_table.nodes_needed(z, d)
    assert m == pytest.approx(math.sqrt(d) * z)
    # The privacy module's per-coordinate std, over d coordinates, at that m: norm C.
    assert math.sqrt(d) * noise_std(z, clip, m) == pytest.approx(clip)
    assert dp_table.noise_to_clip(z, d, 20) == pytest.approx(m / 20)


def test_noise_norm_of_a_real_draw_matches_sqrt_d():
    d, z, clip, m = 40_000, 3.0, 0.5, 20
    draw = np.random.default_rng(0).normal(0.0, noise_std(z, clip, m), d)
    assert np.linalg.norm(draw) / clip == pytest.approx(dp_table.noise_to_clip(z, d, m), rel=0.02)


def test_summarize_reads_accuracy_and_dp_records():
    summary = dp_table.summarize(
        _metrics(
            update_norm_median=[0.9, 0.7, 0.6],
            dp_noise_std=[0.1] * 3,
            dp_clipped=[10, 9, 11],
            dp_epsilon=[1.0, 1.5, 2.0],
        )
    )
    assert summary["accuracy"] == [0.3, 0.5, 0.4]
    assert (summary["final_accuracy"], summary["best_accuracy"]) == (0.4, 0.5)
    assert summary["round0_accuracy"] == 0.1
    assert summary["epsilon"] == 2.0
    assert dp_table.clip_from(summary) == 0.7


def test_a_run_without_dp_records_has_no_epsilon_and_no_clip():
    summary = dp_table.summarize(_metrics())
    assert summary["epsilon"] is None and summary["dp_clipped"] is None
    with pytest.raises(ValueError, match="--clip"):
        dp_table.clip_from(summary)


def test_table_prints_every_row_and_infinity():
    clean = dp_table.summarize(_metrics(update_norm_median=[0.7] * 3))
    private = dp_table.summarize(_metrics(dp_clipped=[10] * 3, dp_epsilon=[1.0, 2.0, 3.0]))
    results = {
        "settings": {"nodes": 20},
        "clip": 0.7,
        "head_parameters": 165_258,
        "rows": {
            dp_table.CLEAN: clean | {"wall_s": 60.0},
            "ε = 3": private | {"wall_s": 60.0, "target_epsilon": 3.0, "noise_multiplier": 4.7},
            dp_table.CLIP_ONLY: private
            | {"wall_s": 60.0, "target_epsilon": "inf", "noise_multiplier": 1e-3},
        },
    }
    lines = dp_table.table(results).splitlines()
    assert len(lines) == 5
    assert "| ε = 3 | 3 | 4.7 | 0.165 | 95.5 |" in lines[3]
    assert "30 of 60" in lines[3]
    assert "| ∞ |" in lines[4]
    needed = dp_table.needed(results)
    assert f"m = {math.sqrt(165_258) * 4.7:,.0f}" in needed
    assert "inf" not in needed


def test_plan_noise_norm_rows_match_the_noise_of_more_nodes():
    args = argparse.Namespace(
        clip_only_noise=1e-3,
        epsilons=[8.0, 1.0],
        noise_norms=[10.0],
        rounds=10,
        delta=1e-5,
        nodes=20,
    )
    d = 165_258
    rows = dp_table.plan(args, d)
    assert [r["slug"] for r in rows] == ["clip-only", "eps-8", "eps-1", "noise-10C"]
    emulation = rows[-1]
    z = emulation["noise_multiplier"]
    assert dp_table.noise_to_clip(z, d, 20) == pytest.approx(10.0)
    for row in rows[1:3]:
        nodes = emulation["emulates"][f"{row['target_epsilon']:g}"]
        # The same noise per coordinate: z_eps·C/M at M nodes = z'·C/20 here.
        assert noise_std(row["noise_multiplier"], 1.0, nodes) == pytest.approx(
            noise_std(z, 1.0, 20)
        )
