"""DARTS (first and second order) and RARTS on the digits search space against random cells.

Every method searches with the `nas/digits` preset (three seeds each); the derived cell is
retrained from scratch with the preset's retraining budget; five cells drawn uniformly from the
same space (with the same skip limit) are retrained with the same budget. Prints one table (test
accuracy mean +- std, search time) and writes the full figures as JSON.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/nas_digits.py                 # the README table
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/nas_digits.py --methods "DARTS 2nd order" --seeds 1 \
        --random 0 --figure docs/figures/darts_cell.png                            # the how-to's figure
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/nas_digits.py --step-times 10  # cost per outer step
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/nas_digits.py --seeds 1 --random 2 --steps 20   # quick look
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import bilevel  # noqa: E402
from benchmarks._common import measure, write_json  # noqa: E402
from bilevel.nas.genotype import Genotype, random_genotype  # noqa: E402
from bilevel.nas.retrain import retrain  # noqa: E402
from bilevel.presets import find_preset  # noqa: E402
from bilevel.engines import DartsConfig, RartsConfig  # noqa: E402
from bilevel.spec import load_spec  # noqa: E402
from problems.common.outputs import markdown_table  # noqa: E402

METHODS = {
    "DARTS 1st order": DartsConfig(order=1),
    "DARTS 2nd order": DartsConfig(order=2),
    "DARTS 2nd order, exact": DartsConfig(order=2, hessian="exact"),
    "RARTS": RartsConfig(),
    "RARTS (beta = 1)": RartsConfig(beta=1.0),
}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def search(name: str, config: Any, seed: int, overrides: list[str], out: Path) -> dict[str, Any]:
    loaded = load_spec(find_preset("nas/digits"), overrides=[f"run.seed={seed}", *overrides])
    began = time.perf_counter()
    result = bilevel.run(loaded, engine=config, device="cpu", out=out, overwrite=True, progress=False)
    total = time.perf_counter() - began
    report = result.result["report"]
    genotype = Genotype.load(out / "genotype.json")
    return {
        "method": name,
        "seed": seed,
        "test_accuracy": report["test_accuracy"],
        "search_time_s": result.result["wall_time_s"],
        "retrain_time_s": report["retrain_time_s"],
        "total_time_s": total,
        "skip_connections_normal": report["skip_connections_normal"],
        "genotype": genotype.to_json(),
    }


def random_cells(count: int, overrides: list[str]) -> list[dict[str, Any]]:
    loaded = load_spec(find_preset("nas/digits"), overrides=overrides)
    spec = loaded.spec.levels["upper"].variables["arch"]
    generator = torch.Generator().manual_seed(12345)
    rows = []
    for index in range(count):
        genotype = random_genotype(spec.space, generator)
        outcome = retrain(genotype, spec, base_dir=loaded.base_dir)
        rows.append({"method": "random cell", "index": index, "test_accuracy": outcome["test_accuracy"],
                     "retrain_time_s": outcome["time_s"], "genotype": genotype.to_json()})
    return rows


def step_times(methods: list[str], steps: int, rounds: int = 3) -> dict[str, float]:
    """Median time (ms) of one outer step (weight step + architecture direction + Adam step) per
    method on the preset, timed round-robin after a warm-up so that machine load falls on all alike."""
    from bilevel import build_engine, compile_spec
    from bilevel.runtime.outer import build_outer_optimizer

    loaded = load_spec(find_preset("nas/digits"), overrides=["levels.upper.variables.arch.warmup_steps=0"])
    setups = {}
    for name in methods:
        problem = compile_spec(loaded, "cpu")
        x = problem.fresh(problem.upper.init, requires_grad=True)
        engine = build_engine(METHODS[name])
        setups[name] = [problem, x, engine, engine.init(problem, x), build_outer_optimizer(loaded.spec.levels["upper"].solver, x)]

    def outer_steps(name: str) -> None:
        problem, x, engine, state, optimizer = setups[name]
        for _ in range(steps):
            out = engine.hypergrad(problem, x, state, problem.upper.batch())
            for p, g in zip(x, out.grad):
                p.grad = g
            optimizer.step()
            state = out.state
        setups[name][3] = state

    timed = measure({name: lambda name=name: outer_steps(name) for name in methods}, torch.device("cpu"), 1, rounds)
    return {name: result["median_ms"] / steps for name, result in timed.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="search seeds per method")
    parser.add_argument("--random", type=int, default=5, help="random cells")
    parser.add_argument("--steps", type=int, default=None, help="override run.steps (quick looks)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help="subset of: " + "; ".join(METHODS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "nas_digits")
    parser.add_argument("--figure", type=Path, default=None,
                        help="also draw the cell found by the first method's first seed here (docs/figures/darts_cell.png)")
    parser.add_argument("--step-times", type=int, default=0, metavar="N",
                        help="only time N outer steps per method, round-robin, and print ms per step")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.step_times:
        medians = step_times(args.methods, args.step_times)
        base = medians.get("DARTS 1st order", next(iter(medians.values())))
        print(markdown_table(["method", "ms per outer step (median of 3 rounds)", "relative to DARTS 1st order"],
                             ([name, f"{value:.0f}", f"{value / base:.2f}"] for name, value in medians.items())))
        return {"step_times_ms": medians}
    overrides = [] if args.steps is None else [f"run.steps={args.steps}"]
    rows: list[dict[str, Any]] = []
    for name in args.methods:
        for seed in range(args.seeds):
            tag = name.lower().replace(" ", "_")
            row = search(name, METHODS[name], seed, overrides, args.out / f"{tag}-seed{seed}")
            print(f"{name:16s} seed {seed}: test accuracy {row['test_accuracy']:.4f}, search {row['search_time_s']:.1f}s,"
                  f" retrain {row['retrain_time_s']:.1f}s", flush=True)
            rows.append(row)
    randoms = random_cells(args.random, overrides)
    for row in randoms:
        print(f"random cell {row['index']}: test accuracy {row['test_accuracy']:.4f}", flush=True)

    # without random cells (--random 0) there is nothing to compare with: no column, None in the JSON
    random_mean, random_std = _mean_std([r["test_accuracy"] for r in randoms]) if randoms else (None, None)
    summary, table = [], []
    for name in args.methods:
        mine = [r for r in rows if r["method"] == name]
        mean, std = _mean_std([r["test_accuracy"] for r in mine])
        seconds = statistics.fmean(r["search_time_s"] for r in mine)
        beats = None if random_mean is None else mean > random_mean
        summary.append({"method": name, "runs": len(mine), "test_accuracy_mean": mean, "test_accuracy_std": std,
                        "search_time_s_mean": seconds, "beats_random_mean": beats})
        table.append([f"{name} ({len(mine)} seeds)", f"{mean:.4f} +- {std:.4f}", f"{seconds:.1f}"]
                     + ([] if beats is None else ["yes" if beats else "no"]))
    header = ["method", "test accuracy (mean +- std)", "search time per run (s)"]
    if random_mean is not None:
        table.append([f"random cells ({len(randoms)})", f"{random_mean:.4f} +- {random_std:.4f}", "-", "-"])
        header.append(f"beats the random mean ({random_mean:.4f})")
    print()
    print(markdown_table(header, table))
    if random_mean is None:
        print("(no random cells drawn: --random 0; nothing to compare with)")
    payload = {
        "command": "python benchmarks/nas_digits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "summary": summary,
        "random": {"mean": random_mean, "std": random_std, "cells": randoms},
        "runs": rows,
    }
    write_json(args.out / "results.json", payload)
    if args.figure is not None and rows:
        from bilevel.nas.draw import draw_genotype

        first = rows[0]
        space = load_spec(find_preset("nas/digits")).spec.levels["upper"].variables["arch"].space
        title = f"{first['method']}, seed {first['seed']}: test accuracy {first['test_accuracy']:.4f}"
        draw_genotype(Genotype.from_json(first["genotype"]), space, args.figure, title=title)
    print(f"\nfull figures in {args.out / 'results.json'}")
    return payload


if __name__ == "__main__":
    main()
