"""The meta-learning comparison of the README: each method's preset run for a number of outer
steps per seed, then meta-tested on fresh tasks (600 by default); prints a Markdown table of the
mean query loss (or accuracy) after each number of adaptation steps, mean +- 95% CI over the
tasks of each seed, and the spread over seeds; writes JSON as it goes (one entry per finished run).

    python -m problems.meta.compare --family sinusoid --steps 70000 --seeds 0 1 2
    python -m problems.meta.compare --family sinusoid --methods maml fomaml --steps 2000   # quicker
    python -m problems.meta.compare --commands                                             # the command lines

Every row is ``bilevel run meta/<family>_<method> --set run.seed=<seed> --set tasks.seed=<seed>
--set run.steps=<steps>`` followed by ``bilevel meta-test``: the script runs exactly that through
the Python API (``--commands`` prints the command lines)."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bilevel import run  # noqa: E402
from bilevel.meta_test import meta_test_run  # noqa: E402
from bilevel.presets import find_preset  # noqa: E402
from bilevel.spec import load_spec  # noqa: E402
from problems.common.outputs import run_command  # noqa: E402

__all__ = ["METHODS", "run_method"]

METHODS = {"sinusoid": ["maml", "fomaml", "anil", "metasgd", "imaml"],
           "digits": ["maml", "fomaml", "anil", "metasgd", "imaml", "pretrained"]}


def overrides(seed: int, steps: int, extra: list[str], shots: int | None = None, method: str = "") -> list[str]:
    """The ``--set`` overrides of one run (``shots``: the meta-test tasks' shots; the pretrained
    baseline trains on whole classes, so only its test tasks change)."""
    out = [f"run.seed={seed}", f"tasks.seed={seed}", f"run.steps={steps}", "run.checkpoint_every=null", "run.log_every=500"]
    if shots is not None:
        out.append(f"tasks.{'test_kwargs' if method == 'pretrained' else 'kwargs'}.shots={shots}")
    return [*out, *extra]


def run_method(preset: str, seed: int, steps: int, out: Path, tasks: int, sets: list[str]) -> dict[str, Any]:
    """Train ``preset`` with the ``--set`` overrides ``sets`` (its seed and outer steps among them),
    then meta-test it on ``tasks`` tasks."""
    started = time.perf_counter()
    loaded = load_spec(find_preset(preset), overrides=sets)
    run(loaded, out=out, overwrite=True, progress=False)
    wall = time.perf_counter() - started
    return {"preset": preset, "seed": seed, "outer_steps": steps, "wall_time_s": wall, **meta_test_run(out, tasks=tasks)}


def table(results: list[dict[str, Any]], score: str) -> str:
    """Markdown: one row per method, one column per number of adaptation steps."""
    counts = sorted({int(s) for r in results for s in r["steps"]})
    lines = ["| method | seeds | outer steps | " + " | ".join(f"{score} after {c}" for c in counts) + " |",
             "|---|---|---|" + "---|" * len(counts)]
    for preset in dict.fromkeys(r["preset"] for r in results):
        rows = [r for r in results if r["preset"] == preset]
        cells = []
        for c in counts:
            per_seed = [r["steps"][str(c)][score] for r in rows if str(c) in r["steps"] and score in r["steps"][str(c)]]
            if not per_seed:
                cells.append("")
                continue
            means = [s["mean"] for s in per_seed]
            if not all(math.isfinite(m) for m in means):  # e.g. Meta-SGD's learned rates past its horizon
                cells.append("not finite")
                continue
            ci = statistics.mean(s["ci95"] for s in per_seed)
            spread = f", seeds sd {statistics.stdev(means):.3f}" if len(means) > 1 else ""
            cells.append(f"{statistics.mean(means):.3f} ± {ci:.3f}{spread}")
        lines.append(f"| {preset} | {len(rows)} | {rows[0]['outer_steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(METHODS), default="sinusoid")
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=70000)
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--shots", type=int, default=None, help="shots of the tasks (default: the presets', 1)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="further overrides of every run")
    parser.add_argument("--out", type=Path, default=Path("runs/meta-compare"))
    parser.add_argument("--commands", action="store_true")
    args = parser.parse_args()
    methods = args.methods or METHODS[args.family]
    results: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    record = args.out / f"{args.family}.json"
    for seed in args.seeds:
        for method in methods:
            preset = f"meta/{args.family}_{method}"
            out = args.out / f"{args.family}_{method}_seed{seed}"
            sets = overrides(seed, args.steps, args.extra, args.shots, method)
            if args.commands:
                print(run_command(preset, sets, out=str(out)), "&& bilevel meta-test", out)
                continue
            results.append(run_method(preset, seed, args.steps, out, args.tasks, sets))
            record.write_text(json.dumps(results, indent=2))
            print(f"done {preset} seed {seed} ({results[-1]['wall_time_s']:.0f} s)", file=sys.stderr, flush=True)
    if results:
        score = "accuracy" if "accuracy" in next(iter(results[0]["steps"].values())) else "query_loss"
        print(table(results, score))


if __name__ == "__main__":
    main()
