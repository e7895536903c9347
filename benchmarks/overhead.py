"""What the fast path costs where it does nothing: `fast_path: auto` (eager on CPU) against `off`,
medians of many interleaved calls (after 5 warm-up calls each) on a small hyper-cleaning problem, where a per-call overhead
would show most. Prints a table and writes JSON.

    python benchmarks/overhead.py --json overhead.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import measure, write_json  # noqa: E402
from bilevel.compile import compile_spec  # noqa: E402
from bilevel.engines import build_engine  # noqa: E402
from bilevel.engines import ImplicitConfig, UnrolledConfig  # noqa: E402
from bilevel.spec import spec_from_data  # noqa: E402


def problem(n: int, d: int, steps: int, device: str):
    kwargs = {"dataset": "mixture", "n_train": n, "n_val": n, "d": d, "classes": 4, "seed": 0}
    return compile_spec(spec_from_data({
        "name": "overhead",
        "levels": {
            "upper": {"variables": {"lam": {"shape": [n]}}, "objective": "problems.hyperclean:upper_objective",
                      "data": {"source": "problems.hyperclean:val_data", "kwargs": kwargs}},
            "lower": {"parent": "upper", "variables": {"W": {"shape": [4, d]}, "b": {"shape": [4]}},
                      "objective": "problems.hyperclean:lower_objective", "objective_kwargs": {"mu": 1e-2},
                      "data": {"source": "problems.hyperclean:train_data", "kwargs": kwargs},
                      "solver": {"name": "sgd", "lr": 0.2, "steps": steps, "warm_start": False}},
        },
        "run": {"device": device},
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    prob = problem(200, 16, 20, args.device)
    x = prob.fresh(prob.upper.init)
    rows = []
    for kind in (ImplicitConfig, UnrolledConfig):
        engines = {mode: build_engine(kind(fast_path=mode)) for mode in ("off", "auto")}
        calls = {mode: lambda engine=engine: engine.hypergrad(prob, x, engine.init(prob, x), prob.upper.batch())
                 for mode, engine in engines.items()}
        medians = {mode: result["median_ms"] for mode, result in measure(calls, prob.device, 5, args.calls).items()}
        rows.append({"engine": kind().kind, "off_ms": medians["off"], "auto_ms": medians["auto"],
                     "auto_over_off": medians["auto"] / medians["off"], "ran_as": engines["auto"].execution_report()})
    print(f"# fast_path auto vs off, {args.calls} interleaved calls, {args.device}, torch {torch.__version__}")
    print(f"{'engine':10} {'off ms':>8} {'auto ms':>8} {'auto/off':>9}")
    for row in rows:
        print(f"{row['engine']:10} {row['off_ms']:8.3f} {row['auto_ms']:8.3f} {row['auto_over_off']:9.3f}")
    if args.json:
        write_json(args.json, {"torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
