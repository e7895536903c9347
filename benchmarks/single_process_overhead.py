"""Single-process cost of the data-parallel hooks: times one hypergradient per engine with this
checkout and with another checkout of bilevel (e.g. the commit before data parallelism), in
alternating subprocesses on the same machine, and prints the median ratios as a table and JSON.

    python benchmarks/single_process_overhead.py --other /path/to/other/checkout [--repeats 7]

Problem: digits hyper-cleaning (linear model, 600 x 64, float32, CPU), 100 inner steps, 20 CG steps
(implicit) / 100 unrolled steps."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

TIMER = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from bilevel import build_engine, compile_spec, load_spec
from bilevel.presets import find_preset
from bilevel.engines import ImplicitConfig, UnrolledConfig, PenaltyConfig
loaded = load_spec(find_preset("hyperclean/digits"), ["run.device=cpu"])
problem = compile_spec(loaded)
out = {}
for name, config in [("implicit", ImplicitConfig()), ("unrolled", UnrolledConfig()), ("penalty", PenaltyConfig())]:
    engine = build_engine(config)
    x = problem.fresh(problem.upper.init)
    state = engine.init(problem, x)
    engine.hypergrad(problem, x, state, problem.upper.batch())  # warm-up
    times = []
    for _ in range(int(sys.argv[1])):
        start = time.perf_counter()
        engine.hypergrad(problem, x, state, problem.upper.batch())
        times.append(time.perf_counter() - start)
    out[name] = min(times)
print(json.dumps(out))
"""


def measure(root: Path, calls: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", TIMER, str(calls)], capture_output=True, text=True, env=env, cwd=root, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, required=True, help="another checkout of bilevel (the baseline)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating subprocess pairs")
    parser.add_argument("--calls", type=int, default=5, help="timed calls per subprocess (the minimum is kept)")
    args = parser.parse_args()
    ratios: dict[str, list[float]] = {}
    raw = []
    for _ in range(args.repeats):
        this, other = measure(HERE, args.calls), measure(args.other.resolve(), args.calls)
        raw.append({"this": this, "other": other})
        for name in this:
            ratios.setdefault(name, []).append(this[name] / other[name])
    summary = {name: {"median_ratio": statistics.median(r), "this_s": statistics.median(x["this"][name] for x in raw),
                      "other_s": statistics.median(x["other"][name] for x in raw)} for name, r in ratios.items()}
    print(f"{'engine':10s} {'this (s)':>10s} {'other (s)':>10s} {'this/other':>11s}")
    for name, row in summary.items():
        print(f"{name:10s} {row['this_s']:10.4f} {row['other_s']:10.4f} {row['median_ratio']:11.3f}")
    print(json.dumps({"summary": summary, "raw": raw, "command": " ".join(sys.argv)}))


if __name__ == "__main__":
    main()
