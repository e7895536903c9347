"""The scaling table of benchmarks/time_to_target.py: time per outer step and peak memory of each
method on data hyper-cleaning with the Gaussian-mixture data (problems/hyperclean, dataset
mixture; linear model), as the training set (= the number of hyperparameters, one weight per
example) and the width (input features d; the lower level has 10 d + 10 scalars) grow.

Each (size, method) runs in a fresh process (``--one``): its peak resident-set growth over the
steps is its own, not the allocator's cache of an earlier method. Time per outer step: the median
of the steps after the first.

    python benchmarks/time_to_target_scaling.py            # the table alone
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = [(1000, 64), (4000, 64), (4000, 256), (4000, 784)]
STEPS = 4


def _overrides(n: int, d: int) -> tuple[str, ...]:
    data = [f"levels.{level}.data.kwargs.{key}={value}" for level in ("upper", "lower")
            for key, value in (("dataset", "mixture"), ("n_train", n), ("n_val", n), ("d", d))]
    return (*data, f"levels.upper.variables.lam.shape=[{n}]", f"levels.lower.variables.W.shape=[10,{d}]")


def one(n: int, d: int, method: str) -> dict[str, Any]:
    """Run ``method`` for STEPS outer steps at (n, d) in this process: time per step, peak RSS growth."""
    from benchmarks.hypergrad import _peak_growth_mib
    from benchmarks.time_to_target import TASKS, Setup, Task, methods_of
    from bilevel.compile import compile_spec
    from bilevel.planner import make_plan
    from problems.hyperclean import mixture_split

    base = TASKS["hyperclean"]
    task = Task(base.name, base.path, base.lower, mixture_split(n_train=n, n_val=n, d=d)["test"])
    setup = Setup(task, STEPS, _overrides(n, d))
    call = methods_of(setup)[method]
    out: dict[str, Any] = {}

    def go() -> None:
        times, _, _ = call()
        out["per_step_s"] = statistics.median(b - a for a, b in zip(times, times[1:]))

    out["peak_mib"] = _peak_growth_mib(go)
    plan = make_plan(compile_spec(setup.loaded["auto"]))
    out["auto_solver"] = plan.inner_solver.name if plan.inner_solver else None
    return out


def scaling_table() -> dict[str, Any]:
    from benchmarks.time_to_target import METHODS

    rows = []
    for n, d in SIZES:
        row: dict[str, Any] = {"n_train": n, "d": d, "n_hyper": n, "n_lower": 10 * d + 10}
        for method in METHODS:
            done = subprocess.run([sys.executable, __file__, "--one", str(n), str(d), method],
                                  capture_output=True, text=True, check=True)
            row[method] = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
    head = " | ".join(f"{m}: s/step, MiB" for m in METHODS)
    lines = [f"Scaling (hyper-cleaning, Gaussian mixture, linear model; {STEPS} outer steps per method, each in its"
             " own process; s/step: median over the steps after the first; MiB: peak RSS growth)", "",
             f"| n_train = hyperparameters | d | lower scalars | auto chose | {head} |",
             "|---|---|---|---|" + "---|" * len(METHODS)]
    for row in rows:
        cells = " | ".join(f"{row[m]['per_step_s']:.3f}, {row[m]['peak_mib']:.0f}" for m in METHODS)
        lines.append(f"| {row['n_train']} | {row['d']} | {row['n_lower']} | {row[METHODS[0]]['auto_solver']} | {cells} |")
    return {"rows": rows, "markdown": "\n".join(lines)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", nargs=3, metavar=("N", "D", "METHOD"))
    args = parser.parse_args()
    if args.one:
        n, d, method = args.one
        print(json.dumps(one(int(n), int(d), method)))
    else:
        print(scaling_table()["markdown"])
