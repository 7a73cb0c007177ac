"""Accuracy against ε: client-level DP-FedAvg on Fashion-MNIST, EfficientNet-Lite0 head phase.

Runs, through the Hydra launcher (``python -m fl_app.launch.experiment``, a local
simulation), with the same nodes, examples, rounds and seed:

* a clean run (``dp=none``), whose median per-node update norm becomes the clip ``C``
  of the others (unless ``--clip`` is given);
* ``dp=server`` with clip ``C`` and a tiny noise multiplier: ε ≈ ∞, the cost of
  clipping (and of uniform weights) alone;
* ``dp=server`` with clip ``C`` and the noise multiplier ``z`` that
  `fl_app.privacy.noise_multiplier_for` gives for each target ε after ``--rounds``
  rounds at ``--delta``;
* ``dp=server`` with clip ``C`` and the noise multiplier that makes the noise's norm
  ``r·C`` for each ``--noise-norms`` ratio ``r``: the noise each target ε would leave
  with more nodes (`plan`).

Every round is in the head phase (``head_rounds = num_server_rounds``): only the head
(Dense 1280→128→10 on the pooled features) trains and travels, so ``d``, the dimension
the noise is added in, is the head's parameter count. Prints a markdown table and the
number of nodes ``m`` at which the noise on the averaged update, ``sqrt(d)·z·C/m`` in
L2 norm, would be as large as one clipped update ``C``: ``m = sqrt(d)·z``. Writes the
numbers to ``--out`` (default ``docs/dp_table.json``); ``--table-only`` reprints the
table from it.

Usage: python scripts/dp_table.py [--nodes 20] [--examples 200] [--rounds 10] ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarking import REPO, run_launcher

LITE0 = "efficientnet_lite0"
CLEAN, CLIP_ONLY = "clean (dp=none)", "ε ≈ ∞ (clip only)"
NONE = "-"  # an empty table cell


def nodes_needed(noise_multiplier: float, parameters: int) -> float:
    """Sampled nodes ``m`` at which the averaged update's noise has L2 norm ``C``.

    The noise on each coordinate of the average of ``m`` clipped updates has
    standard deviation ``z·C/m``; over ``d`` coordinates its norm is about
    ``sqrt(d)·z·C/m``, while the average of the clipped updates has norm at most
    ``C``. They are equal at ``m = sqrt(d)·z``. At a fixed ε and number of rounds
    ``z`` is fixed (no sampling amplification), so only ``m`` brings it down.

    Parameters
    ----------
    noise_multiplier : float
        ``z``, the noise standard deviation over the clip.
    parameters : int
        ``d``, the number of coordinates that are noised (the arrays that travel).

    Returns
    -------
    float
        ``sqrt(d)·z``.

    """
    return math.sqrt(parameters) * noise_multiplier


def noise_to_clip(noise_multiplier: float, parameters: int, sampled: int) -> float:
    """The noise's L2 norm on the averaged update over the clip: ``sqrt(d)·z/m``.

    Parameters
    ----------
    noise_multiplier : float
        ``z``.
    parameters : int
        ``d``, the number of noised coordinates.
    sampled : int
        ``m``, the nodes averaged each round.

    Returns
    -------
    float
        Above 1, the noise outweighs even a perfectly aligned set of updates.

    """
    return nodes_needed(noise_multiplier, parameters) / sampled


def summarize(metrics: dict[str, Any]) -> dict[str, Any]:
    """What the table needs from a run's ``metrics.json``.

    Parameters
    ----------
    metrics : dict
        The parsed ``metrics.json`` of one run.

    Returns
    -------
    dict
        Per-round server accuracy, final and best accuracy, and, where the
        strategy recorded them, per-round ``update_norm_median``, ``dp_noise_std``,
        ``dp_clipped`` and ``dp_epsilon`` (the last round's as ``epsilon``).

    """
    rounds = [r for r in metrics["rounds"] if r["round"] > 0]
    accuracy = [r["server_accuracy"] for r in rounds]
    summary: dict[str, Any] = {
        "status": metrics.get("status"),
        "accuracy": accuracy,
        "round0_accuracy": metrics["rounds"][0].get("server_accuracy"),
        "final_accuracy": accuracy[-1] if accuracy else None,
        "best_accuracy": max(accuracy) if accuracy else None,
        "train_replies": [r.get("train_replies") for r in rounds],
    }
    for key in ("update_norm_median", "dp_noise_std", "dp_clipped", "dp_epsilon"):
        values = [r.get(key) for r in rounds]
        summary[key] = values if any(v is not None for v in values) else None
    summary["epsilon"] = summary["dp_epsilon"][-1] if summary["dp_epsilon"] else None
    return summary


def clip_from(clean: dict[str, Any]) -> float:
    """The median over rounds of the clean run's per-round median update norm.

    Raises ``ValueError`` when the run recorded no ``update_norm_median``.
    """
    norms = [n for n in clean.get("update_norm_median") or [] if n is not None]
    if not norms:
        raise ValueError(
            "the clean run recorded no update_norm_median (fl_app's strategy too old?): give --clip"
        )
    return float(statistics.median(norms))


def head_parameters(classes: int = 10) -> int:
    """Trainable parameters of the head on EfficientNet-Lite0's pooled features."""
    from fl_app.backbones import BACKBONES
    from fl_app.model.classifier import build_head, trainable_parameter_count

    return trainable_parameter_count(build_head(classes, BACKBONES[LITE0].features))


def common(args: argparse.Namespace) -> list[str]:
    """Launcher overrides every run shares."""
    return [
        f"model={LITE0}",
        "model.weights=imagenet",
        f"model.input_size={args.input_size}",
        "dataset=fashion_mnist",
        f"dataset.max_examples_per_node={args.examples}",
        f"dataset.max_test_examples={args.test_examples}",
        f"federation.num_supernodes={args.nodes}",
        # Every node connected before round 1 and sampled every round: m = nodes.
        f"strategy.min_available_nodes={args.nodes}",
        "strategy.fraction_train=1.0",
        # The table is about server test accuracy; federated evaluation only costs time.
        "strategy.fraction_evaluate=0",
        "strategy.min_evaluate_nodes=0",
        f"num_server_rounds={args.rounds}",
        f"head_rounds={args.rounds}",
        f"seed={args.seed}",
    ]


def dp_overrides(clip: float, noise_multiplier: float, delta: float) -> list[str]:
    """Launcher overrides of a ``dp=server`` run."""
    return [
        "dp=server",
        f"dp.clip={clip!r}",
        f"dp.noise_multiplier={noise_multiplier!r}",
        f"dp.delta={delta!r}",
        "dp.target_epsilon=0",
    ]


def run(name: str, overrides: list[str], job_dir: Path) -> dict[str, Any]:
    """One launcher run; its summary (`summarize`) and wall time."""
    print(f"running: {name}", flush=True)
    wall = run_launcher(name, overrides, job_dir, keep_log=True)
    summary = summarize(json.loads((job_dir / "metrics.json").read_text()))
    summary.update(overrides=overrides, wall_s=wall, job_dir=str(job_dir))
    print(f"  accuracy {summary['accuracy']}  ({wall:.0f} s)", flush=True)
    return summary


def plan(args: argparse.Namespace, parameters: int) -> list[dict[str, Any]]:
    """The ``dp=server`` rows after the clean run, in order.

    ``ε ≈ ∞`` (``--clip-only-noise``), one row per target ε, then one row per
    ``--noise-norms`` ratio ``r``: noise multiplier ``r·m/sqrt(d)`` at the table's
    ``m`` nodes, so that the noise's norm is ``r·C``. Its per-coordinate noise,
    ``r·C/sqrt(d)``, is what each target ε's ``z`` gives with
    ``m = sqrt(d)·z/r`` nodes (``emulates``), on the same average of clipped
    updates: more IID nodes change that average little.
    """
    from fl_app.privacy import noise_multiplier_for

    rows: list[dict[str, Any]] = []
    if args.clip_only_noise > 0:
        rows.append(
            {"name": CLIP_ONLY, "slug": "clip-only", "target_epsilon": math.inf}
            | {"noise_multiplier": args.clip_only_noise}
        )
    multipliers = {eps: noise_multiplier_for(eps, args.rounds, args.delta) for eps in args.epsilons}
    for eps, z in multipliers.items():
        rows.append(
            {"name": f"ε = {eps:g}", "slug": f"eps-{eps:g}", "target_epsilon": eps}
            | {"noise_multiplier": z}
        )
    for ratio in args.noise_norms:
        emulates = {
            f"{eps:g}": nodes_needed(z, parameters) / ratio for eps, z in multipliers.items()
        }
        places = ", ".join(f"ε {eps} at m ≈ {m:,.0f}" for eps, m in emulates.items())
        rows.append(
            {
                "name": f"noise norm {ratio:g}·C (= {places})",
                "slug": f"noise-{ratio:g}C",
                "noise_norm_ratio": ratio,
                "noise_multiplier": ratio * args.nodes / math.sqrt(parameters),
                "emulates": emulates,
            }
        )
    return rows


def _number(value: float | str | None, spec: str) -> str:
    """A table cell; infinity (``"inf"`` in the JSON) as ∞."""
    if value is None:
        return NONE
    value = float(value)
    if math.isinf(value):
        return "∞"
    return format(value, spec)


def table(results: dict[str, Any]) -> str:
    """The markdown table of ``results`` (as written to the JSON)."""
    settings = results["settings"]
    nodes, clip, d = settings["nodes"], results["clip"], results["head_parameters"]
    lines = [
        "| setting | ε target | noise multiplier z | noise std per coordinate (z·C/m) "
        "| noise norm / C (√d·z/m) | final server acc | best server acc | ε reported "
        "| updates clipped | wall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["rows"].items():
        z = row.get("noise_multiplier")
        dp = z is not None
        clipped = row.get("dp_clipped")
        total = sum(r or 0 for r in row["train_replies"])
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    _number(row.get("target_epsilon"), "g") if dp else NONE,
                    _number(z, ".3g") if dp else NONE,
                    _number(z * clip / nodes, ".3g") if dp else NONE,
                    _number(noise_to_clip(z, d, nodes), ".3g") if dp else NONE,
                    _number(row["final_accuracy"], ".3f"),
                    _number(row["best_accuracy"], ".3f"),
                    _epsilon_cell(row, nodes) if dp else NONE,
                    f"{sum(c or 0 for c in clipped)} of {total}" if dp and clipped else NONE,
                    f"{row['wall_s']:.0f} s",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def _epsilon_cell(row: dict[str, Any], nodes: int) -> str:
    """The ε a run reported; for a noise-norm row, said to be this run's, not the emulated one's."""
    cell = _number(row.get("epsilon"), ".3g")
    return f"{cell} (at m = {nodes})" if "emulates" in row else cell


def needed(results: dict[str, Any]) -> str:
    """The nodes-needed lines: ``m = sqrt(d)·z`` per target ε."""
    d, nodes = results["head_parameters"], results["settings"]["nodes"]
    lines = [
        f"d = {d:,} head parameters (the arrays that travel and are noised); m = {nodes} now.",
        "Nodes m per round at which the noise norm sqrt(d)·z·C/m equals the clip C:",
    ]
    for row in results["rows"].values():
        eps = row.get("target_epsilon")
        if eps is not None and math.isfinite(float(eps)):
            z = row["noise_multiplier"]
            lines.append(
                f"  ε = {float(eps):g}: z = {z:.3g} → m = {nodes_needed(z, d):,.0f}"
                f" (at m = {nodes} the noise norm is {noise_to_clip(z, d, nodes):.3g}·C)"
            )
    for row in results["rows"].values():
        if "emulates" in row:
            places = ", ".join(f"ε {eps} at m ≈ {m:,.0f}" for eps, m in row["emulates"].items())
            lines.append(
                f"Noise norm {row['noise_norm_ratio']:g}·C (the noise of {places}): final server "
                f"accuracy {row['final_accuracy']:.3f}"
            )
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    """Infinities as the string ``"inf"`` (strict JSON has none)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _write(path: Path, results: dict[str, Any]) -> None:
    """Write atomically: a temporary name, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(results), indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main() -> int:
    """Run the table's simulations (or reprint it) and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dp_table.json")
    parser.add_argument(
        "--jobs", type=Path, default=REPO / "outputs" / "dp-table", help="run folders"
    )
    parser.add_argument("--nodes", type=int, default=20, help="simulated nodes, all sampled")
    parser.add_argument("--examples", type=int, default=200, help="per node, before val split")
    parser.add_argument("--rounds", type=int, default=10, help="all of them head rounds")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--test-examples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epsilons", type=float, nargs="*", default=[8.0, 3.0, 1.0])
    parser.add_argument(
        "--clip", type=float, default=None, help="default: the clean run's median update norm"
    )
    parser.add_argument(
        "--clip-only-noise",
        type=float,
        default=1e-3,
        help="noise multiplier of the ε ≈ ∞ row (0 skips the row)",
    )
    parser.add_argument(
        "--noise-norms",
        type=float,
        nargs="*",
        default=[10.0, 1.0],
        help="rows whose noise norm is this many C: what more nodes would see",
    )
    parser.add_argument("--table-only", action="store_true", help="reprint from --out")
    parser.add_argument(
        "--reuse", action="store_true", help="keep the rows --out already has (same settings)"
    )
    args = parser.parse_args()
    out = args.out.resolve()
    if args.table_only:
        results = json.loads(out.read_text())
        print(table(results) + "\n\n" + needed(results))
        return 0

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out.parent.mkdir(parents=True, exist_ok=True)
    jobs = args.jobs.resolve()
    started = time.perf_counter()
    results: dict[str, Any] = {
        "settings": {
            k: getattr(args, k)
            for k in ("nodes", "examples", "rounds", "input_size", "test_examples", "seed", "delta")
        }
        | {"model": LITE0, "weights": "imagenet", "dataset": "fashion_mnist", "phase": "head"},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "head_parameters": head_parameters(),
        "rows": {},
    }
    if args.reuse and out.is_file():
        earlier = json.loads(out.read_text())
        if earlier["settings"] != results["settings"]:
            raise SystemExit(f"--reuse: {out} was made with other settings: {earlier['settings']}")
        results["rows"] = earlier["rows"]
        print(f"reusing: {', '.join(results['rows'])}", flush=True)
    base = common(args)
    if CLEAN not in results["rows"]:
        results["rows"][CLEAN] = run(CLEAN, [*base, "dp=none"], jobs / "clean")
    clean = results["rows"][CLEAN]
    results["clip"] = args.clip if args.clip is not None else clip_from(clean)
    results["clip_from"] = "--clip" if args.clip is not None else "clean run's median update norm"
    print(f"clip C = {results['clip']:.4g} ({results['clip_from']})", flush=True)
    _write(out, results)

    for row in plan(args, results["head_parameters"]):
        name = row.pop("name")
        if name in results["rows"]:
            continue  # --reuse: kept from --out
        overrides = base + dp_overrides(results["clip"], row["noise_multiplier"], args.delta)
        done = run(name, overrides, jobs / row.pop("slug"))
        if done["epsilon"] is None:
            raise RuntimeError(
                f"{name}: metrics.json has no dp_epsilon: the strategy did not apply DP"
            )
        results["rows"][name] = done | row
        _write(out, results)
    results["wall_s"] = time.perf_counter() - started
    _write(out, results)
    print(table(results) + "\n\n" + needed(results))
    print(f"\nall runs: {results['wall_s']:.0f} s; numbers in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
