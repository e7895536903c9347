"""RTHO against hand-tuned constant and cosine schedules and short-horizon reverse mode, on digits.

    python -m problems.schedule.compare [--seeds 0 1 2] [--json out.json]

Prints one markdown table (mean and standard deviation over the seeds of the final test accuracy,
the wall time of one method's whole procedure and the tuned values) and writes the per-seed
figures as JSON. Every method trains the same MLP for 1000 momentum-SGD steps on minibatches of 50."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bilevel import run
from problems.schedule import GRID, hand_tuned, schedule_spec

METHODS = {
    "RTHO (forward, online)": {"kind": "forward", "online": True},
    "reverse mode, last 20 steps (unrolled)": {"kind": "unrolled"},
}


def _bilevel(engine: dict[str, Any], seed: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        result = run(schedule_spec(engine=engine, seed=seed), out=Path(out), overwrite=True, progress=False).result
    report = result["report"]
    return {"test_accuracy": report["test_accuracy"], "val_accuracy": report["val_accuracy"],
            "wall_time_s": result["wall_time_s"], "lr": report["lr"], "momentum": report["momentum"]}


def compare(seeds: list[int]) -> dict[str, list[dict[str, float]]]:
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in (*METHODS, "constant lr (grid)", "cosine (grid)")}
    for seed in seeds:
        for name, engine in METHODS.items():
            rows[name].append(_bilevel(engine, seed))
        rows["constant lr (grid)"].append({**hand_tuned("constant", seed), "momentum": 0.9})
        rows["cosine (grid)"].append({**hand_tuned("cosine", seed), "momentum": 0.9})
    return rows


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def table(rows: dict[str, list[dict[str, float]]]) -> str:
    lines = ["| method | test accuracy | wall time (s) | lr (final / chosen) | momentum |", "|---|---|---|---|---|"]
    for name, trials in rows.items():
        lr = ", ".join(f"{t['lr']:.3g}" for t in trials)
        momentum = ", ".join(f"{t['momentum']:.2f}" for t in trials)
        time = _mean_std([t["wall_time_s"] for t in trials]).replace("±", "±")
        lines.append(f"| {name} | {_mean_std([t['test_accuracy'] for t in trials])} | {time} | {lr} | {momentum} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = compare(args.seeds)
    if args.json is not None:
        args.json.write_text(json.dumps({"grid": GRID, "rows": rows}, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
