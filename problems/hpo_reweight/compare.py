"""The three-level preset against two-level baselines on the same data, model and inner solver.

    python problems/hpo_reweight/compare.py [--seeds 0,1,2] [--steps 150] [--json out.json]

Every configuration trains the same linear classifier with the same bottom solver (20
warm-started SGD steps per solve) on the same noisy training set, and may use the 400 clean
validation examples; seeds change the split and which labels are corrupted. Configurations:

* ``noisy, L2 tuned``: two levels; the L2 strength tuned on all 400 clean examples, no weights.
* ``weights, L2 fixed``: two levels (hyper-cleaning); per-example weights tuned on all 400 clean
  examples, strength fixed at the three-level preset's starting value exp(-4).
* ``weights + L2 jointly``: two levels; weights and strength both upstairs, on all 400.
* ``weights, L2 by grid``: the two-level alternative to the third level: hyper-cleaning with the
  weights on clean split 1 for each strength of a grid, the strength picked by the final model's
  loss on clean split 2 (the wall time is that of the whole grid).
* ``three levels``: the preset: strength on clean split 2 (200), weights on clean split 1 (200).

The weights get the same number of updates everywhere: the three-level middle level takes
5 Adam steps per outer step, so the two-level baselines with weights run 5x as many outer steps.
Prints a markdown table (mean and standard deviation over the seeds) and writes per-run figures
as JSON."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from bilevel import run  # noqa: E402
from bilevel.presets import find_preset  # noqa: E402
from bilevel.spec import load_spec, spec_from_data  # noqa: E402
from problems.common.outputs import markdown_table  # noqa: E402

INNER_STEPS = 5  # middle-level Adam steps per outer step in the three-level preset
GRID = (-8.0, -6.0, -4.0, -2.0)  # log L2 strengths of the grid-search baseline


def _preset(seed: int) -> dict[str, Any]:
    data = load_spec(find_preset("hpo_reweight/digits")).spec.model_dump(mode="json")
    for level in data["levels"].values():
        if level["data"] is not None:
            level["data"]["kwargs"]["seed"] = seed
    data["report_kwargs"] = {"seed": seed}
    data["run"]["seed"] = seed
    data["run"].pop("checkpoint_every", None)
    return data


def configurations(seed: int, steps: int) -> dict[str, dict[str, Any]]:
    """name -> spec data, all derived from the three-level preset."""
    three = _preset(seed)
    three["run"]["steps"] = steps
    hpo, reweight, model = (three["levels"][k] for k in ("hpo", "reweight", "model"))
    all_val = {"source": "problems.hpo_reweight:val_data", "kwargs": {"seed": seed}}

    def two_level(upper_vars: dict[str, Any], lr: float, outer_steps: int, model_kwargs: dict[str, Any]) -> dict[str, Any]:
        lower = copy.deepcopy(model)
        lower["parent"] = "upper"
        lower["objective_kwargs"] = model_kwargs
        return {
            "name": "hpo-reweight-baseline",
            "levels": {
                "upper": {"variables": upper_vars, "objective": hpo["objective"], "data": all_val, "solver": {"name": "adam", "lr": lr}},
                "lower": lower,
            },
            "report": three["report"],
            "report_kwargs": {"seed": seed},
            "run": {**three["run"], "steps": outer_steps},
        }

    strength = {"log_l2": copy.deepcopy(hpo["variables"]["log_l2"])}
    weights = {"lam": copy.deepcopy(reweight["variables"]["lam"])}
    configs = {
        "noisy, L2 tuned": two_level(strength, hpo["solver"]["lr"], steps, {}),
        "weights, L2 fixed": two_level(weights, reweight["solver"]["lr"], INNER_STEPS * steps, {"log_l2": -4.0}),
        "weights + L2 jointly": two_level({**weights, **strength}, reweight["solver"]["lr"], INNER_STEPS * steps, {}),
    }
    for value in GRID:
        member = two_level(weights, reweight["solver"]["lr"], INNER_STEPS * steps, {"log_l2": value})
        member["levels"]["upper"]["data"] = copy.deepcopy(reweight["data"])  # weights on clean split 1
        member["report_kwargs"]["log_l2"] = value
        configs[f"grid {value:g}"] = member
    configs["three levels"] = three
    return configs


def _split2_loss(y: tuple[Any, ...], seed: int) -> float:
    """Cross-entropy of the final two-level model (W, b) on clean split 2: the grid's selection criterion."""
    import torch.nn.functional as nnf

    from problems.hpo_reweight import val_data

    batch = val_data(split=2, seed=seed)
    return float(nnf.cross_entropy(nnf.linear(batch["x"], y[0].cpu().float(), y[1].cpu().float()), batch["y"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=150, help="outer steps of the three-level run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        grid: list[dict[str, Any]] = []
        for name, data in configurations(seed, args.steps).items():
            began = time.perf_counter()
            outcome = run(spec_from_data(data), device="cpu", out=tempfile.mkdtemp(), progress=False)
            result = outcome.result
            record = {"config": name, "seed": seed, "engine": result["engine"], "steps": result["steps"],
                      "wall_time_s": time.perf_counter() - began, **result["report"]}
            if name.startswith("grid "):
                record["split2_loss"] = _split2_loss(outcome.y, seed)
                grid.append(record)
            runs.append(record)
            print(f"seed {seed} {name}: {json.dumps(record)}", file=sys.stderr)
        best = min(grid, key=lambda r: r["split2_loss"])
        runs.append({**best, "config": "weights, L2 by grid", "wall_time_s": sum(r["wall_time_s"] for r in grid)})

    def cell(values: list[float], digits: int = 3) -> str:
        mean = statistics.mean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{mean:.{digits}f} ± {spread:.{digits}f}"

    table = []
    names = [n for n in configurations(seeds[0], args.steps) if not n.startswith("grid ")]
    for name in [*names[:-1], "weights, L2 by grid", names[-1]]:
        rows = [r for r in runs if r["config"] == name]
        f1 = cell([r["detection_f1"] for r in rows]) if "detection_f1" in rows[0] else "-"
        table.append([name, rows[0]["engine"], rows[0]["steps"], cell([r["test_accuracy"] for r in rows]), f1,
                      cell([r["l2_strength"] for r in rows], 4), cell([r["wall_time_s"] for r in rows], 0)])
    print(markdown_table(["configuration", "engine", "outer steps", "test accuracy", "detection F1", "L2 strength", "wall time (s)"], table))
    if args.json is not None:
        args.json.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
